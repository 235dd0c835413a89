// Reads one Durable Streams stream with the protocol's TypeScript client until it holds
// `expected` bytes, then prints them (as numbers) and what the reads met, as one JSON line.
//
//   node reader.mjs <origins, comma-separated> <stream path> <expected bytes> <long-poll|sse>
//
// The origins stand for a load balancer: every request goes to the current one, and a
// request that fails (connection refused or reset: the instance was killed or drained away;
// or 503: it drains) moves on to the next before the client's own backoff retries it. Progress goes to stderr
// as `have <bytes>` lines. Gives up (exit 2) after 90 s.
import { stream } from "@durable-streams/client";

const [originsArg, path, expectedArg, live] = process.argv.slice(2);
const origins = originsArg.split(",");
const expected = Number(expectedArg);
let current = 0;
let failures = 0;
const served = Object.fromEntries(origins.map((o) => [o, 0]));

async function balanced(input, init) {
  const u = new URL(typeof input === "string" || input instanceof URL ? input : input.url);
  const o = new URL(origins[current]);
  u.protocol = o.protocol;
  u.host = o.host;
  try {
    const r = await fetch(u, init);
    served[origins[current]] += 1;
    // A draining instance refuses live reads (503): a load balancer routes the retry away.
    if (r.status === 503) current = (current + 1) % origins.length;
    return r.headers.get("content-type") === "text/event-stream" ? endCleanly(r) : r;
  } catch (e) {
    if (init?.signal?.aborted) throw e;
    failures += 1;
    current = (current + 1) % origins.length;
    throw e;
  }
}

// An SSE body cut short (the instance was killed) ends as a proxy in front would end it:
// cleanly, so the client reconnects from the last control event's offset. (The client
// treats an SSE body that errors as fatal, not as the end of a connection.)
function endCleanly(r) {
  const inner = r.body.getReader();
  const body = new ReadableStream({
    async pull(controller) {
      try {
        const { done, value } = await inner.read();
        if (done) controller.close();
        else controller.enqueue(value);
      } catch {
        failures += 1;
        current = (current + 1) % origins.length;
        controller.close();
      }
    },
    cancel(reason) {
      return inner.cancel(reason);
    },
  });
  return new Response(body, { status: r.status, statusText: r.statusText, headers: r.headers });
}

setTimeout(() => {
  console.error(`gave up: no ${expected} bytes within 90 s`);
  process.exit(2);
}, 90_000).unref();

const chunks = [];
let have = 0;
const res = await stream({
  url: `${origins[0]}${path}`,
  offset: "-1",
  live,
  fetch: balanced,
  backoffOptions: { initialDelay: 50, maxDelay: 500, multiplier: 2 },
  // A response cut short (the instance went away mid-body) is retried from the last offset.
  onError: () => {
    failures += 1;
    current = (current + 1) % origins.length;
    return {};
  },
});
await new Promise((resolve) => {
  const unsubscribe = res.subscribeBytes(async (chunk) => {
    if (chunk.data.length > 0) {
      chunks.push(Buffer.from(chunk.data));
      have += chunk.data.length;
      console.error(`have ${have}`);
    }
    if (have >= expected) {
      unsubscribe();
      res.cancel();
      resolve();
    }
  });
});
const bytes = Buffer.concat(chunks);
console.log(JSON.stringify({ bytes: [...bytes], failures, served }));
process.exit(0);
