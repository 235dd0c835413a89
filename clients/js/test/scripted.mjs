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

export class FakeWebSocket {
  static OPEN = 1;
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.protocol = "";
    this.sent = [];
    FakeWebSocket.all.push(this);
  }
  send(d) {
    this.sent.push(JSON.parse(d));
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
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code });
  }
}
globalThis.WebSocket = FakeWebSocket;
