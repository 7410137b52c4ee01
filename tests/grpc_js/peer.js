// grpc-js peer for the loopback tests: every call kind, raw bytes, as tests/grpc_services.py's tunneld.test.Raw.
//   node peer.js serve PORT          -> prints "listening PORT", serves Echo, Sum, Count, Chat until SIGTERM
//   node peer.js call TARGET         -> runs one call of each kind against TARGET, prints one JSON line
// Uses @grpc/grpc-js from bench/grpc_js/node_modules (npm ci there; the tests skip without it).
'use strict';
const path = require('path');
const grpc = require(path.join(__dirname, '..', '..', 'bench', 'grpc_js', 'node_modules', '@grpc', 'grpc-js'));

const SERVICE = '/tunneld.test.Raw/';
const raw = (b) => b;
const u64 = (n) => { const b = Buffer.alloc(16); b.writeBigUInt64BE(BigInt(n[0]), 0); b.writeBigUInt64BE(BigInt(n[1]), 8); return b; };

function serve(port) {
  const server = new grpc.Server();
  server.register(SERVICE + 'Echo', (call, cb) => {
    const md = new grpc.Metadata();
    for (const [k, v] of Object.entries(call.metadata.getMap())) if (k.startsWith('x-')) md.set(k, v);
    call.sendMetadata(md);
    const trailers = new grpc.Metadata();
    trailers.set('x-trailer', 'done');
    trailers.set('x-trailer-bin', Buffer.from([0, 0xfe, 0xff]));
    cb(null, call.request, trailers);
  }, raw, raw, 'unary');
  server.register(SERVICE + 'Sum', (call, cb) => {
    let count = 0, total = 0;
    call.on('data', (m) => { count++; total += m.length; });
    call.on('end', () => cb(null, u64([count, total])));
  }, raw, raw, 'clientStream');
  server.register(SERVICE + 'Count', (call) => {
    const n = call.request.readUInt32BE(0), size = call.request.readUInt32BE(4);
    for (let i = 0; i < n; i++) { const b = Buffer.alloc(Math.max(4, size), 'x'); b.writeUInt32BE(i, 0); call.write(b); }
    call.end();
  }, raw, raw, 'serverStream');
  server.register(SERVICE + 'Chat', (call) => {
    call.on('data', (m) => call.write(Buffer.concat([Buffer.from('re: '), m])));
    call.on('end', () => call.end());
  }, raw, raw, 'bidi');
  server.register(SERVICE + 'Deny', (call, cb) => {
    const md = new grpc.Metadata();
    md.set('x-reason', 'policy');
    cb({ code: grpc.status.PERMISSION_DENIED, details: 'not for you: ' + call.request.toString(), metadata: md });
  }, raw, raw, 'unary');
  server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err, bound) => {
    if (err) { console.error(err.message); process.exit(1); }
    console.log(`listening ${bound}`);
  });
  const stop = () => server.tryShutdown(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

async function callAll(target) {
  const client = new grpc.Client(target, grpc.credentials.createInsecure());
  const deadline = () => ({ deadline: Date.now() + 10000 });
  const out = {};
  out.unary = await new Promise((resolve) => {
    const md = new grpc.Metadata();
    md.set('x-a', '1');
    md.set('x-blob-bin', Buffer.from([0, 1, 0xff]));
    let headers = null, result = null;
    // The callback comes before the 'status' event that carries the trailers: answer on the latter.
    const call = client.makeUnaryRequest(SERVICE + 'Echo', raw, raw, Buffer.from('hello js'), md, deadline(),
      (err, answer) => { result = { err: err ? err.code : 0, answer: answer ? answer.toString() : null }; });
    call.on('metadata', (m) => { headers = { a: m.get('x-a')[0], bin: m.get('x-blob-bin')[0].toString('hex') }; });
    call.on('status', (s) => setImmediate(() => resolve({ ...result, headers,
      trailers: { t: s.metadata.get('x-trailer')[0], bin: s.metadata.get('x-trailer-bin')[0].toString('hex') } })));
  });
  out.client_stream = await new Promise((resolve) => {
    const call = client.makeClientStreamRequest(SERVICE + 'Sum', raw, raw, new grpc.Metadata(), deadline(),
      (err, answer) => resolve(err ? { err: err.code } : { count: Number(answer.readBigUInt64BE(0)), total: Number(answer.readBigUInt64BE(8)) }));
    for (let i = 0; i < 100; i++) call.write(Buffer.alloc(1000 + i));
    call.end();
  });
  out.server_stream = await new Promise((resolve) => {
    const req = Buffer.alloc(8); req.writeUInt32BE(500, 0); req.writeUInt32BE(100, 4);
    const call = client.makeServerStreamRequest(SERVICE + 'Count', raw, raw, req, new grpc.Metadata(), deadline());
    let n = 0, inOrder = true;
    call.on('data', (m) => { if (m.readUInt32BE(0) !== n) inOrder = false; n++; });
    call.on('status', (s) => resolve({ code: s.code, messages: n, in_order: inOrder }));
    call.on('error', () => {});
  });
  out.bidi = await new Promise((resolve) => {
    const call = client.makeBidiStreamRequest(SERVICE + 'Chat', raw, raw, new grpc.Metadata(), deadline());
    const got = [];
    let i = 0;
    const next = () => { if (i < 5) { call.write(Buffer.from(`ping ${i++}`)); } else { call.end(); } };
    call.on('data', (m) => { got.push(m.toString()); next(); });   // ping-pong: the next only after the answer
    call.on('status', (s) => resolve({ code: s.code, replies: got }));
    call.on('error', () => {});
    next();
  });
  out.error = await new Promise((resolve) => {
    client.makeUnaryRequest(SERVICE + 'Deny', raw, raw, Buffer.from('js'), new grpc.Metadata(), deadline(),
      (err) => resolve({ code: err && err.code, details: err && err.details, reason: err && err.metadata.get('x-reason')[0] }));
  });
  console.log(JSON.stringify(out));
  client.close();
}

if (process.argv[2] === 'serve') serve(process.argv[3]);
else callAll(process.argv[3]).catch((e) => { console.error(e); process.exit(1); });
