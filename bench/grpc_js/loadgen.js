// The benchmark's gRPC load generator in grpc-js, one channel.
//   node loadgen.js '{"kind": "unary", "target": "127.0.0.1:P", "callers": N, "duration": S, "size": B}'
//   node loadgen.js '{"kind": "stream", "target": "127.0.0.1:P", "duration": S, "size": B}'
// Prints one JSON line with the same fields as grpc_bench.py's Python load generator.
'use strict';
const grpc = require('@grpc/grpc-js');

const spec = JSON.parse(process.argv[2]);
const raw = (b) => b;
const client = new grpc.Client(spec.target, grpc.credentials.createInsecure());
const nowMs = () => Number(process.hrtime.bigint()) / 1e6;

function summary(latencies) {
  if (latencies.length === 0) return { p50_ms: null, p90_ms: null, p99_ms: null, max_ms: null };
  const sorted = Float64Array.from(latencies).sort();
  const at = (q) => Math.round(sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] * 1000) / 1000;
  return { p50_ms: at(0.5), p90_ms: at(0.9), p99_ms: at(0.99), max_ms: at(1) };
}

function echo(payload) {
  return new Promise((resolve, reject) => {
    client.makeUnaryRequest('/bench.Raw/Echo', raw, raw, payload, { deadline: Date.now() + 10000 },
      (err, answer) => (err ? reject(err) : resolve(answer)));
  });
}

async function unary() {
  const payload = Buffer.alloc(spec.size);
  for (let i = 0; i < spec.size; i++) payload[i] = i % 256;
  for (let i = 0; i < 20; i++) await echo(payload);   // warm up the connection and both paths
  const latencies = [];
  const errors = {};
  const t0 = nowMs();
  const stopAt = t0 + spec.duration * 1000;
  async function caller() {
    while (nowMs() < stopAt) {
      const started = nowMs();
      try {
        const answer = await echo(payload);
        if (!answer.equals(payload)) errors['wrong answer'] = (errors['wrong answer'] || 0) + 1;
      } catch (err) {
        const name = grpc.status[err.code] || String(err.code);
        errors[name] = (errors[name] || 0) + 1;
        continue;
      }
      latencies.push(nowMs() - started);
    }
  }
  await Promise.all(Array.from({ length: spec.callers }, caller));
  const wall = (nowMs() - t0) / 1000;
  return { callers: spec.callers, calls: latencies.length, wall_s: Math.round(wall * 1000) / 1000,
           calls_per_s: Math.round(latencies.length / wall * 10) / 10, ...summary(latencies), errors,
           peer: `grpc-js ${require('@grpc/grpc-js/package.json').version}` };
}

function stream() {
  return new Promise((resolve) => {
    const request = Buffer.alloc(12);
    request.writeBigUInt64BE(10n ** 12n, 0);
    request.writeUInt32BE(spec.size, 8);
    const call = client.makeServerStreamRequest('/bench.Raw/Count', raw, raw, request, {});
    let received = 0;
    const errors = {};
    const t0 = nowMs();
    const stopAt = t0 + spec.duration * 1000;
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      const wall = (nowMs() - t0) / 1000;
      call.cancel();
      resolve({ messages: received, wall_s: Math.round(wall * 1000) / 1000,
                messages_per_s: Math.round(received / wall * 10) / 10,
                MB_per_s: Math.round(received * spec.size / wall / 1e4) / 100, errors,
                peer: `grpc-js ${require('@grpc/grpc-js/package.json').version}` });
    };
    call.on('data', (message) => {
      received++;
      if (message.length !== spec.size) errors['wrong size'] = (errors['wrong size'] || 0) + 1;
      if (received % 256 === 0 && nowMs() >= stopAt) finish();
    });
    call.on('error', (err) => {
      if (!done && err.code !== grpc.status.CANCELLED) errors[grpc.status[err.code]] = 1;
      finish();
    });
    call.on('end', finish);
  });
}

(spec.kind === 'unary' ? unary() : stream()).then((result) => {
  console.log(JSON.stringify(result));
  client.close();
  process.exit(0);
});
