// A Laravel Echo 2 client (over pusher-js 8) for tests/test_pusher_js.py: one JSON line per thing it sees.
//
// Configuration (environment): PUSHER_KEY, WS_HOST, WS_PORT, AUTH_ENDPOINT, TOKEN as for listen.mjs;
//   PRIVATE     the private channel without its prefix, as Echo takes it (e.g. "account.acme")
//   LISTEN      the name given to .listen() (e.g. ".location.updated": leading dot, no namespace)
//   TIMEOUT_MS  give up after this long: print {"type":"timeout"} and exit 2 (default 20000)
// stdin: "quit".
//
// Lines printed: {"type":"connected","socket_id"}, {"type":"subscribed","channel"},
// {"type":"subscription_error","status","error"}, {"type":"event","event","data"}.
import readline from 'node:readline';
import Echo from 'laravel-echo';
import Pusher from 'pusher-js';

const env = process.env;
const print = (line) => process.stdout.write(JSON.stringify(line) + '\n');

const echo = new Echo({
  broadcaster: 'pusher',
  Pusher,
  key: env.PUSHER_KEY || 'fleetgate',
  cluster: 'mt1',
  wsHost: env.WS_HOST || '127.0.0.1',
  wsPort: Number(env.WS_PORT),
  forceTLS: false,
  enabledTransports: ['ws'],
  authEndpoint: env.AUTH_ENDPOINT,
  auth: { headers: { Authorization: `Bearer ${env.TOKEN}` } },
});

echo.connector.pusher.connection.bind('connected', () => print({ type: 'connected', socket_id: echo.socketId() }));

echo
  .private(env.PRIVATE)
  .subscribed(() => print({ type: 'subscribed', channel: `private-${env.PRIVATE}` }))
  .error((e) => print({ type: 'subscription_error', status: e.status, error: e.error }))
  .listen(env.LISTEN, (data) => print({ type: 'event', event: env.LISTEN, data }));

function quit(code) {
  echo.disconnect();
  setTimeout(() => process.exit(code), 50);
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim() === 'quit') quit(0);
});

setTimeout(() => {
  print({ type: 'timeout' });
  quit(2);
}, Number(env.TIMEOUT_MS || 20000)).unref();
