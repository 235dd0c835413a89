// The e2e and stream-digest vectors (docs/vectors/) against the compiled module.
// ZERODROP_JS_DIST names the directory tsc wrote zerodrop.js to (default: ../dist).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath, pathToFileURL } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const dist = process.env.ZERODROP_JS_DIST
  ? path.resolve(process.env.ZERODROP_JS_DIST)
  : path.join(here, "..", "dist");
const zd = await import(pathToFileURL(path.join(dist, "zerodrop.js")).href);
const vectors = (name) =>
  JSON.parse(readFileSync(path.join(here, "..", "..", "..", "docs", "vectors", name), "utf8"));

const bytes = (h) => Uint8Array.from(h.match(/../g).map((x) => parseInt(x, 16)));

test("every sealed e2e vector opens to its plaintext and seals back to the same bytes", async () => {
  const v = vectors("e2e-aes256gcm.json");
  assert.ok(v.cases.length >= 4);
  for (const c of v.cases) {
    const key = await zd.importKey(bytes(c.key));
    assert.equal(await zd.openText(key, c.stream, c.sealed), c.plaintext, c.name);
    const sealed = await zd.sealText(key, c.kid, c.stream, c.plaintext, bytes(c.nonce));
    assert.deepEqual(sealed, c.sealed, c.name);
    assert.ok(zd.isSealed(c.sealed));
  }
});

test("every invalid e2e vector is refused with its error code", async () => {
  const v = vectors("e2e-aes256gcm.json");
  assert.ok(v.invalid.length >= 5);
  for (const c of v.invalid) {
    const key = await zd.importKey(bytes(c.key));
    await assert.rejects(
      zd.openText(key, c.stream, c.sealed),
      (e) => e instanceof zd.ZerodropError && e.code === c.error,
      c.name,
    );
  }
});

test("the client opens sealed data with the keys it was given and passes plain data through", async () => {
  const v = vectors("e2e-aes256gcm.json");
  const c = v.cases[0];
  const client = zd.connect("http://127.0.0.1:9", "t", { transport: "sse" });
  await assert.rejects(client.open(c.stream, c.sealed), (e) => e.code === "KEY_UNAVAILABLE");
  await client.addKey(c.kid, bytes(c.key));
  const opened = await client.open(c.stream, c.sealed);
  assert.deepEqual(opened, { data: JSON.parse(c.plaintext), encrypted: true, kid: c.kid });
  assert.deepEqual(await client.open(c.stream, { text: "plain" }), { data: { text: "plain" }, encrypted: false });
  client.setPublishKey(c.kid);
  const sealed = await client.seal(c.stream, { a: 1 });
  assert.deepEqual((await client.open(c.stream, sealed)).data, { a: 1 });
  assert.notEqual(sealed.n, (await client.seal(c.stream, { a: 1 })).n, "a fresh nonce per event");
  client.close();
});

test("every stream-digest vector recomputes to its hash and count", async () => {
  const v = vectors("stream-digest.json");
  assert.ok(v.cases.length >= 4);
  for (const c of v.cases) {
    assert.equal(c.events.length, c.count, c.name);
    assert.equal(await zd.streamDigest(c.events), c.hash, c.name);
    // The same events spliced into a page as the server serves them are split back exactly.
    const body = `{"stream":"vec:1","epoch":"3f9a0c1d2e4b5a67","headSeq":${c.headSeq},"events":[${c.events.join(",")}]}`;
    assert.deepEqual(zd.rawEvents(body), c.events, c.name);
  }
  const one = v.cases.find((c) => c.events.length > 1);
  assert.notEqual(await zd.streamDigest(one.events.slice().reverse()), one.hash, "order matters");
});
