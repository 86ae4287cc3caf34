'use strict';
// bench/socketio/fanout.js: the socket.io side of yard-bench's fan-out comparison, in the same
// shape as Switchyard's log fan-out: a publisher process hands a batch of log lines to Redis
// through @socket.io/redis-adapter, and a serving process relays it to every connected socket.
//
//   node fanout.js serve PORT     socket.io server; every socket joins room "job"
//   node fanout.js publish PORT   HTTP POST / with {"lines":[...]} -> io.to("job").emit("log", ...)
//                                 from a second adapter-backed server, so each message crosses Redis
//
// Env: REDIS_URL (redis://127.0.0.1:6379), SIO_PREFIX (key prefix, default yard-bench-sio).
// Packages (installed at run time by scripts/bench.sh, never committed): socket.io,
// @socket.io/redis-adapter, redis.
const http = require('node:http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const { createClient } = require('redis');

const [role, portArg] = process.argv.slice(2);
const port = Number(portArg);
if (!['serve', 'publish'].includes(role) || !Number.isInteger(port)) {
  console.error('usage: node fanout.js serve|publish PORT');
  process.exit(2);
}

async function main() {
  const url = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
  const pub = createClient({ url });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const server = http.createServer();
  const io = new Server(server, {
    adapter: createAdapter(pub, sub, { key: process.env.SIO_PREFIX || 'yard-bench-sio' }),
    transports: ['websocket'],
    serveClient: false,
  });
  if (role === 'serve') {
    io.on('connection', (socket) => socket.join('job'));
  } else {
    // The publisher's own HTTP endpoint; it holds no sockets, so every emit reaches the
    // serving process through Redis only.
    server.removeAllListeners('request');
    server.on('request', (req, res) => {
      if (req.method !== 'POST') {
        res.writeHead(405).end();
        return;
      }
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        try {
          const body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          io.to('job').emit('log', { type: 'log', channel: 'job', lines: body.lines });
          res.writeHead(204).end();
        } catch (e) {
          res.writeHead(400).end(String(e));
        }
      });
    });
  }
  server.listen(port, '127.0.0.1', () => console.error(`[socketio ${role}] listening on 127.0.0.1:${port}`));
  const stop = () => {
    io.close();
    Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => {
  console.error(`[socketio ${role}] ${e.stack || e}`);
  process.exit(1);
});
