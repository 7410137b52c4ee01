// The benchmark's gRPC origin in grpc-js: bench.Raw/Echo (unary, answers its
// request) and bench.Raw/Count (server streaming: N messages of S bytes, the
// request is "!QI" N, S), raw bytes both ways, as grpc_bench.py's Python origin.
'use strict';
const grpc = require('@grpc/grpc-js');

const port = process.argv[2];
const raw = (b) => b;
const server = new grpc.Server();

server.register('/bench.Raw/Echo', (call, callback) => callback(null, call.request), raw, raw, 'unary');

server.register('/bench.Raw/Count', (call) => {
  const n = Number(call.request.readBigUInt64BE(0));
  const body = Buffer.alloc(call.request.readUInt32BE(8), 'x');
  let sent = 0;
  let cancelled = false;
  call.on('cancelled', () => { cancelled = true; });
  const pump = () => {
    // write() says false when grpc-js's buffer is full: wait for 'drain'.
    while (!cancelled && sent < n) {
      sent++;
      if (!call.write(body)) { call.once('drain', pump); return; }
    }
    if (!cancelled) call.end();
  };
  pump();
}, raw, raw, 'serverStream');

server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err) => {
  if (err) { console.error(`cannot listen on 127.0.0.1:${port}: ${err.message}`); process.exit(1); }
  console.log(`grpc-js backend on 127.0.0.1:${port}`);
});
const stop = () => server.tryShutdown(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
