// The browser SDK held to the server's recorded sessions
// (crates/zerodrop-server/tests/fixtures/{v1,v2,v3}/*.jsonl, replayed against the real server
// by crates/zerodrop-server/tests/compat.rs): every recorded server frame goes through the SDK's
// frame handling on a scripted socket of that subprotocol, and every frame the SDK sends has
// the shape of a recorded client frame the server accepted. On v3 `recvBinary` is a binary
// frame the server sent (`header`, LF, the bytes of `base64`) and `sendBinary` one a client
// sent (`raw`: a deliberately malformed whole frame, never an SDK shape).
// The scripted socket and the compiled SDK come from scripted.mjs.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import path from "node:path";
import { E, FakeWebSocket, here, sleep, until, zd } from "./scripted.mjs";

const fixtures = path.join(here, "..", "..", "..", "crates", "zerodrop-server", "tests", "fixtures");
const T = 1733450000000;
globalThis.fetch = async () => new Response("{}", { status: 500 });
const last = () => FakeWebSocket.all[FakeWebSocket.all.length - 1];

/** Every recorded session of a set: `[{file, steps}]`. */
function sessions(set) {
  const dir = path.join(fixtures, set);
  return readdirSync(dir)
    .filter((f) => f.endsWith(".jsonl"))
    .sort()
    .map((file) => ({
      file,
      steps: readFileSync(path.join(dir, file), "utf8")
        .split("\n")
        .filter((l) => l.trim())
        .map((l) => JSON.parse(l)),
    }));
}

/** A recorded server frame with concrete values where the recording has `"*"`. */
let tokens = 0;
function materialize(f) {
  const values = {
    epoch: E,
    ts: 1,
    t: T,
    resumeToken: `r-${++tokens}`,
    sessionId: "s_1",
    instance: "i1",
    message: "recorded",
  };
  const out = {};
  for (const [k, v] of Object.entries(f)) out[k] = v === "*" && k in values ? values[k] : v;
  return out;
}

/** A frame's shape: its keys, the tag's value, and the JSON kind of every other value
 *  (`data` and `t` carry any JSON; `acks` and `lastAck` are maps of stream to seq). */
function shape(f) {
  const kind = (k, v) => {
    if (k === "type") return JSON.stringify(v);
    if (k === "data" || k === "t") return "json";
    if (v === null) return "null";
    if (Array.isArray(v)) return "array";
    if (typeof v === "object") return Object.values(v).every((x) => typeof x === "number") ? "map<number>" : "object";
    return typeof v;
  };
  return Object.keys(f)
    .sort()
    .map((k) => `${k}:${kind(k, f[k])}`)
    .join(",");
}

/** A client frame's shape; a binary one (`{$binary: header}`) is its header's, marked. */
const frameShape = (f) => (f.$binary ? `binary:${shape(f.$binary)}` : shape(f));

/** The shapes of the client frames a set records the server accepting: every `send` (or
 *  well-formed `sendBinary`) that is not answered by a refusal of the frame itself. */
function acceptedShapes(set) {
  const ok = new Set();
  for (const { steps } of sessions(set)) {
    steps.forEach((s, i) => {
      const f = s.sendBinary?.header ? { $binary: s.sendBinary.header } : s.send;
      if (!f || typeof f !== "object") return;
      const next = steps[i + 1]?.recv;
      const refused = next?.type === "error" && ["INVALID_REQUEST", "INVALID_STREAM_ID"].includes(next.code);
      if (!refused) ok.add(frameShape(f));
    });
  }
  return ok;
}

/** The recorded sessions cut at each `connect`: the server frames each socket received (a
 *  binary one as its header with `$bytes`, the payload's base64). */
function sockets(steps) {
  const out = [];
  for (const s of steps) {
    if (s.connect !== undefined) out.push([]);
    const f = s.recv ?? s.await ?? (s.recvBinary && { ...s.recvBinary.header, $bytes: s.recvBinary.base64 });
    if (f && out.length) out[out.length - 1].push(f);
  }
  return out;
}

/** An event's data as the application must see it: a byte payload (binary, or exactly
 *  `{"$base64"}`) as its bytes, anything else as JSON. */
const isPayload = (d) => typeof d === "object" && d !== null && Object.keys(d).join() === "$base64";
const wanted = (f) => (f.$bytes !== undefined ? `bytes:${f.$bytes}` : isPayload(f.data) ? `bytes:${f.data.$base64}` : JSON.stringify(f.data));
const seen = (d) => (d instanceof Uint8Array ? `bytes:${Buffer.from(d).toString("base64")}` : JSON.stringify(d));

const protocols = { v1: "zerodrop.v1", v2: "zerodrop.v2", v3: "zerodrop.v3" };
const sentBySet = { v1: [], v2: [], v3: [] };
/** Keeps what a socket sent, text and binary, for the shape check. */
const record = (set, ws) => sentBySet[set].push(...ws.sent, ...ws.sentBinary.map((b) => ({ $binary: b.header })));

for (const [set, protocol] of Object.entries(protocols)) {
  for (const { file, steps } of sessions(set)) {
    test(`${set}/${file}: every recorded server frame is handled by the SDK`, async () => {
      for (const frames of sockets(steps)) {
        FakeWebSocket.all = [];
        const c = zd.connect("http://h1", "tok", { ackInterval: 10, baseDelay: 10, maxDelay: 20 });
        const streams = [...new Set(frames.filter((f) => f.stream && f.type !== "error").map((f) => f.stream))];
        const got = [];
        const ended = new Map();
        for (const s of streams) {
          // From the head: the recorded `subscribed` frame says where the socket starts.
          const sub = c.subscribe(s, { onEvent: (e) => { got.push(e); e.handled(); } });
          sub.ended.then((e) => ended.set(s, e));
        }
        // Closed even when an assertion fails: a client left open retries its gap reads forever.
        try {
          const ws = last();
          ws.accept(protocol);
          const want = [];
          const failed = new Set();
          const closed = new Map();
          for (const f of frames) {
            const before = ws.sent.length;
            const { $bytes, ...frame } = materialize(f);
            if ($bytes !== undefined) ws.binary(frame, Buffer.from($bytes, "base64"));
            else ws.frame(frame);
            if (f.type === "ping") {
              assert.deepEqual(ws.sent.slice(before), [{ type: "pong", t: T }], "a ping is answered with its t");
            }
            if (f.type === "event" && !failed.has(f.stream)) want.push(`${f.stream}:${f.seq}:${wanted(f)}`);
            // A presence error (`presence: true`) stops only the presence frames; the events go on.
            if (f.type === "error" && streams.includes(f.stream) && f.code !== "INVALID_REQUEST" && f.presence !== true) {
              failed.add(f.stream);
            }
            if (f.type === "closed") closed.set(f.stream, f.lastSeq);
            if (f.type === "reconnect") {
              await until("the socket closed for the drain", () => ws.readyState === 3);
              await until("a socket to the next url", () => FakeWebSocket.all.length === 2);
              const next = last();
              next.accept(protocol);
              assert.deepEqual(next.sent[0]?.type, "resume", "the drain's token resumes the session");
              assert.equal(next.sent[0].resumeToken, `r-${tokens}`);
              record(set, next);
            }
          }
          await until("every event delivered", () => got.length >= want.length);
          await sleep(30); // the ack interval runs
          assert.deepEqual(got.map((e) => `${e.stream}:${e.seq}:${seen(e.data)}`), want);
          for (const s of failed) {
            await until(`the ${s} subscription ended`, () => ended.has(s));
            assert.ok(ended.get(s) instanceof zd.ZerodropError);
          }
          // A closed stream ends its subscription after its events, with the last seq.
          for (const [s, lastSeq] of closed) {
            await until(`the ${s} subscription ended at its close`, () => ended.has(s));
            assert.equal(ended.get(s).code, "STREAM_CLOSED");
            assert.equal(ended.get(s).headSeq, lastSeq);
          }
          record(set, ws);
        } finally {
          c.close();
        }
      }
    });
  }

  test(`${set}: publish, unsubscribe and resume are sent in a recorded shape`, async () => {
    FakeWebSocket.all = [];
    const c = zd.connect("http://h1", "tok", { ackInterval: 10, baseDelay: 10, maxDelay: 20 });
    const sub = c.subscribe("room:1", { after: 0, onEvent: (e) => e.handled() });
    let ws = last();
    ws.accept(protocol);
    ws.frame({ type: "welcome", resumeToken: "r1", protocol });
    ws.frame({ type: "subscribed", stream: "room:1", epoch: E, headSeq: 1, fromSeq: 1 });
    ws.frame({ type: "event", stream: "room:1", seq: 1, epoch: E, ts: 1, data: { n: 1 } });
    const published = c.publish("room:2", { n: 1 }, "p-1");
    await until("a publish frame", () => ws.sent.some((f) => f.type === "publish"));
    ws.frame({ type: "published", stream: "room:2", seq: 1, id: "p-1" });
    assert.equal(await published, 1);
    // Bytes: one binary frame on v3, the `{"$base64"}` text form before it.
    const bytes = c.publish("room:2", new Uint8Array([0, 10, 255]), "p-2");
    await until("a bytes publish", () => ws.sentBinary.length + ws.sent.filter((f) => f.type === "publish").length === 2);
    if (set === "v3") assert.deepEqual(ws.sentBinary.map((b) => [b.header.id, [...b.bytes]]), [["p-2", [0, 10, 255]]]);
    else assert.deepEqual(ws.sent.filter((f) => f.id === "p-2").map((f) => f.data), [{ $base64: "AAr/" }]);
    ws.frame({ type: "published", stream: "room:2", seq: 2, id: "p-2" });
    assert.equal(await bytes, 2);
    await until("an ack", () => ws.sent.some((f) => f.type === "ack"));
    ws.drop(1006);
    await until("a second socket", () => FakeWebSocket.all.length === 2);
    record(set, ws);
    ws = last();
    ws.accept(protocol);
    assert.equal(ws.sent[0]?.type, "resume");
    ws.frame({ type: "welcome", resumeToken: "r2", protocol });
    ws.frame({ type: "subscribed", stream: "room:1", epoch: E, headSeq: 1, fromSeq: 2 });
    sub.close();
    await until("an unsubscribe", () => ws.sent.some((f) => f.type === "unsubscribe"));
    record(set, ws);
    c.close();
  });

  test(`${set}: every frame the SDK sent has the shape of a frame the server accepted`, () => {
    const accepted = acceptedShapes(set);
    const sent = sentBySet[set];
    const types = new Set(sent.map((f) => f.type));
    // The v1 recordings predate server pings in fixtures: a pong is held to v2's.
    const expected = ["subscribe", "ack", "publish", "resume", "unsubscribe"];
    for (const t of set === "v1" ? expected : [...expected, "pong"]) {
      assert.ok(types.has(t), `the runs above made the SDK send no ${t} on ${set}`);
    }
    assert.equal(sent.some((f) => f.$binary), set === "v3", "binary frames are sent on v3 only");
    for (const f of sent) {
      assert.ok(accepted.has(frameShape(f)), `${set}: ${JSON.stringify(f)} has no recorded shape (${frameShape(f)})`);
    }
  });
}
