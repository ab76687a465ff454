// A tiny HTTP/2 server on Node's own http2 module (nghttp2), for the LLM adapter's fault tests.
// Usage: node node_h2_server.mjs '<json options>'; prints {"port": N} on stdout once listening.
// Options: cert, key (PEM paths), maxStreams (SETTINGS_MAX_CONCURRENT_STREAMS),
//   refuseTimes (RST_STREAM REFUSED_STREAM the first N streams of each x-request-id, before
//   any processing),
//   goawayAfter (after N streams on a session: GOAWAY NO_ERROR naming the Nth as the last stream;
//   later streams are never processed), delayMs (hold each response this long).
// GET /stats answers {"processed": {request id: times}}: each request is processed at most once.
// Listens on 127.0.0.1 only; exits on SIGTERM or when stdin closes (the test runner died).
import http2 from "node:http2";
import fs from "node:fs";

const opts = JSON.parse(process.argv[2] || "{}");
const processed = {};
const refused = {};
let streamsSeen = 0;
const server = http2.createSecureServer({
  cert: fs.readFileSync(opts.cert),
  key: fs.readFileSync(opts.key),
  allowHTTP1: false,
  settings: { maxConcurrentStreams: opts.maxStreams ?? 100 },
});

server.on("session", (session) => {
  session.streamsSeen = 0;
  session.goneAway = false;
});

server.on("stream", (stream, headers) => {
  const session = stream.session;
  stream.on("error", () => {}); // our own RST_STREAM surfaces as an 'error' event
  if (headers[":path"] === "/stats") {
    stream.respond({ ":status": 200, "content-type": "application/json" });
    stream.end(JSON.stringify({ processed, refused, streamsSeen }));
    return;
  }
  streamsSeen += 1;
  session.streamsSeen += 1;
  if (session.goneAway) {
    return; // above the GOAWAY's last stream: never processed (nghttp2 closes it)
  }
  const id = headers["x-request-id"] || String(stream.id);
  if ((refused[id] || 0) < (opts.refuseTimes ?? 0)) {
    refused[id] = (refused[id] || 0) + 1;
    stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
    return;
  }
  if (opts.goawayAfter && session.streamsSeen === opts.goawayAfter) {
    session.goneAway = true;
    session.goaway(http2.constants.NGHTTP2_NO_ERROR, stream.id);
  }
  const chunks = [];
  stream.on("data", (c) => chunks.push(c));
  stream.on("end", () => {
    processed[id] = (processed[id] || 0) + 1;
    setTimeout(() => {
      if (stream.destroyed) return;
      stream.respond({ ":status": 200, "content-type": "text/plain" });
      stream.end(`ok ${id}\n`);
    }, opts.delayMs ?? 5);
  });
});

server.on("sessionError", () => {});
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + "\n");
});
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
process.on("SIGTERM", () => process.exit(0));
