// A pusher-js 8 client for tests/test_pusher_js.py: it prints one JSON line per thing it sees.
//
// Configuration (environment):
//   PUSHER_KEY     app key (default "fleetgate")
//   WS_HOST        relay host (default 127.0.0.1); WS_PORT its WebSocket port
//   AUTH_ENDPOINT  e.g. http://127.0.0.1:8000/broadcasting/auth; TOKEN the bearer access token
//   CHANNELS       comma-separated; subscribed one after the other, each once the previous one
//                  succeeded or failed (so a refusal can be followed by a subscription on the same socket)
//   EVENTS         comma-separated event names to report (default "location.updated")
//   TIMEOUT_MS     give up after this long: print {"type":"timeout"} and exit 2 (default 20000)
// stdin, one command per line: "subscribe <channel>", "unsubscribe <channel>", "quit".
//
// Lines printed: {"type":"connected","socket_id"}, {"type":"state","current"},
// {"type":"subscribed","channel","members"?}, {"type":"subscription_error","channel","status","error"},
// {"type":"event","channel","event","data"}, {"type":"member_added"|"member_removed","channel","id","info"}.
import readline from 'node:readline';
import Pusher from 'pusher-js';

const env = process.env;
const print = (line) => process.stdout.write(JSON.stringify(line) + '\n');
const events = (env.EVENTS || 'location.updated').split(',').filter(Boolean);

const pusher = new Pusher(env.PUSHER_KEY || 'fleetgate', {
  cluster: 'mt1', // pusher-js 8 insists on a cluster even with wsHost; it is not used
  wsHost: env.WS_HOST || '127.0.0.1',
  wsPort: Number(env.WS_PORT),
  forceTLS: false,
  enabledTransports: ['ws'],
  channelAuthorization: {
    endpoint: env.AUTH_ENDPOINT,
    transport: 'ajax',
    headers: { Authorization: `Bearer ${env.TOKEN}` },
  },
});

const members = (channel) => {
  const out = [];
  channel.members.each((m) => out.push({ id: m.id, info: m.info }));
  return out;
};

const queue = (env.CHANNELS || '').split(',').filter(Boolean);
let pending = null;

function subscribeNext() {
  if (pending !== null || queue.length === 0) return;
  const name = queue.shift();
  pending = name;
  const channel = pusher.subscribe(name);
  const settled = () => {
    if (pending === name) {
      pending = null;
      subscribeNext();
    }
  };
  channel.bind('pusher:subscription_succeeded', () => {
    print({ type: 'subscribed', channel: name, ...(name.startsWith('presence-') ? { members: members(channel) } : {}) });
    settled();
  });
  channel.bind('pusher:subscription_error', (e) => {
    print({ type: 'subscription_error', channel: name, status: e.status, error: e.error, state: pusher.connection.state });
    settled();
  });
  channel.bind('pusher:member_added', (m) => print({ type: 'member_added', channel: name, id: m.id, info: m.info }));
  channel.bind('pusher:member_removed', (m) => print({ type: 'member_removed', channel: name, id: m.id }));
  for (const event of events) {
    channel.bind(event, (data) => print({ type: 'event', channel: name, event, data }));
  }
}

pusher.connection.bind('state_change', ({ current }) => print({ type: 'state', current }));
pusher.connection.bind('connected', () => {
  print({ type: 'connected', socket_id: pusher.connection.socket_id });
  subscribeNext();
});

function quit(code) {
  pusher.disconnect();
  setTimeout(() => process.exit(code), 50);
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const [command, argument] = line.trim().split(/\s+/, 2);
  if (command === 'subscribe') {
    queue.push(argument);
    subscribeNext();
  } else if (command === 'unsubscribe') {
    pusher.unsubscribe(argument);
    print({ type: 'unsubscribed', channel: argument });
  } else if (command === 'quit') {
    quit(0);
  }
});

setTimeout(() => {
  print({ type: 'timeout' });
  quit(2);
}, Number(env.TIMEOUT_MS || 20000)).unref();
