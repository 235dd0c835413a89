// What the scripted-socket tests share: the compiled SDK (ZERODROP_JS_DIST names the directory
// tsc wrote zerodrop.js to; default ../dist), a bounded wait, and a WebSocket the test drives
// (installed as the global WebSocket).
import { fileURLToPath, pathToFileURL } from "node:url";
import path from "node:path";

export const here = path.dirname(fileURLToPath(import.meta.url));
const dist = process.env.ZERODROP_JS_DIST
  ? path.resolve(process.env.ZERODROP_JS_DIST)
  : path.join(here, "..", "dist");
export const zd = await import(pathToFileURL(path.join(dist, "zerodrop.js")).href);

export const E = "00000000000000aa";
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export async function until(what, f, ms = 3000) {
  const end = Date.now() + ms;
  while (!f()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** A `zerodrop.v3` binary frame: the header as compact JSON, LF, the bytes. */
export function binaryFrame(header, bytes) {
  const h = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(h.length + 1 + bytes.length);
  out.set(h);
  out[h.length] = 0x0a;
  out.set(bytes, h.length + 1);
  return out;
}

export class FakeWebSocket {
  static OPEN = 1;
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.protocol = "";
    this.binaryType = "blob"; // a browser's default
    this.sent = [];
    /** Binary frames sent: `{frame, header, bytes}` (the header parsed, the bytes after the first LF). */
    this.sentBinary = [];
    FakeWebSocket.all.push(this);
  }
  send(d) {
    if (typeof d === "string") return this.sent.push(JSON.parse(d));
    const frame = new Uint8Array(ArrayBuffer.isView(d) ? d.buffer.slice(d.byteOffset, d.byteOffset + d.byteLength) : d);
    const lf = frame.indexOf(0x0a);
    this.sentBinary.push({ frame, header: JSON.parse(new TextDecoder().decode(frame.subarray(0, lf))), bytes: frame.slice(lf + 1) });
  }
  close(code = 1000) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code }));
  }
  // test side
  accept(protocol) {
    this.readyState = 1;
    this.protocol = protocol;
    this.onopen?.({});
  }
  frame(f) {
    this.onmessage?.({ data: JSON.stringify(f) });
  }
  /** A binary message, as a browser gives it: an ArrayBuffer with `binaryType` "arraybuffer",
   *  else a Blob. `header` is an object (sent as header, LF, bytes) or the whole frame's bytes. */
  binary(header, bytes = new Uint8Array()) {
    const frame = header instanceof Uint8Array ? header : binaryFrame(header, bytes);
    const buf = frame.buffer.slice(frame.byteOffset, frame.byteOffset + frame.byteLength);
    this.onmessage?.({ data: this.binaryType === "arraybuffer" ? buf : new Blob([buf]) });
  }
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code });
  }
}
globalThis.WebSocket = FakeWebSocket;
