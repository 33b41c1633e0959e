// A tracking-link viewer with pusher-js 8, for tests/test_links_js.py: one JSON line per thing it sees.
//
// Configuration (environment):
//   APP_KEY        the Pusher app key (default "fleetgate"); WS_HOST (default 127.0.0.1), WS_PORT
//   AUTH_ENDPOINT  e.g. http://127.0.0.1:8000/broadcasting/auth
//   LINK           the link's uuid; SESSION_TOKEN the token POST .../verify returned
//   TIMEOUT_MS     give up after this long: print {"type":"timeout"} and exit 2 (default 20000)
// stdin: "quit".
//
// Lines printed: {"type":"connected","socket_id"}, {"type":"state","current"}, {"type":"subscribed","channel"},
// {"type":"subscription_error","status","error"}, {"type":"event","event","data"} for location.updated,
// link.expired, schedule.changed and vehicle.changed, and {"type":"error","code","message"} for every
// error pusher-js reports (a pusher:error message, then the close code of the connection).
import readline from 'node:readline';
import Pusher from 'pusher-js';

const env = process.env;
const print = (line) => process.stdout.write(JSON.stringify(line) + '\n');
const EVENTS = ['location.updated', 'link.expired', 'schedule.changed', 'vehicle.changed'];

const pusher = new Pusher(env.APP_KEY || 'fleetgate', {
  cluster: 'mt1', // pusher-js 8 insists on a cluster even with wsHost; it is not used
  wsHost: env.WS_HOST || '127.0.0.1',
  wsPort: Number(env.WS_PORT),
  forceTLS: false,
  enabledTransports: ['ws'],
  channelAuthorization: {
    endpoint: env.AUTH_ENDPOINT,
    transport: 'ajax',
    headers: { Authorization: `Bearer ${env.SESSION_TOKEN}` },
  },
});

const name = `private-tracking-link.${env.LINK}`;
const channel = pusher.subscribe(name);
channel.bind('pusher:subscription_succeeded', () => print({ type: 'subscribed', channel: name }));
channel.bind('pusher:subscription_error', (e) => print({ type: 'subscription_error', status: e.status, error: e.error }));
for (const event of EVENTS) {
  channel.bind(event, (data) => print({ type: 'event', event, data }));
}

pusher.connection.bind('state_change', ({ current }) => print({ type: 'state', current }));
pusher.connection.bind('connected', () => print({ type: 'connected', socket_id: pusher.connection.socket_id }));
pusher.connection.bind('error', (e) => {
  // {type: 'PusherError', data} for a pusher:error message; {type: 'WebSocketError', error: {data}} for a close
  const data = (e && (e.data || (e.error && e.error.data))) || {};
  print({ type: 'error', kind: e && e.type, code: data.code ?? null, message: data.message ?? null });
});

function quit(code) {
  pusher.disconnect();
  setTimeout(() => process.exit(code), 50);
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim() === 'quit') quit(0);
});

setTimeout(() => {
  print({ type: 'timeout' });
  quit(2);
}, Number(env.TIMEOUT_MS || 20000)).unref();
