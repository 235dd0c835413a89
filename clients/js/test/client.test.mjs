// The client's delivery rules against a scripted WebSocket and fetch: ordering, dedupe, gap
// repair, batched acks per subprotocol, resume, drain, typed errors, key buffering, verify,
// byte payloads (v3 binary frames, `{"$base64"}` on every other path).
// The scripted socket and the compiled SDK come from scripted.mjs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { E, FakeWebSocket, binaryFrame, here, sleep, until, zd } from "./scripted.mjs";

const e2e = JSON.parse(readFileSync(path.join(here, "..", "..", "..", "docs", "vectors", "e2e-aes256gcm.json"), "utf8"));
const bytes = (h) => Uint8Array.from(h.match(/../g).map((x) => parseInt(x, 16)));

const fetches = [];
let fetchAnswer = () => ({ status: 500, body: {} });
globalThis.fetch = async (url, init) => {
  fetches.push({ url: String(url), headers: init?.headers ?? {} });
  const a = fetchAnswer(String(url));
  return new Response(typeof a.body === "string" ? a.body : JSON.stringify(a.body), { status: a.status });
};

const ev = (stream, seq, data = { n: seq }, epoch = E) => ({ type: "event", stream, seq, epoch, ts: 1, data });
const last = () => FakeWebSocket.all[FakeWebSocket.all.length - 1];

function collect() {
  const got = [];
  return { got, opts: { onEvent: (e) => { got.push(e); e.handled(); }, onError: (e) => got.push(e) } };
}

test("in order, once, gaps read over HTTP first, one batched v2 ack", async () => {
  FakeWebSocket.all = [];
  const c = zd.connect("http://h1", "tok1", { ackInterval: 30 });
  const a = collect();
  c.subscribe("s1", { after: 0, ...a.opts });
  const ws = last();
  assert.deepEqual(ws.protocols, ["zerodrop.v3", "zerodrop.v2", "zerodrop.v1"]);
  assert.equal(ws.url, "ws://h1/v1/ws?token=tok1");
  ws.accept("zerodrop.v2");
  ws.frame({ type: "welcome", resumeToken: "r1", protocol: "zerodrop.v2" });
  assert.deepEqual(ws.sent[0], { type: "subscribe", stream: "s1", after: 0 });
  ws.frame({ type: "subscribed", stream: "s1", epoch: E, headSeq: 0, fromSeq: 1 });
  fetchAnswer = (u) => ({
    status: 200,
    body: { stream: "s1", epoch: E, headSeq: 5, events: [ev("s1", 3), ev("s1", 4)].map(({ type, ...e }) => e) },
  });
  ws.frame(ev("s1", 1));
  ws.frame(ev("s1", 2));
  ws.frame(ev("s1", 1)); // a replay: dropped
  ws.frame(ev("s1", 5)); // 3 and 4 are missing: read first
  ws.frame(ev("s1", 5));
  await until("5 events", () => a.got.length >= 5);
  await sleep(80);
  assert.deepEqual(a.got.map((e) => e.seq), [1, 2, 3, 4, 5]);
  assert.deepEqual(a.got[2].data, { n: 3 });
  const f = fetches.find((f) => f.url.includes("/v1/streams/s1/events"));
  assert.ok(f.url.startsWith("http://h1/v1/streams/s1/events?after=2"), f.url);
  assert.equal(f.headers.Authorization, "Bearer tok1");
  const acks = ws.sent.filter((f) => f.type === "ack");
  assert.deepEqual(acks, [{ type: "ack", acks: { s1: 5 } }], JSON.stringify(ws.sent));
  c.close();
});

test("v1 acks one frame per stream; acks carry the highest handled seq without a hole", async () => {
  FakeWebSocket.all = [];
  const c = zd.connect("http://h1", "t", { ackInterval: 20 });
  const held = [];
  c.subscribe("a", { after: 0, onEvent: (e) => held.push(e) });
  c.subscribe("b", { after: 0, onEvent: (e) => e.handled() });
  const ws = last();
  ws.accept("zerodrop.v1");
  ws.frame({ type: "welcome", resumeToken: "r1" });
  ws.frame({ type: "subscribed", stream: "a", epoch: E, headSeq: 0, fromSeq: 1 });
  ws.frame({ type: "subscribed", stream: "b", epoch: E, headSeq: 0, fromSeq: 1 });
  for (const s of [1, 2, 3]) ws.frame(ev("a", s));
  ws.frame(ev("b", 1));
  await until("3 held", () => held.length === 3);
  held[0].handled();
  held[2].handled(); // 2 is not handled: the ack stays at 1
  await sleep(60);
  const acks = ws.sent.filter((f) => f.type === "ack");
  assert.deepEqual(
    acks.sort((x, y) => x.stream.localeCompare(y.stream)),
    [{ type: "ack", stream: "a", seq: 1 }, { type: "ack", stream: "b", seq: 1 }],
  );
  held[1].handled();
  await sleep(60);
  assert.deepEqual(ws.sent.filter((f) => f.type === "ack").pop(), { type: "ack", stream: "a", seq: 3 });
  c.close();
});

test("a dropped socket resumes with the newest token and lastAck; a reconnect frame moves to the next url at once", async () => {
  FakeWebSocket.all = [];
  const c = zd.connect(["http://h1", "http://h2"], "t", { ackInterval: 10, baseDelay: 20, maxDelay: 50 });
  const a = collect();
  c.subscribe("s", { after: 0, ...a.opts });
  let ws = last();
  ws.accept("zerodrop.v2");
  ws.frame({ type: "welcome", resumeToken: "r1" });
  ws.frame({ type: "subscribed", stream: "s", epoch: E, headSeq: 0, fromSeq: 1 });
  ws.frame(ev("s", 1));
  ws.frame(ev("s", 2));
  ws.frame({ type: "token", resumeToken: "r2" });
  await until("2 events", () => a.got.length === 2);
  ws.drop(1006);
  await until("a second socket", () => FakeWebSocket.all.length === 2, 2000);
  ws = last();
  assert.equal(ws.url, "ws://h2/v1/ws", "the next url, no token in the URL");
  ws.accept("zerodrop.v2");
  assert.deepEqual(ws.sent[0], { type: "resume", resumeToken: "r2", lastAck: { s: 2 } });
  ws.frame({ type: "welcome", resumeToken: "r3" });
  await sleep(10);
  assert.deepEqual(ws.sent.filter((f) => f.type === "subscribe"), [], "the session holds s: no subscribe");
  ws.frame({ type: "subscribed", stream: "s", epoch: E, headSeq: 3, fromSeq: 2 });
  ws.frame(ev("s", 2));
  ws.frame(ev("s", 3));
  ws.frame({ type: "reconnect", reason: "draining", resumeToken: "r4", retryAfterMs: 0 });
  await until("a third socket", () => FakeWebSocket.all.length === 3, 200);
  ws = last();
  assert.equal(ws.url, "ws://h1/v1/ws");
  ws.accept("zerodrop.v2");
  assert.deepEqual(ws.sent[0], { type: "resume", resumeToken: "r4", lastAck: { s: 3 } });
  assert.deepEqual(a.got.map((e) => e.seq), [1, 2, 3]);
  c.close();
});

test("stream and session errors end subscriptions with typed errors; transient ones do not", async () => {
  FakeWebSocket.all = [];
  const c = zd.connect("http://h1", "t", { baseDelay: 10 });
  const a = collect();
  const b = collect();
  const sa = c.subscribe("a", { after: 0, ...a.opts });
  const sb = c.subscribe("b", { after: 0, ...b.opts });
  let ws = last();
  ws.accept("zerodrop.v2");
  ws.frame({ type: "welcome", resumeToken: "r1" });
  ws.frame({ type: "subscribed", stream: "a", epoch: E, headSeq: 0, fromSeq: 1 });
  ws.frame({ type: "subscribed", stream: "b", epoch: E, headSeq: 0, fromSeq: 1 });
  ws.frame({ type: "error", code: "RATE_LIMITED", message: "slow down" });
  ws.frame({ type: "error", code: "REPLAY_WINDOW_TRIMMED", message: "x", stream: "a", firstAvailableSeq: 7 });
  const ea = await sa.ended;
  assert.ok(ea instanceof zd.ZerodropError);
  assert.equal(ea.code, "REPLAY_WINDOW_TRIMMED");
  assert.equal(ea.firstAvailableSeq, 7);
  assert.equal(sb.error, null, "the other stream goes on");
  ws.frame(ev("b", 1, { n: 1 }, "00000000000000bb"));
  const eb = await sb.ended;
  assert.equal(eb.code, "EPOCH_CHANGED");
  assert.equal(eb.epoch, "00000000000000bb");
  c.close();

  FakeWebSocket.all = [];
  const c2 = zd.connect("http://h1", "t", { baseDelay: 10 });
  const s1 = c2.subscribe("x", { after: 0 });
  const s2 = c2.subscribe("y", { after: 0 });
  ws = last();
  ws.accept("zerodrop.v2");
  ws.frame({ type: "welcome", resumeToken: "r1" });
  ws.drop(1006);
  await until("resume socket", () => FakeWebSocket.all.length === 2);
  ws = last();
  ws.accept("zerodrop.v2");
  ws.frame({ type: "error", code: "SESSION_NOT_FOUND", message: "gone" });
  ws.drop(4404);
  assert.equal((await s1.ended).code, "SESSION_NOT_FOUND");
  assert.equal((await s2.ended).code, "SESSION_NOT_FOUND");
  const it = s1[Symbol.asyncIterator]();
  await assert.rejects(it.next(), (e) => e.code === "SESSION_NOT_FOUND");
});

test("an event under a missing key waits with those after it, unacked, until the key arrives", async () => {
  FakeWebSocket.all = [];
  const v = e2e.cases[0];
  const c = zd.connect("http://h1", "t", { ackInterval: 10 });
  const a = collect();
  c.subscribe(v.stream, { after: 0, ...a.opts });
  const ws = last();
  ws.accept("zerodrop.v2");
  ws.frame({ type: "welcome", resumeToken: "r1" });
  ws.frame({ type: "subscribed", stream: v.stream, epoch: E, headSeq: 0, fromSeq: 1 });
  ws.frame(ev(v.stream, 1, "plain"));
  ws.frame(ev(v.stream, 2, v.sealed));
  ws.frame(ev(v.stream, 3, { n: 3 }));
  await sleep(60);
  assert.deepEqual(a.got.map((e) => e.seq), [1]);
  assert.deepEqual(ws.sent.filter((f) => f.type === "ack"), [{ type: "ack", acks: { [v.stream]: 1 } }]);
  await c.addKey(v.kid, bytes(v.key));
  await until("3 events", () => a.got.length === 3);
  assert.deepEqual(a.got.map((e) => [e.seq, e.encrypted]), [[1, false], [2, true], [3, false]]);
  assert.deepEqual(a.got[1].data, JSON.parse(v.plaintext));
  assert.equal(a.got[1].kid, v.kid);
  c.close();

  for (const [opts, code] of [[{ keyBufferEvents: 2 }, "KEY_BUFFER_FULL"], [{ keyTimeout: 50 }, "KEY_UNAVAILABLE"]]) {
    FakeWebSocket.all = [];
    const c3 = zd.connect("http://h1", "t", opts);
    const s = c3.subscribe(v.stream, { after: 0 });
    const w = last();
    w.accept("zerodrop.v2");
    w.frame({ type: "welcome", resumeToken: "r1" });
    w.frame({ type: "subscribed", stream: v.stream, epoch: E, headSeq: 0, fromSeq: 1 });
    w.frame(ev(v.stream, 1, v.sealed));
    if (code === "KEY_BUFFER_FULL") for (const n of [2, 3]) w.frame(ev(v.stream, n, v.sealed));
    assert.equal((await s.ended).code, code);
    c3.close();
  }
});

test("verify recomputes the digest of the events as served; a mismatch is DIVERGED", async () => {
  const d = JSON.parse(readFileSync(path.join(here, "..", "..", "..", "docs", "vectors", "stream-digest.json"), "utf8"));
  const k = d.cases.find((c) => c.events.length > 2);
  const c = zd.connect("http://h1", "t", { transport: "sse" });
  for (const [hash, ok] of [[k.hash, true], ["f".repeat(64), false]]) {
    fetchAnswer = (u) =>
      u.includes("/events")
        ? { status: 200, body: `{"stream":"vec:1","epoch":"x","headSeq":${k.headSeq},"events":[${k.events.join(",")}]}` }
        : { status: 200, body: { firstSeq: k.firstSeq, headSeq: k.headSeq, count: k.count, hash } };
    if (ok) assert.deepEqual(await c.verify("vec:1"), { count: k.count, hash: k.hash });
    else await assert.rejects(c.verify("vec:1"), (e) => e.code === "DIVERGED");
  }
  c.close();
});

class FakeEventSource {
  static all = [];
  constructor(url) {
    this.url = url;
    this.listeners = {};
    this.closed = false;
    FakeEventSource.all.push(this);
  }
  addEventListener(type, f) {
    (this.listeners[type] ??= []).push(f);
  }
  close() {
    this.closed = true;
  }
  // test side
  emit(type, data) {
    // As in browsers: a server event named `error` also reaches `onerror`.
    const ev = { data: typeof data === "string" ? data : JSON.stringify(data) };
    for (const f of this.listeners[type] ?? []) f(ev);
    this[`on${type}`]?.(ev);
  }
  fail() {
    this.onerror?.({});
  }
}
globalThis.EventSource = FakeEventSource;

/** The SDK's one SSE URL: every stream, the token, and the cursor of what was delivered. */
function sseUrl(base, streams, token, cursor) {
  const c = cursor ? `&lastEventId=${encodeURIComponent(cursor)}` : "";
  return `${base}/v1/sse?streams=${streams}&token=${token}${c}`;
}

test("SSE: events in order once, a dropped stream reopened at the next url after what was delivered, reset is typed", async () => {
  FakeEventSource.all = [];
  fetchAnswer = () => ({ status: 200, body: { events: [] } });
  const c = zd.connect(["http://h1", "http://h2"], "tk", { transport: "sse", baseDelay: 10 });
  const a = collect();
  const s = c.subscribe("s", { after: 0, ...a.opts });
  let es = FakeEventSource.all[0];
  assert.equal(es.url, sseUrl("http://h1", "s", "tk", ":s=0"));
  es.emit("event", ev("s", 1));
  es.emit("event", ev("s", 2));
  es.emit("event", ev("s", 2));
  es.fail();
  await until("a second EventSource", () => FakeEventSource.all.length === 2);
  assert.ok(es.closed);
  es = FakeEventSource.all[1];
  assert.equal(es.url, sseUrl("http://h2", "s", "tk", `${E}:s=2`));
  es.emit("event", ev("s", 3));
  await until("3 events", () => a.got.length === 3);
  assert.deepEqual(a.got.map((e) => e.seq), [1, 2, 3]);
  es.emit("reset", { stream: "s", code: "REPLAY_WINDOW_TRIMMED", epoch: E, firstAvailableSeq: 9 });
  const err = await s.ended;
  assert.equal(err.code, "REPLAY_WINDOW_TRIMMED");
  assert.equal(err.firstAvailableSeq, 9);
  c.close();
});

test("SSE: one EventSource for every subscription, reopened for a changed set from each stream's position; closed and reset per stream", async () => {
  FakeEventSource.all = [];
  fetchAnswer = () => ({ status: 200, body: { events: [] } });
  const c = zd.connect("http://h1", "tk", { transport: "sse", baseDelay: 5, maxDelay: 10 });
  const [a, b, d] = [collect(), collect(), collect()];
  const sa = c.subscribe("a", { after: 0, ...a.opts });
  const sb = c.subscribe("b", { after: 3, ...b.opts });
  const sd = c.subscribe("d", d.opts);
  await sleep(0);
  const open = () => FakeEventSource.all.filter((e) => !e.closed);
  assert.equal(open().length, 1, "one response for all three");
  let es = open()[0];
  // d has no position: it starts at the head (not in the cursor).
  assert.equal(es.url, sseUrl("http://h1", "a,b,d", "tk", ":a=0,b=3"));
  es.emit("event", ev("a", 1));
  es.emit("event", ev("b", 4));
  es.emit("event", ev("d", 7));
  es.emit("event", ev("a", 2));
  es.emit("event", ev("b", 4));
  await until("4 events", () => a.got.length + b.got.length + d.got.length === 4);
  assert.deepEqual(a.got.map((e) => e.seq), [1, 2]);
  assert.deepEqual(b.got.map((e) => e.seq), [4], "a repeat is dropped");
  assert.deepEqual(d.got.map((e) => e.seq), [7]);
  // A dropped response reopens with every stream's position and epoch.
  const n = FakeEventSource.all.length;
  es.fail();
  await until("a new EventSource", () => FakeEventSource.all.length === n + 1);
  es = open()[0];
  assert.equal(es.url, sseUrl("http://h1", "a,b,d", "tk", `${E}:a=2,b=4,d=7`));
  // One subscription closed by the client: reopened for the others.
  sb.close();
  await until("reopened without b", () => open()[0]?.url.includes("streams=a,d&"));
  es = open()[0];
  assert.equal(es.url, sseUrl("http://h1", "a,d", "tk", `${E}:a=2,d=7`));
  assert.equal(open().length, 1);
  // A stream the server closed ends alone, without a reopen; a reset fails only its stream.
  const m = FakeEventSource.all.length;
  es.emit("closed", { stream: "a", lastSeq: 2 });
  assert.equal((await sa.ended).code, "STREAM_CLOSED");
  es.emit("event", ev("d", 8));
  await until("d goes on", () => d.got.length === 2);
  await sleep(20);
  assert.equal(FakeEventSource.all.length, m, "no reopen for a closed stream");
  es.emit("reset", { stream: "d", code: "EPOCH_CHANGED", epoch: "00000000000000bb", firstAvailableSeq: 1 });
  assert.equal((await sd.ended).code, "EPOCH_CHANGED");
  await sleep(20);
  assert.equal(open().length, 0, "nothing left to carry");
  c.close();
});

test("closed: every event first, then the iteration ends with closedAt; on SSE the stream is not reopened; no onError", async () => {
  FakeEventSource.all = [];
  fetchAnswer = () => ({ status: 200, body: { events: [] } });
  const errors = [];
  const c = zd.connect("http://h1", "tk", { transport: "sse", baseDelay: 10, onError: (e) => errors.push(e) });
  let closedWith = null;
  const s = c.subscribe("s", { after: 0, onClosed: (n) => (closedWith = n) });
  const es = FakeEventSource.all[0];
  es.emit("event", ev("s", 1));
  es.emit("event", ev("s", 2));
  es.emit("closed", { stream: "s", lastSeq: 2 });
  const seen = [];
  for await (const e of s) {
    seen.push(e.seq);
    e.handled();
  }
  assert.deepEqual(seen, [1, 2], "the events before the close, then the end");
  assert.equal(s.closedAt, 2);
  assert.equal(closedWith, 2);
  assert.equal((await s.ended).code, "STREAM_CLOSED");
  assert.deepEqual(errors, [], "a close is not an error");
  assert.ok(es.closed);
  await sleep(50);
  assert.equal(FakeEventSource.all.length, 1, "a closed stream is not reopened");
  c.close();
});

test("auto: a WebSocket that never opens while HTTP gets through falls back to SSE; a 401 is UNAUTHORIZED", async () => {
  FakeWebSocket.all = [];
  FakeEventSource.all = [];
  fetchAnswer = () => ({ status: 200, body: { events: [] } });
  const c = zd.connect("http://h1", "tk", { baseDelay: 5, maxDelay: 10 });
  assert.equal(c.transport, "ws");
  const s = c.subscribe("s", { after: 4 });
  for (let i = 1; i <= 3; i++) {
    await until(`socket ${i}`, () => FakeWebSocket.all.length === i);
    last().drop(1006);
  }
  await until("an EventSource", () => FakeEventSource.all.length === 1);
  assert.equal(c.transport, "sse");
  assert.equal(FakeEventSource.all[0].url, sseUrl("http://h1", "s", "tk", ":s=4"));
  c.close();
  assert.equal((await s.ended).code, "CLOSED");

  FakeWebSocket.all = [];
  fetchAnswer = () => ({ status: 401, body: { error: { code: "UNAUTHORIZED", message: "expired" } } });
  const c2 = zd.connect("http://h1", "bad", { transport: "ws" });
  const s2 = c2.subscribe("s");
  last().drop(1006);
  assert.equal((await s2.ended).code, "UNAUTHORIZED");
});

test("a refresh is answered from the token provider; its token is then the one the SDK uses; without one the socket's end is TOKEN_EXPIRED", async () => {
  FakeWebSocket.all = [];
  fetches.length = 0;
  let asked = 0;
  const c = zd.connect("http://h1", "tok1", { tokenProvider: async () => `tok${++asked + 1}` });
  const a = collect();
  c.subscribe("s1", { after: 0, ...a.opts });
  let ws = last();
  ws.accept("zerodrop.v2");
  ws.frame({ type: "welcome", resumeToken: "r1", protocol: "zerodrop.v2" });
  ws.frame({ type: "subscribed", stream: "s1", epoch: E, headSeq: 0, fromSeq: 1 });
  ws.frame({ type: "refresh", exp: 100, deadline: 130 });
  await until("a refresh answer", () => ws.sent.some((f) => f.type === "refresh"));
  assert.deepEqual(ws.sent.find((f) => f.type === "refresh"), { type: "refresh", token: "tok2" });
  assert.equal(asked, 1);
  // The fresh token is the one the SDK reads with now (a gap read over HTTP).
  fetchAnswer = () => ({ status: 200, body: { stream: "s1", epoch: E, headSeq: 2, firstSeq: 1, events: [ev("s1", 1)] } });
  ws.frame(ev("s1", 2));
  await until("a gap read", () => fetches.length > 0);
  assert.equal(fetches[0].headers.Authorization, "Bearer tok2");
  c.close();

  // Without a provider, the refresh goes unanswered and the socket's end is TOKEN_EXPIRED.
  FakeWebSocket.all = [];
  const d = zd.connect("http://h1", "tok1", {});
  const b = collect();
  d.subscribe("s1", { after: 0, ...b.opts });
  ws = last();
  ws.accept("zerodrop.v2");
  ws.frame({ type: "welcome", resumeToken: "r1", protocol: "zerodrop.v2" });
  ws.frame({ type: "refresh", exp: 100, deadline: 130 });
  await sleep(20);
  assert.ok(!ws.sent.some((f) => f.type === "refresh"), "nothing to answer with");
  ws.frame({ type: "error", code: "TOKEN_EXPIRED", message: "expired" });
  ws.drop(4401);
  await until("the typed end", () => b.got.length > 0);
  assert.equal(b.got[0].code, "TOKEN_EXPIRED");
  d.close();
});

test("after TOKEN_EXPIRED the provider's fresh token resumes the session (resume {resumeToken, token}); a second expiry in a row is terminal", async () => {
  FakeWebSocket.all = [];
  let asked = 0;
  const c = zd.connect("http://h1", "tok1", { baseDelay: 10, maxDelay: 20, tokenProvider: async () => `tok${++asked + 1}` });
  const a = collect();
  c.subscribe("s1", { after: 0, ...a.opts });
  let ws = last();
  ws.accept("zerodrop.v2");
  ws.frame({ type: "welcome", resumeToken: "r1", protocol: "zerodrop.v2" });
  ws.frame({ type: "subscribed", stream: "s1", epoch: E, headSeq: 0, fromSeq: 1 });
  ws.frame(ev("s1", 1));
  await until("1 event", () => a.got.length === 1);
  ws.frame({ type: "error", code: "TOKEN_EXPIRED", message: "expired" });
  ws.drop(4401);
  await until("a resuming socket", () => FakeWebSocket.all.length === 2, 2000);
  ws = last();
  ws.accept("zerodrop.v2");
  assert.deepEqual(ws.sent[0], { type: "resume", resumeToken: "r1", lastAck: { s1: 1 }, token: "tok2" });
  ws.frame({ type: "welcome", resumeToken: "r2", protocol: "zerodrop.v2" });
  ws.frame({ type: "subscribed", stream: "s1", epoch: E, headSeq: 2, fromSeq: 2 });
  ws.frame(ev("s1", 2));
  await until("2 events", () => a.got.length === 2);
  assert.deepEqual(a.got.map((e) => e.seq), [1, 2], "no gap, no error");
  // The next drop resumes without a token (the fresh one is the session's now)...
  ws.drop(1006);
  await until("a third socket", () => FakeWebSocket.all.length === 3, 2000);
  ws = last();
  ws.accept("zerodrop.v2");
  assert.deepEqual(ws.sent[0], { type: "resume", resumeToken: "r2", lastAck: { s1: 2 } });
  // ...and a resume refused with TOKEN_EXPIRED even with a fresh token is terminal.
  ws.frame({ type: "error", code: "TOKEN_EXPIRED", message: "expired" });
  ws.drop(4401);
  await until("a fourth socket", () => FakeWebSocket.all.length === 4, 2000);
  ws = last();
  ws.accept("zerodrop.v2");
  assert.equal(ws.sent[0].token, "tok3");
  ws.frame({ type: "error", code: "TOKEN_EXPIRED", message: "expired again" });
  ws.drop(4401);
  await until("the typed end", () => a.got.length === 3);
  assert.equal(a.got[2].code, "TOKEN_EXPIRED");
  assert.equal(FakeWebSocket.all.length, 4, "no loop");
  c.close();
});

test("SSE: TOKEN_EXPIRED reopens with the provider's fresh token after what was delivered; REVOKED is terminal", async () => {
  FakeEventSource.all = [];
  let asked = 0;
  const c = zd.connect("http://h1", "tk1", { transport: "sse", baseDelay: 10, tokenProvider: async () => `tk${++asked + 1}` });
  const a = collect();
  const s = c.subscribe("s", { after: 0, ...a.opts });
  let es = FakeEventSource.all[0];
  es.emit("event", ev("s", 1));
  es.emit("error", { code: "TOKEN_EXPIRED", message: "expired" });
  await until("a reopened EventSource", () => FakeEventSource.all.length === 2);
  assert.ok(es.closed);
  es = FakeEventSource.all[1];
  assert.equal(es.url, sseUrl("http://h1", "s", "tk2", `${E}:s=1`));
  es.emit("event", ev("s", 2));
  await until("2 events", () => a.got.length === 2);
  assert.deepEqual(a.got.map((e) => e.seq), [1, 2]);
  assert.equal(asked, 1);
  es.emit("error", { code: "REVOKED", message: "access was revoked" });
  const err = await s.ended;
  assert.equal(err.code, "REVOKED");
  assert.equal(FakeEventSource.all.length, 2, "no reopen after REVOKED");
  c.close();
});

test("presence: a snapshot, only the frames after it, resumed from the last seq applied", async () => {
  FakeWebSocket.all = [];
  const m = (id) => ({ sub: `u-${id}`, sessionId: id, since: 1 });
  const pf = (seq, action, id, epoch = "p1") => ({ type: "presence", stream: "room:1", seq, epoch, action, member: m(id) });
  fetchAnswer = (u) =>
    u.includes("/presence?cursor=s_b")
      ? { status: 200, body: { stream: "room:1", epoch: "p1", presenceSeq: 3, occupancy: 3, members: [m("s_c")], nextCursor: null } }
      : { status: 200, body: { stream: "room:1", epoch: "p1", presenceSeq: 3, occupancy: 3, members: [m("s_a"), m("s_b")], nextCursor: "s_b" } };
  const c = zd.connect("http://h1", "tok1", { baseDelay: 10, maxDelay: 20 });
  const views = [];
  const sub = c.subscribe("room:1", { presence: true, onEvent: () => {}, onPresence: (ms) => views.push(ms.map((x) => x.sessionId)) });
  const ws = last();
  ws.accept("zerodrop.v2");
  ws.frame({ type: "welcome", resumeToken: "r1", sessionId: "s_me", protocol: "zerodrop.v2" });
  assert.deepEqual(ws.sent[0], { type: "subscribe", stream: "room:1", presence: true });
  ws.frame({ type: "subscribed", stream: "room:1", epoch: E, headSeq: 0, fromSeq: 1, presenceEpoch: "p1", presenceSeq: 2 });
  // Frames from the head (2) arrive while the snapshot (at 3) is read: 3 is in it already.
  ws.frame(pf(3, "join", "s_c"));
  ws.frame(pf(4, "leave", "s_a"));
  await until("the snapshot applied", () => views.length > 0);
  assert.deepEqual(sub.members.map((x) => x.sessionId), ["s_b", "s_c"]);
  ws.frame(pf(5, "join", "s_d"));
  await until("the join", () => sub.members.length === 3);
  // The socket drops: the resume carries the presence position; frames go on after it.
  ws.drop();
  await until("a second socket", () => FakeWebSocket.all.length === 2);
  const ws2 = last();
  ws2.accept("zerodrop.v2");
  await until("the resume frame", () => ws2.sent.length > 0);
  assert.deepEqual(ws2.sent[0].presence, { "room:1": { after: 5, epoch: "p1" } });
  ws2.frame({ type: "welcome", resumeToken: "r2", sessionId: "s_me", protocol: "zerodrop.v2" });
  ws2.frame({ type: "subscribed", stream: "room:1", epoch: E, headSeq: 0, fromSeq: 1, presenceEpoch: "p1", presenceSeq: 5 });
  ws2.frame(pf(6, "leave", "s_b"));
  await until("the leave", () => sub.members.length === 2);
  assert.deepEqual(sub.members.map((x) => x.sessionId), ["s_c", "s_d"]);
  // Another epoch: a fresh snapshot after subscribing again with presence from the head.
  const before = ws2.sent.length;
  ws2.frame(pf(1, "join", "s_z", "p2"));
  assert.deepEqual(ws2.sent[before], { type: "subscribe", stream: "room:1", after: 0, epoch: E, presence: true });
  // A presence error stops only the presence frames: the subscription goes on.
  ws2.frame({ type: "error", code: "NOT_FOUND", message: "x", stream: "room:1", presence: true });
  assert.equal(sub.error, null);
  c.close();
});

test("history: backward and forward pages with the token, typed refusals, bounded retries", async () => {
  const c = zd.connect(["http://h1", "http://h2"], "tk", {});
  const page = (order, seqs) => ({
    status: 200,
    body: { stream: "s", epoch: E, headSeq: 12, firstSeq: 3, order, events: seqs.map((n) => ev("s", n)) },
  });
  fetches.length = 0;
  fetchAnswer = () => page("desc", [9, 8, 7]);
  const back = await c.history("s", { before: 10, limit: 3 });
  assert.equal(fetches[0].url, "http://h1/v1/streams/s/events?before=10&limit=3");
  assert.equal(fetches[0].headers.Authorization, "Bearer tk");
  assert.equal(back.order, "desc");
  assert.deepEqual(back.events.map((e) => e.seq), [9, 8, 7]);
  assert.deepEqual(back.events[0].data, { n: 9 });
  assert.equal(back.events[0].encrypted, false);
  assert.deepEqual([back.headSeq, back.firstSeq, back.epoch], [12, 3, E]);

  fetchAnswer = () => page("asc", [4, 5]);
  const fwd = await c.history("s", { sinceTs: 1700000000000, limit: 2 }, { epoch: E });
  assert.equal(fetches[1].url, `http://h1/v1/streams/s/events?since_ts=1700000000000&limit=2&epoch=${E}`);
  assert.deepEqual(fwd.events.map((e) => e.seq), [4, 5]);
  await c.history("s", { last: 5 });
  assert.equal(fetches[2].url, "http://h1/v1/streams/s/events?last=5");

  // Bad queries never reach the server.
  for (const q of [{ before: 3, after: 1 }, {}, { before: -1 }, { last: 1.5 }]) {
    await assert.rejects(c.history("s", q), (e) => e.code === "INVALID_REQUEST");
  }
  assert.equal(fetches.length, 3);

  fetchAnswer = () => ({ status: 409, body: { error: { code: "REPLAY_WINDOW_TRIMMED", message: "trimmed", firstAvailableSeq: 3 } } });
  await assert.rejects(c.history("s", { before: 2 }), (e) => e.code === "REPLAY_WINDOW_TRIMMED" && e.firstAvailableSeq === 3);
  assert.equal(fetches.length, 4, "a typed refusal is not retried");

  fetchAnswer = () => ({ status: 503, body: { error: { code: "STORE_UNAVAILABLE", message: "down" } } });
  await assert.rejects(c.history("s", { last: 1 }), (e) => e.code === "UNAVAILABLE" && e.stream === "s");
  assert.deepEqual(fetches.slice(4).map((f) => new URL(f.url).host), ["h1", "h2", "h1"]);
  c.close();
});

// ----------------------------------------------------------------------------- byte payloads

const b64 = (b) => Buffer.from(b).toString("base64");
const isBytes = (d, want) => d instanceof Uint8Array && Buffer.from(d).equals(Buffer.from(want));

test("v3: a binary event is a Uint8Array of its exact bytes, in order among text events; acks, gap repair and resume go over it", async () => {
  FakeWebSocket.all = [];
  const c = zd.connect("http://h1", "t", { ackInterval: 20, baseDelay: 10, maxDelay: 20 });
  const a = collect();
  const sub = c.subscribe("s", { after: 0, ...a.opts });
  let ws = last();
  assert.equal(ws.binaryType, "arraybuffer", "binary messages arrive as ArrayBuffers");
  ws.accept("zerodrop.v3");
  ws.frame({ type: "welcome", resumeToken: "r1", protocol: "zerodrop.v3" });
  ws.frame({ type: "subscribed", stream: "s", epoch: E, headSeq: 0, fromSeq: 1 });
  const head = (seq) => ({ type: "event", stream: "s", seq, epoch: E, ts: 1 });
  const odd = [0x00, 0x0a, 0xff, 0x0a, 0x41];
  ws.frame(ev("s", 1));
  ws.binary(head(2), Uint8Array.from(odd));
  ws.binary(head(3)); // an empty payload
  ws.frame(ev("s", 4));
  ws.binary(head(2), Uint8Array.from([9])); // a replay: dropped
  // Malformed binary frames are ignored like malformed text ones (a `closed` header too).
  const te = new TextEncoder();
  for (const bad of ["no newline", "not json\n\x00", "[1]\nx", '{"type":"closed","stream":"s","lastSeq":4}\n']) {
    ws.binary(te.encode(bad));
  }
  ws.binary(Uint8Array.from([0xff, 0xfe, 0x0a, 1])); // a header that is not UTF-8
  fetchAnswer = () => ({
    status: 200,
    body: { stream: "s", epoch: E, headSeq: 6, events: [{ stream: "s", seq: 5, epoch: E, ts: 1, data: { $base64: "AQI=" } }] },
  });
  ws.binary(head(6), Uint8Array.from([6])); // 5 is missing: read over HTTP first
  await until("6 events", () => a.got.length >= 6);
  await sleep(60);
  assert.deepEqual(a.got.map((e) => e.seq), [1, 2, 3, 4, 5, 6]);
  assert.deepEqual(a.got.map((e) => e.data instanceof Uint8Array), [false, true, true, false, true, true]);
  assert.deepEqual(a.got[0].data, { n: 1 });
  assert.ok(isBytes(a.got[1].data, odd));
  assert.equal(a.got[1].data.buffer.byteLength, odd.length, "the payload has a buffer of its own");
  assert.ok(isBytes(a.got[2].data, []));
  assert.deepEqual(a.got[3].data, { n: 4 });
  assert.ok(isBytes(a.got[4].data, [1, 2]), "a repaired gap's byte payload too");
  assert.ok(isBytes(a.got[5].data, [6]));
  assert.equal(sub.error, null);
  assert.deepEqual(ws.sent.filter((f) => f.type === "ack"), [{ type: "ack", acks: { s: 6 } }]);
  assert.deepEqual(sub.position, { epoch: E, seq: 6 });
  ws.drop(1006);
  await until("a second socket", () => FakeWebSocket.all.length === 2);
  ws = last();
  ws.accept("zerodrop.v3");
  assert.deepEqual(ws.sent[0], { type: "resume", resumeToken: "r1", lastAck: { s: 6 } });
  c.close();
});

test("v2: data that is exactly {$base64} is a Uint8Array (sealed too); other objects stay objects", async () => {
  const v = e2e.cases[0];
  const key = await zd.importKey(bytes(v.key));
  const sealed = await zd.sealText(key, v.kid, v.stream, JSON.stringify({ $base64: "AP8=" }));
  FakeWebSocket.all = [];
  const c = zd.connect("http://h1", "t", {});
  await c.addKey(v.kid, bytes(v.key));
  const a = collect();
  c.subscribe(v.stream, { after: 0, ...a.opts });
  const ws = last();
  ws.accept("zerodrop.v2");
  ws.frame({ type: "welcome", resumeToken: "r1", protocol: "zerodrop.v2" });
  ws.frame({ type: "subscribed", stream: v.stream, epoch: E, headSeq: 0, fromSeq: 1 });
  const kept = [
    { $base64: "AAEC/w==", x: 1 }, // another key beside it
    { $base64: 5 },
    { $base64: "!!" }, // not base64
    { $base64: "AAEC/w" }, // not padded
    [{ $base64: "AA==" }],
    { a: { $base64: "AA==" } },
    "AA==",
  ];
  [{ $base64: "AAEC/w==" }, { $base64: "" }, sealed, ...kept].forEach((d, i) => ws.frame(ev(v.stream, i + 1, d)));
  await until("every event", () => a.got.length === 3 + kept.length);
  assert.ok(isBytes(a.got[0].data, [0, 1, 2, 255]));
  assert.ok(isBytes(a.got[1].data, []));
  assert.ok(isBytes(a.got[2].data, [0, 255]), "a sealed {$base64} opens to bytes");
  assert.deepEqual([a.got[2].encrypted, a.got[2].kid], [true, v.kid]);
  assert.deepEqual(a.got.slice(3).map((e) => e.data), kept);
  assert.equal(zd.bytesOf(kept[0]), kept[0]);
  assert.ok(isBytes(zd.bytesOf({ $base64: "AQID" }), [1, 2, 3]));
  c.close();
});

test("SSE and history: byte payloads are Uint8Array, on one stream and several, sealed or not", async () => {
  FakeEventSource.all = [];
  fetchAnswer = () => ({ status: 200, body: { events: [] } });
  const v = e2e.cases[0];
  const c = zd.connect("http://h1", "tk", { transport: "sse" });
  await c.addKey(v.kid, bytes(v.key));
  const [a, b] = [collect(), collect()];
  c.subscribe("a", { after: 0, ...a.opts });
  let es = FakeEventSource.all[0];
  es.emit("event", ev("a", 1, { $base64: "AAr/" }));
  await until("a's first event", () => a.got.length === 1);
  c.subscribe("b", { after: 0, ...b.opts });
  await until("reopened for a and b", () => FakeEventSource.all.some((e) => !e.closed && e.url.includes("streams=a,b&")));
  es = FakeEventSource.all.find((e) => !e.closed);
  es.emit("event", ev("b", 1, { $base64: "" }));
  es.emit("event", ev("a", 2, { $base64: "AAr/", n: 2 }));
  es.emit("event", ev("b", 2, { $base64: "/w==" }));
  await until("4 events", () => a.got.length + b.got.length === 4);
  assert.ok(isBytes(a.got[0].data, [0, 10, 255]));
  assert.deepEqual(a.got[1].data, { $base64: "AAr/", n: 2 });
  assert.ok(isBytes(b.got[0].data, []));
  assert.ok(isBytes(b.got[1].data, [255]));

  const key = await zd.importKey(bytes(v.key));
  const sealed = await zd.sealText(key, v.kid, "s", JSON.stringify({ $base64: "AAEC" }));
  const datas = [{ $base64: "AP8=" }, { $base64: "AP8=", n: 1 }, sealed, { n: 4 }];
  fetchAnswer = () => ({
    status: 200,
    body: { stream: "s", epoch: E, headSeq: 4, firstSeq: 1, order: "asc", events: datas.map((d, i) => ev("s", i + 1, d)) },
  });
  const page = await c.history("s", { after: 0 });
  assert.ok(isBytes(page.events[0].data, [0, 255]));
  assert.deepEqual(page.events[1].data, { $base64: "AP8=", n: 1 });
  assert.ok(isBytes(page.events[2].data, [0, 1, 2]));
  assert.equal(page.events[2].encrypted, true);
  assert.deepEqual(page.events[3].data, { n: 4 });
  c.close();
});

test("publish: bytes are one binary frame (header, LF, bytes) on v3 resolving with the seq; the {$base64} text form on v2, v1 and when sealed", async () => {
  const big = Uint8Array.from({ length: 100_000 }, (_, i) => (i * 7919) % 256);
  const payloads = [Uint8Array.from([0, 10, 255, 10]), new Uint8Array(), Uint8Array.from([1, 2, 3]).buffer, big];
  for (const protocol of ["zerodrop.v3", "zerodrop.v2", "zerodrop.v1"]) {
    FakeWebSocket.all = [];
    const c = zd.connect("http://h1", "t", {});
    const ws = last();
    ws.accept(protocol);
    ws.frame({ type: "welcome", resumeToken: "r1", protocol });
    const results = payloads.map((p, i) => c.publish("room:c", p, `b-${i}`));
    const publishes = () => ws.sent.filter((f) => f.type === "publish");
    await until("every publish", () => ws.sentBinary.length + publishes().length === payloads.length);
    if (protocol === "zerodrop.v3") {
      assert.deepEqual(publishes(), []);
      ws.sentBinary.forEach(({ frame, header, bytes: got }, i) => {
        assert.deepEqual(header, { type: "publish", stream: "room:c", id: `b-${i}` });
        assert.ok(isBytes(got, new Uint8Array(payloads[i])), `payload ${i}`);
        // Exactly: the compact JSON header, one LF, the bytes.
        assert.ok(Buffer.from(frame).equals(Buffer.from(binaryFrame(header, got))), `frame ${i}`);
      });
    } else {
      assert.deepEqual(ws.sentBinary, []);
      assert.deepEqual(
        publishes(),
        payloads.map((p, i) => ({ type: "publish", stream: "room:c", data: { $base64: b64(new Uint8Array(p)) }, id: `b-${i}` })),
      );
    }
    payloads.forEach((_, i) => ws.frame({ type: "published", stream: "room:c", seq: i + 1, id: `b-${i}` }));
    assert.deepEqual(await Promise.all(results), [1, 2, 3, 4]);
    // A refused bytes publish is typed like a refused text one.
    const refused = c.publish("other:1", Uint8Array.from([0]), "b-9");
    await until("the refused publish", () => ws.sentBinary.length + publishes().length === payloads.length + 1);
    ws.frame({ type: "error", code: "FORBIDDEN", message: "x", stream: "other:1", id: "b-9" });
    await assert.rejects(refused, (e) => e.code === "FORBIDDEN");
    c.close();
  }

  // With a publish key, bytes are sealed as their {$base64} object, in a text frame.
  const v = e2e.cases[0];
  FakeWebSocket.all = [];
  const c = zd.connect("http://h1", "t", {});
  await c.addKey(v.kid, bytes(v.key));
  c.setPublishKey(v.kid);
  const ws = last();
  ws.accept("zerodrop.v3");
  ws.frame({ type: "welcome", resumeToken: "r1", protocol: "zerodrop.v3" });
  const p = c.publish(v.stream, Uint8Array.from([0, 255]), "s-1");
  await until("the sealed publish", () => ws.sent.some((f) => f.type === "publish"));
  assert.deepEqual(ws.sentBinary, []);
  const f = ws.sent.find((f) => f.type === "publish");
  assert.ok(zd.isSealed(f.data));
  assert.equal(await zd.openText(await zd.importKey(bytes(v.key)), v.stream, f.data), '{"$base64":"AP8="}');
  assert.ok(isBytes((await c.open(v.stream, f.data)).data, [0, 255]));
  ws.frame({ type: "published", stream: v.stream, seq: 7, id: "s-1" });
  assert.equal(await p, 7);
  c.close();
});
