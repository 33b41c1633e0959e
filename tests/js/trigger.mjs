// Publishes one event through the relay's Pusher HTTP API with the official Node server library
// (npm "pusher" 5.3.4), for tests/test_pusher_js.py. Prints one JSON line and exits.
//
// Configuration (environment): APP_ID, PUSHER_KEY, SECRET, HOST, PORT.
// Arguments: <channel> <event> <data (a JSON text)>.
// Prints {"type":"triggered","status","body"} or {"type":"error","status","body"} (exit 1).
import Pusher from 'pusher';

const env = process.env;
const print = (line) => process.stdout.write(JSON.stringify(line) + '\n');
const [channel, event, data] = process.argv.slice(2);

const pusher = new Pusher({
  appId: env.APP_ID || '1',
  key: env.PUSHER_KEY || 'fleetgate',
  secret: env.SECRET,
  host: env.HOST || '127.0.0.1',
  port: env.PORT,
  useTLS: false,
  timeout: 5000,
});

try {
  const response = await pusher.trigger(channel, event, JSON.parse(data));
  print({ type: 'triggered', status: response.status, body: await response.json() });
} catch (error) {
  print({ type: 'error', status: error.status ?? null, body: error.body ?? String(error) });
  process.exitCode = 1;
}
