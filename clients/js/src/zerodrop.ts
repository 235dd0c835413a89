// zerodrop browser SDK: ordered, exactly-once delivery over WebSocket (or SSE) with resume,
// gap repair, batched acks, typed terminal errors, a consistency check and opt-in
// end-to-end encryption. No runtime dependencies: WebSocket, EventSource, fetch, WebCrypto.
// Behaviour: docs/sdk.md. Wire format: docs/protocol.md.

/** Codes that end a subscription (docs/sdk.md, "Typed, terminal errors"). */
export type ErrorCode =
  | "EPOCH_CHANGED"
  | "REPLAY_WINDOW_TRIMMED"
  | "SESSION_NOT_FOUND"
  | "RECONNECT_WINDOW_EXPIRED"
  | "FORBIDDEN"
  | "UNAUTHORIZED"
  | "DIVERGED"
  | "KEY_UNAVAILABLE"
  | "KEY_BUFFER_FULL"
  | "DECRYPT_FAILED"
  | "MALFORMED_SEALED"
  | "ACK_BEYOND_HEAD"
  | "SESSION_TAKEN_OVER"
  | "TOKEN_EXPIRED"
  | "REVOKED"
  | "AUTHZ_UNAVAILABLE"
  | "INVALID_REQUEST"
  | "CLOSED"
  | "STREAM_CLOSED"
  | "UNAVAILABLE";

/** A terminal error: `code` plus the facts the server gave (`epoch`, `firstAvailableSeq`, …). */
export class ZerodropError extends Error {
  readonly code: ErrorCode;
  readonly stream?: string;
  readonly epoch?: string;
  readonly firstAvailableSeq?: number;
  readonly headSeq?: number;
  constructor(
    code: ErrorCode,
    message: string,
    facts: { stream?: string; epoch?: string; firstAvailableSeq?: number; headSeq?: number } = {},
  ) {
    super(`${code}: ${message}`);
    this.name = "ZerodropError";
    this.code = code;
    this.stream = facts.stream;
    this.epoch = facts.epoch;
    this.firstAvailableSeq = facts.firstAvailableSeq;
    this.headSeq = facts.headSeq;
  }
}

/** Retried by the SDK, never surfaced. */
const TRANSIENT = new Set([
  "DRAINING",
  "STORE_UNAVAILABLE",
  "OVER_CAPACITY",
  "RATE_LIMITED",
  "INTERNAL",
  "UPSTREAM_UNAVAILABLE",
]);
const TERMINAL_SESSION = new Set([
  "SESSION_NOT_FOUND",
  "RECONNECT_WINDOW_EXPIRED",
  "INVALID_RESUME_TOKEN",
  "UNAUTHORIZED",
  "SESSION_TAKEN_OVER",
  "TOKEN_EXPIRED",
  "REVOKED",
]);

export interface ConnectOptions {
  /** `auto` (default): WebSocket when the browser has it, else SSE. */
  transport?: "auto" | "ws" | "sse";
  /** At most one ack per stream this often, in ms (default 100). */
  ackInterval?: number;
  /** Backoff base in ms (default 250). */
  baseDelay?: number;
  /** Backoff cap in ms (default 10 000). */
  maxDelay?: number;
  /** Encrypted events that may wait for a key, per stream (default 1000). */
  keyBufferEvents?: number;
  /** How long an event may wait for its key, in ms (default 10 000). */
  keyTimeout?: number;
  /** Called with every terminal error (also given to the subscription). */
  onError?: (e: ZerodropError) => void;
  /** Fetches a fresh connect token (same subject), e.g. from your backend. The server asks
   *  for one (`refresh`) before the current token expires; the SDK answers with it and uses
   *  it for its own requests after. Without it (or when it fails) the server closes the
   *  socket once the token's `exp` plus its grace has passed: `TOKEN_EXPIRED`. After such an
   *  end the SDK asks it once more and resumes the session with the fresh token (no gap). */
  tokenProvider?: () => Promise<string>;
}

export interface SubscribeOptions {
  /** Replay what followed this seq first; without it, start at the head (live only). */
  after?: number;
  /** The epoch of the snapshot `after` was read from. */
  epoch?: string;
  /** Called with each event in order; without it, iterate the subscription. */
  onEvent?: (e: ZerodropEvent) => void;
  /** Called once with the terminal error. */
  onError?: (e: ZerodropError) => void;
  /** Called once when the server closed the stream for good (`POST …/close`), after every
   *  event up to `lastSeq` was given; the subscription then ends (iteration is done). */
  onClosed?: (lastSeq: number) => void;
  /** Keep the stream's presence members (`subscription.members`, SPEC §10): a snapshot and
   *  the `presence` frames after it, current across reconnects (WebSocket only). */
  presence?: boolean;
  /** Called with the members whenever they change (with `presence`). */
  onPresence?: (members: Member[]) => void;
}

/** A member of a stream's presence: a session of `sub`, with its token's public `info`. */
export interface Member {
  sub: string;
  sessionId: string;
  info?: unknown;
  /** When it joined (Unix ms). */
  since: number;
}

interface PresenceFrame {
  stream: string;
  seq: number;
  epoch: string;
  action: "join" | "leave";
  member: Member;
}

export interface Position {
  epoch: string | null;
  seq: number;
}

export interface ZerodropEvent {
  stream: string;
  seq: number;
  epoch: string;
  ts: number;
  /** The application data (opened, when it was sealed); a byte payload (`{"$base64"}` on
   *  the wire, or a `zerodrop.v3` binary frame) is a `Uint8Array` of its bytes. */
  data: unknown;
  /** Whether `data` arrived sealed (docs/protocol.md, "End-to-end encrypted data"). */
  encrypted: boolean;
  kid?: string;
  /** Marks the event handled: it may now be acked and counts in `position`. */
  handled(): void;
}

export interface Sealed {
  e2e: 1;
  kid: string;
  n: string;
  ct: string;
}

/** Where a `history` page starts: exactly one of `after`, `before`, `last`, `sinceTs`
 *  (docs/protocol.md, "History both ways"). `limit` defaults to the server's (100). */
export type HistoryQuery =
  | { after: number; limit?: number }
  | { before: number; limit?: number }
  | { last: number }
  | { sinceTs: number; limit?: number };

/** One page of a stream's history; `order` is `"desc"` for `before` and `last`. */
export interface HistoryPage {
  stream: string;
  epoch: string;
  headSeq: number;
  firstSeq: number;
  order: "asc" | "desc";
  events: Array<Omit<ZerodropEvent, "handled">>;
}

interface RawEvent {
  stream: string;
  seq: number;
  epoch: string;
  ts: number;
  data: unknown;
}

// ------------------------------------------------------------------------------- encoding

const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: true });

/** `b` as a binary string (one char per byte), for `btoa`; in chunks, for large payloads. */
function binaryString(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  return s;
}

function binaryBytes(bin: string): Uint8Array {
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export function base64urlEncode(b: Uint8Array): string {
  return btoa(binaryString(b)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function base64urlDecode(s: string): Uint8Array | null {
  if (!/^[A-Za-z0-9_-]*$/.test(s) || s.length % 4 === 1) return null;
  const b64 = s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4);
  let bin: string;
  try {
    bin = atob(b64);
  } catch {
    return null;
  }
  return binaryBytes(bin);
}

/** Whether `v` is a JSON object (not an array, not bytes). */
function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v) && !ArrayBuffer.isView(v) && !(v instanceof ArrayBuffer);
}

/** The bytes of `data` when it is bytes (a `Uint8Array` or `ArrayBuffer`); else null. */
function asBytes(data: unknown): Uint8Array | null {
  return data instanceof Uint8Array ? data : data instanceof ArrayBuffer ? new Uint8Array(data) : null;
}

/** `data` as JSON: bytes become the byte payload `{"$base64":"<standard base64>"}`. */
function jsonOf(data: unknown): unknown {
  const b = asBytes(data);
  return b ? { $base64: btoa(binaryString(b)) } : data;
}

/** A byte payload's bytes: `data` that is exactly `{"$base64": <standard base64, padded>}`
 *  decodes to a `Uint8Array` (docs/protocol.md, "Durable Streams"); anything else, an invalid
 *  member included, is returned as is. */
export function bytesOf(data: unknown): unknown {
  if (!isObject(data)) return data;
  const keys = Object.keys(data);
  const b64 = data.$base64;
  if (keys.length !== 1 || keys[0] !== "$base64" || typeof b64 !== "string") return data;
  let bin: string;
  try {
    bin = atob(b64);
  } catch {
    return data;
  }
  return btoa(bin) === b64 ? binaryBytes(bin) : data; // only the canonical, padded form
}

function hex(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i++) s += b[i].toString(16).padStart(2, "0");
  return s;
}

function subtle(): SubtleCrypto {
  const c = (globalThis as { crypto?: Crypto }).crypto;
  if (!c || !c.subtle) throw new Error("WebCrypto (crypto.subtle) is not available (it needs a secure context)");
  return c.subtle;
}

// ----------------------------------------------------------------------- end-to-end sealing

const KID = /^[A-Za-z0-9._-]{1,64}$/;

/** Imports 32 raw key bytes as an AES-256-GCM key. */
export async function importKey(raw: Uint8Array | ArrayBuffer): Promise<CryptoKey> {
  const bytes = raw instanceof Uint8Array ? raw : new Uint8Array(raw);
  if (bytes.length !== 32) throw new RangeError("an e2e key is 32 bytes");
  return subtle().importKey("raw", bytes, { name: "AES-GCM" }, false, ["encrypt", "decrypt"]);
}

function aad(stream: string, kid: string): Uint8Array {
  return enc.encode(`zerodrop-e2e-v1\n${stream}\n${kid}`);
}

/** Whether `v` has the sealed shape: an object with exactly `e2e`, `kid`, `n`, `ct`. */
export function isSealed(v: unknown): boolean {
  if (!isObject(v)) return false;
  const keys = Object.keys(v).sort();
  return keys.length === 4 && keys.join(",") === "ct,e2e,kid,n";
}

/** Seals the JSON text `plaintext` for `stream` under `kid` (a fresh random nonce unless given). */
export async function sealText(
  key: CryptoKey,
  kid: string,
  stream: string,
  plaintext: string,
  nonce?: Uint8Array,
): Promise<Sealed> {
  if (!KID.test(kid)) throw new RangeError("kid must be 1-64 characters of [A-Za-z0-9._-]");
  const n = nonce ?? crypto.getRandomValues(new Uint8Array(12));
  if (n.length !== 12) throw new RangeError("the nonce is 12 bytes");
  const ct = await subtle().encrypt(
    { name: "AES-GCM", iv: n, additionalData: aad(stream, kid), tagLength: 128 },
    key,
    enc.encode(plaintext),
  );
  return { e2e: 1, kid, n: base64urlEncode(n), ct: base64urlEncode(new Uint8Array(ct)) };
}

/** Checks the sealed format; throws `MALFORMED_SEALED`. */
export function parseSealed(v: unknown, stream?: string): { kid: string; n: Uint8Array; ct: Uint8Array } {
  const bad = (why: string) => new ZerodropError("MALFORMED_SEALED", why, { stream });
  if (!isSealed(v)) throw bad("not an object with exactly e2e, kid, n, ct");
  const s = v as Record<string, unknown>;
  if (s.e2e !== 1) throw bad("unknown e2e format version");
  if (typeof s.kid !== "string" || !KID.test(s.kid)) throw bad("invalid kid");
  const n = typeof s.n === "string" ? base64urlDecode(s.n) : null;
  if (!n || n.length !== 12) throw bad("the nonce is not 12 bytes of base64url");
  const ct = typeof s.ct === "string" ? base64urlDecode(s.ct) : null;
  if (!ct || ct.length < 16) throw bad("the ciphertext is shorter than the tag");
  return { kid: s.kid, n, ct };
}

/** Opens a sealed value to its plaintext JSON text; throws `MALFORMED_SEALED` / `DECRYPT_FAILED`. */
export async function openText(key: CryptoKey, stream: string, sealed: unknown): Promise<string> {
  const p = parseSealed(sealed, stream);
  let pt: ArrayBuffer;
  try {
    pt = await subtle().decrypt(
      { name: "AES-GCM", iv: p.n, additionalData: aad(stream, p.kid), tagLength: 128 },
      key,
      p.ct,
    );
  } catch {
    throw new ZerodropError("DECRYPT_FAILED", "sealed data failed authentication", { stream });
  }
  try {
    return dec.decode(pt);
  } catch {
    throw new ZerodropError("DECRYPT_FAILED", "the plaintext is not UTF-8", { stream });
  }
}

// --------------------------------------------------------------------------- stream digest

/** The stream digest of events given exactly as served (docs/protocol.md, "Stream digest"). */
export async function streamDigest(events: string[]): Promise<string> {
  if (events.length === 0) return "0".repeat(64);
  let h = new Uint8Array(32);
  for (const e of events) {
    const b = enc.encode(e);
    const buf = new Uint8Array(32 + b.length);
    buf.set(h, 0);
    buf.set(b, 32);
    h = new Uint8Array(await subtle().digest("SHA-256", buf));
  }
  return hex(h);
}

/** The raw text of each element of the top-level `"events"` array of a JSON body. */
export function rawEvents(body: string): string[] {
  const at = body.indexOf('"events":[');
  if (at < 0) return [];
  const out: string[] = [];
  let i = at + '"events":['.length;
  let depth = 0;
  let start = -1;
  let inStr = false;
  for (; i < body.length; i++) {
    const c = body[i];
    if (inStr) {
      if (c === "\\") i++;
      else if (c === '"') inStr = false;
      continue;
    }
    if (c === '"') {
      inStr = true;
      if (depth === 0 && start < 0) start = i;
    } else if (c === "{" || c === "[") {
      if (depth === 0) start = i;
      depth++;
    } else if (c === "}" || c === "]") {
      if (depth === 0) break; // the end of the events array
      depth--;
      if (depth === 0) {
        out.push(body.slice(start, i + 1));
        start = -1;
      }
    } else if (c === "," && depth === 0) {
      start = -1;
    }
  }
  return out;
}

// --------------------------------------------------------------------------------- helpers

function httpBase(u: string): string {
  let s = u.replace(/\/+$/, "");
  s = s.replace(/^ws:/, "http:").replace(/^wss:/, "https:");
  return s.replace(/\/v1\/ws$/, "");
}

function wsBase(u: string): string {
  return httpBase(u).replace(/^http:/, "ws:").replace(/^https:/, "wss:");
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function errorFrom(o: Record<string, unknown>, stream?: string): ZerodropError {
  const code = String(o.code ?? "INVALID_REQUEST");
  const mapped = (code === "INVALID_RESUME_TOKEN" ? "UNAUTHORIZED" : code) as ErrorCode;
  return new ZerodropError(mapped, String(o.message ?? code), {
    stream: (o.stream as string | undefined) ?? stream,
    epoch: o.epoch as string | undefined,
    firstAvailableSeq: o.firstAvailableSeq as number | undefined,
    headSeq: o.headSeq as number | undefined,
  });
}

function textFrame(text: string): Record<string, unknown> | null {
  try {
    const f = JSON.parse(text) as unknown;
    return isObject(f) ? f : null;
  } catch {
    return null;
  }
}

/** A `zerodrop.v3` binary frame: an `event` header (compact JSON), LF, the payload's bytes,
 *  as the event frame with `data` the bytes; null when it is not one. */
function binaryFrame(buf: ArrayBuffer): Record<string, unknown> | null {
  const b = new Uint8Array(buf);
  const lf = b.indexOf(0x0a);
  if (lf < 0) return null;
  let header: Record<string, unknown> | null;
  try {
    header = textFrame(dec.decode(b.subarray(0, lf)));
  } catch {
    return null; // not UTF-8
  }
  return header?.type === "event" ? { ...header, data: b.slice(lf + 1) } : null;
}

class HttpError extends Error {
  constructor(readonly status: number, readonly body: Record<string, unknown>, readonly retryAfterMs: number) {
    super(`HTTP ${status}`);
  }
}

// ----------------------------------------------------------------------------- subscription

/** One stream's subscription: events in seq order, each once. Iterable with `for await`. */
export class Subscription implements AsyncIterable<ZerodropEvent> {
  readonly stream: string;
  /** Set once the subscription ended (`STREAM_CLOSED` when the server closed the stream). */
  error: ZerodropError | null = null;
  /** The stream's last seq once the server closed it and every event was given; else null. */
  closedAt: number | null = null;
  /** @internal the server said `closed` after this seq: the end once the inbox is given. */
  closingAt: number | null = null;
  /** Resolves with the terminal error when the subscription ends. */
  readonly ended: Promise<ZerodropError>;

  /** @internal */ epoch: string | null;
  /** @internal last seq given to the application (null: not known yet). */ delivered: number | null;
  /** @internal highest seq handled without a hole. */ handledSeq: number | null;
  /** @internal */ ackedSeq = 0;
  /** @internal the current socket's session holds this stream. */ confirmed = false;
  /** @internal */ inSession = false;
  /** @internal */ startAfter: number | undefined;
  /** @internal */ inbox: RawEvent[] = [];
  /** @internal */ pumping = false;
  /** @internal */ waitingKeySince: number | null = null;
  /** @internal */ keyTimer: ReturnType<typeof setTimeout> | null = null;
  /** @internal presence: the log's epoch and last seq applied (null: no snapshot yet). */
  presenceEpoch: string | null = null;
  /** @internal */ presenceSeq: number | null = null;
  /** @internal frames that came before the snapshot. */ presenceEarly: PresenceFrame[] = [];
  /** @internal a snapshot is being taken. */ presenceFetching = false;
  private memberMap = new Map<string, Member>();

  private handledSet = new Set<number>();
  private queue: ZerodropEvent[] = [];
  private waiters: Array<(r: IteratorResult<ZerodropEvent>) => void> = [];
  private failWaiters: Array<(e: unknown) => void> = [];
  private resolveEnded!: (e: ZerodropError) => void;

  constructor(
    private readonly client: Client,
    stream: string,
    private readonly opts: SubscribeOptions,
  ) {
    this.stream = stream;
    this.epoch = opts.epoch ?? null;
    this.startAfter = opts.after;
    this.delivered = opts.after ?? null;
    this.handledSeq = opts.after ?? null;
    this.ackedSeq = opts.after ?? 0;
    this.ended = new Promise((r) => (this.resolveEnded = r));
  }

  /** The stream's members (subscribed with `presence`), ordered by session id. */
  get members(): Member[] {
    return [...this.memberMap.keys()].sort().map((k) => this.memberMap.get(k) as Member);
  }

  /** @internal whether presence is kept. */
  get wantsPresence(): boolean {
    return this.opts.presence === true;
  }

  /** @internal a snapshot (its pages' members, at `seq` in `epoch`), then the frames that came
   *  before it; `false`: start over. */
  presenceSnapshot(epoch: string, seq: number, members: Member[]): boolean {
    this.presenceEpoch = epoch;
    this.presenceSeq = seq;
    this.memberMap = new Map(members.map((m) => [m.sessionId, m]));
    const early = this.presenceEarly.splice(0);
    for (const f of early) if (!this.applyPresence(f)) return false;
    this.presenceChanged();
    return true;
  }

  /** @internal one `presence` frame; `false`: start over with a fresh snapshot. */
  presenceFrame(f: PresenceFrame): boolean {
    if (this.presenceSeq === null) {
      this.presenceEarly.push(f);
      return true;
    }
    if (!this.applyPresence(f)) return false;
    this.presenceChanged();
    return true;
  }

  /** @internal forget the presence position: the next `subscribed` takes a snapshot. */
  presenceRestart(): void {
    this.presenceSeq = null;
    this.presenceEarly = [];
  }

  private applyPresence(f: PresenceFrame): boolean {
    const seq = this.presenceSeq ?? 0;
    if (f.epoch !== this.presenceEpoch || f.seq > seq + 1) {
      this.presenceRestart();
      return false;
    }
    if (f.seq <= seq) return true; // in the snapshot already, or a repeat
    if (f.action === "join") this.memberMap.set(f.member.sessionId, f.member);
    else this.memberMap.delete(f.member.sessionId);
    this.presenceSeq = f.seq;
    return true;
  }

  private presenceChanged(): void {
    try {
      this.opts.onPresence?.(this.members);
    } catch (e) {
      setTimeout(() => {
        throw e;
      });
    }
  }

  /** The last handled event's position. */
  get position(): Position {
    return { epoch: this.epoch, seq: this.handledSeq ?? 0 };
  }

  /** @internal */
  give(raw: RawEvent, data: unknown, encrypted: boolean, kid?: string): void {
    this.delivered = raw.seq;
    if (this.handledSeq === null) this.handledSeq = raw.seq - 1;
    let done = false;
    const ev: ZerodropEvent = {
      stream: raw.stream,
      seq: raw.seq,
      epoch: raw.epoch,
      ts: raw.ts,
      data,
      encrypted,
      kid,
      handled: () => {
        if (done) return;
        done = true;
        this.markHandled(raw.seq);
      },
    };
    if (this.opts.onEvent) {
      try {
        this.opts.onEvent(ev);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
      return;
    }
    const w = this.waiters.shift();
    this.failWaiters.shift();
    if (w) w({ value: ev, done: false });
    else this.queue.push(ev);
  }

  private markHandled(seq: number): void {
    if (this.handledSeq === null) this.handledSeq = seq - 1;
    if (seq <= this.handledSeq) return;
    this.handledSet.add(seq);
    while (this.handledSet.has(this.handledSeq + 1)) {
      this.handledSet.delete(this.handledSeq + 1);
      this.handledSeq++;
    }
    this.client.scheduleAck();
  }

  /** @internal */
  fail(e: ZerodropError): void {
    if (!this.end(e)) return;
    this.opts.onError?.(e);
    this.client.reportError(e);
    this.resolveEnded(e);
    const fw = this.failWaiters.splice(0);
    this.waiters = [];
    for (const f of fw) f(e);
  }

  /** @internal the server closed the stream after `lastSeq`: ends the subscription once every
   *  event before the `closed` frame was given (frames arrive in order). */
  closing(lastSeq: number): void {
    if (this.error) return;
    this.closingAt = lastSeq;
    this.endIfClosed();
  }

  /** @internal */
  endIfClosed(): void {
    if (this.closingAt === null || this.error || this.pumping || this.inbox.length > 0) return;
    const lastSeq = this.closingAt;
    // The end of the stream, not an error: not reported to `onError`, iteration is done.
    const e = new ZerodropError("STREAM_CLOSED", `the stream was closed after seq ${lastSeq}`, {
      stream: this.stream,
      headSeq: lastSeq,
    });
    this.end(e);
    this.closedAt = lastSeq;
    this.opts.onClosed?.(lastSeq);
    this.resolveEnded(e);
    this.failWaiters = [];
    for (const w of this.waiters.splice(0)) w({ value: undefined, done: true });
  }

  /** Marks the subscription ended by `e` and lets go of it; false when it had ended already. */
  private end(e: ZerodropError): boolean {
    if (this.error) return false;
    this.error = e;
    this.inbox = [];
    if (this.keyTimer) clearTimeout(this.keyTimer);
    this.client.forget(this);
    return true;
  }

  /** Ends the subscription (unsubscribes). */
  close(): void {
    this.client.unsubscribe(this);
    this.fail(new ZerodropError("CLOSED", "subscription closed", { stream: this.stream }));
  }

  [Symbol.asyncIterator](): AsyncIterator<ZerodropEvent> {
    return {
      next: () => {
        const q = this.queue.shift();
        if (q) return Promise.resolve({ value: q, done: false });
        if (this.error) {
          return this.error.code === "CLOSED" || this.error.code === "STREAM_CLOSED"
            ? Promise.resolve({ value: undefined, done: true })
            : Promise.reject(this.error);
        }
        return new Promise((res, rej) => {
          this.waiters.push(res);
          this.failWaiters.push(rej);
        });
      },
      return: () => {
        this.close();
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }
}

// ---------------------------------------------------------------------------------- client

/** Opens a client. `url` is the server's base URL (`http(s)://…` or `ws(s)://…`); several
 *  urls are tried in turn, each reconnect going to the next one. */
export function connect(url: string | string[], connectToken: string, options: ConnectOptions = {}): Client {
  return new Client(Array.isArray(url) ? url : [url], connectToken, options);
}

/** The SDK's one SSE response. */
interface SseState {
  es: EventSource | null;
  /** The streams it was opened for and that have not closed. */
  streams: string[];
  attempt: number;
  timer: ReturnType<typeof setTimeout> | null;
  refreshed: boolean;
  /** A reopen for a changed set is queued. */
  reopen: boolean;
}

export class Client {
  private readonly urls: string[];
  /** The newest connect token (a `refresh` replaces it). */
  private token: string;
  private readonly opt: Required<Omit<ConnectOptions, "onError" | "tokenProvider">> &
    Pick<ConnectOptions, "onError" | "tokenProvider">;
  private readonly subs = new Map<string, Subscription>();
  private readonly keys = new Map<string, CryptoKey>();
  private publishKid: string | null = null;
  private idx = 0;
  private attempt = 0;
  private retryAfterMs = 0;
  private closed = false;

  // WebSocket state
  private ws: WebSocket | null = null;
  private resumeToken: string | null = null;
  /** A fresh connect token the next resume carries: the session's own expired. */
  private freshToken: string | null = null;
  private protocol = "";
  private welcomed = false;
  private resuming = false;
  private ackTimer: ReturnType<typeof setTimeout> | null = null;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private lastSessionError: ZerodropError | null = null;
  private pendingPublish = new Map<string, { resolve: (seq: number) => void; reject: (e: Error) => void }>();
  private publishCounter = 0;

  // SSE state
  /** The one EventSource that carries every subscription (`/v1/sse?streams=…`), its reconnect
   *  attempts and timer, and whether a fresh token was fetched since its last event (one per
   *  expiry). */
  private sse: SseState = { es: null, streams: [], attempt: 0, timer: null, refreshed: false, reopen: false };
  /** Per stream, the epoch of the last event or reset seen over SSE (for the cursor). */
  private sseEpoch = new Map<string, string>();

  /** The transport in use: `ws` or `sse` (`auto` starts with `ws`). */
  transport: "ws" | "sse";
  /** WebSocket attempts in a row that never opened (`auto` falls back to SSE after 3). */
  private unopened = 0;

  constructor(urls: string[], token: string, o: ConnectOptions) {
    if (urls.length === 0) throw new RangeError("connect needs at least one url");
    this.urls = urls;
    this.token = token;
    this.opt = {
      transport: o.transport ?? "auto",
      ackInterval: o.ackInterval ?? 100,
      baseDelay: o.baseDelay ?? 250,
      maxDelay: o.maxDelay ?? 10_000,
      keyBufferEvents: o.keyBufferEvents ?? 1000,
      keyTimeout: o.keyTimeout ?? 10_000,
      onError: o.onError,
      tokenProvider: o.tokenProvider,
    };
    const hasWs = typeof WebSocket !== "undefined";
    this.transport = this.opt.transport === "sse" || (this.opt.transport === "auto" && !hasWs) ? "sse" : "ws";
    if (this.transport === "ws") this.openSocket();
  }

  /** The negotiated WebSocket subprotocol (`zerodrop.v3`, `zerodrop.v2` or `zerodrop.v1`), once
   *  connected. */
  get subprotocol(): string {
    return this.protocol;
  }

  /** Subscribes to `stream`; see docs/sdk.md. */
  subscribe(stream: string, opts: SubscribeOptions = {}): Subscription {
    if (this.closed) throw new ZerodropError("CLOSED", "client closed");
    const old = this.subs.get(stream);
    if (old) old.close();
    const sub = new Subscription(this, stream, opts);
    this.subs.set(stream, sub);
    if (this.transport === "ws") {
      if (this.ws && this.welcomed) this.sendSubscribe(sub);
    } else {
      this.sseChanged();
    }
    return sub;
  }

  /** Adds the group key for key epoch `kid` (32 raw bytes); waiting events are opened. */
  async addKey(kid: string, raw: Uint8Array | ArrayBuffer): Promise<void> {
    if (!KID.test(kid)) throw new RangeError("kid must be 1-64 characters of [A-Za-z0-9._-]");
    this.keys.set(kid, await importKey(raw));
    for (const s of this.subs.values()) void this.pump(s);
  }

  /** The key epoch `publish`/`seal` seal under (it must have been added). */
  setPublishKey(kid: string): void {
    if (!this.keys.has(kid)) throw new RangeError(`no key for kid ${kid}`);
    this.publishKid = kid;
  }

  /** Seals `data` for `stream` under the publish key (bytes as their `{"$base64"}` object). */
  async seal(stream: string, data: unknown): Promise<Sealed> {
    const kid = this.publishKid;
    const key = kid ? this.keys.get(kid) : undefined;
    if (!kid || !key) throw new RangeError("no publish key: call setPublishKey(kid) first");
    return sealText(key, kid, stream, JSON.stringify(jsonOf(data)));
  }

  /** Opens event data: sealed data with a known key is decrypted, anything else returned as is;
   *  a byte payload (`{"$base64"}`, sealed or not) is a `Uint8Array`. */
  async open(stream: string, data: unknown): Promise<{ data: unknown; encrypted: boolean; kid?: string }> {
    if (!isSealed(data)) return { data: bytesOf(data), encrypted: false };
    const p = parseSealed(data, stream);
    const key = this.keys.get(p.kid);
    if (!key) throw new ZerodropError("KEY_UNAVAILABLE", `no key for kid ${p.kid}`, { stream });
    const text = await openText(key, stream, data);
    return { data: bytesOf(JSON.parse(text)), encrypted: true, kid: p.kid };
  }

  /** Publishes over the WebSocket (the token needs the `publish` claim); sealed when a publish
   *  key is set. Resolves with the seq. `id` makes it idempotent within the session. Bytes (a
   *  `Uint8Array` or `ArrayBuffer`) are a byte payload: one binary frame on `zerodrop.v3`, the
   *  `{"$base64"}` object on v2/v1 and when sealed. */
  async publish(stream: string, data: unknown, id?: string): Promise<number> {
    const bytes = this.publishKid ? null : asBytes(data);
    const body = this.publishKid ? await this.seal(stream, data) : jsonOf(data);
    const pid = id ?? `p${Date.now().toString(36)}-${++this.publishCounter}`;
    for (let i = 0; i < 100; i++) {
      if (this.closed) throw new ZerodropError("CLOSED", "client closed");
      if (this.ws && this.welcomed && this.ws.readyState === WebSocket.OPEN) {
        const p = new Promise<number>((resolve, reject) => this.pendingPublish.set(pid, { resolve, reject }));
        if (bytes && this.protocol === "zerodrop.v3") {
          const header = enc.encode(JSON.stringify({ type: "publish", stream, id: pid }));
          const frame = new Uint8Array(header.length + 1 + bytes.length);
          frame.set(header);
          frame[header.length] = 0x0a;
          frame.set(bytes, header.length + 1);
          this.ws.send(frame);
        } else {
          this.ws.send(JSON.stringify({ type: "publish", stream, data: body, id: pid }));
        }
        try {
          return await p;
        } catch (e) {
          if (e instanceof ZerodropError) throw e;
        }
      }
      await sleep(200);
    }
    throw new Error("publish: not connected");
  }

  /** Recomputes the stream digest and compares it with the server's (docs/sdk.md,
   *  "Consistency check"). A mismatch ends the stream's subscription with `DIVERGED`. */
  async verify(stream: string): Promise<{ count: number; hash: string }> {
    const base = httpBase(this.urls[this.idx % this.urls.length]);
    const path = `/v1/streams/${encodeURIComponent(stream)}`;
    const info = await this.getJson(`${base}${path}`, stream);
    const first = Number(info.firstSeq);
    const head = Number(info.headSeq);
    const texts: string[] = [];
    let after = first - 1;
    while (after < head) {
      const body = await this.getText(`${base}${path}/events?after=${after}&limit=1000`, stream);
      const page = rawEvents(body);
      if (page.length === 0) break;
      for (const t of page) {
        const seq = Number((JSON.parse(t) as RawEvent).seq);
        if (seq > head) break;
        texts.push(t);
        after = seq;
      }
    }
    const hash = await streamDigest(texts);
    if (hash !== info.hash || texts.length !== Number(info.count)) {
      const e = new ZerodropError(
        "DIVERGED",
        `recomputed ${texts.length} events / ${hash}, server says ${info.count} / ${info.hash}`,
        { stream },
      );
      this.subs.get(stream)?.fail(e);
      throw e;
    }
    return { count: texts.length, hash };
  }

  /** Reads one page of a stream's history over HTTP with the connect token (it must grant
   *  the stream): forward (`after`, `sinceTs`) or backward (`before`, `last`, newest first).
   *  Sealed events are opened. `epoch` makes the read refuse another epoch with
   *  `EPOCH_CHANGED`. Refusals are typed (`REPLAY_WINDOW_TRIMMED` with `firstAvailableSeq`,
   *  `ACK_BEYOND_HEAD`, `INVALID_REQUEST`, `FORBIDDEN`, …); a server that stays unavailable
   *  through three tries (each url in turn) gives `UNAVAILABLE`. */
  async history(stream: string, query: HistoryQuery, opts: { epoch?: string } = {}): Promise<HistoryPage> {
    const q = new URLSearchParams();
    const given = Object.entries(query).filter(([k, v]) => k !== "limit" && v !== undefined);
    if (given.length !== 1) {
      throw new ZerodropError("INVALID_REQUEST", "history takes exactly one of after, before, last, sinceTs", { stream });
    }
    for (const [k, v] of Object.entries(query)) {
      if (v === undefined) continue;
      if (!Number.isSafeInteger(v) || v < 0) {
        throw new ZerodropError("INVALID_REQUEST", `history: ${k} must be a non-negative integer`, { stream });
      }
      q.set(k === "sinceTs" ? "since_ts" : k, String(v));
    }
    if (opts.epoch) q.set("epoch", opts.epoch);
    let last: HttpError | null = null;
    for (let attempt = 0; attempt < 3; attempt++) {
      const base = httpBase(this.urls[(this.idx + attempt) % this.urls.length]);
      let page: Record<string, unknown>;
      try {
        page = await this.getJson(`${base}/v1/streams/${encodeURIComponent(stream)}/events?${q}`, stream);
      } catch (e) {
        if (!(e instanceof HttpError)) throw e;
        last = e;
        await sleep(Math.min(e.retryAfterMs || 100 * 2 ** attempt, 2000));
        continue;
      }
      const events: HistoryPage["events"] = [];
      for (const raw of (page.events ?? []) as RawEvent[]) {
        const opened = await this.open(stream, raw.data);
        events.push({ stream: raw.stream, seq: raw.seq, epoch: raw.epoch, ts: raw.ts, ...opened });
      }
      return {
        stream: String(page.stream),
        epoch: String(page.epoch),
        headSeq: Number(page.headSeq),
        firstSeq: Number(page.firstSeq),
        order: page.order === "desc" ? "desc" : "asc",
        events,
      };
    }
    throw new ZerodropError("UNAVAILABLE", `history: ${last?.message ?? "no answer"}`, { stream });
  }

  /** Closes the client: every subscription ends with `CLOSED`. */
  close(): void {
    if (this.closed) return;
    this.flushAcks();
    this.closed = true;
    for (const s of [...this.subs.values()]) s.fail(new ZerodropError("CLOSED", "client closed", { stream: s.stream }));
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.ackTimer) clearTimeout(this.ackTimer);
    this.ws?.close(1000);
    this.ws = null;
    this.sseStop();
  }

  // --------------------------------------------------------------------- internal plumbing

  /** @internal */
  forget(s: Subscription): void {
    if (this.subs.get(s.stream) !== s) return;
    this.subs.delete(s.stream);
    // Over SSE the one response is reopened for the new set (a stream the server closed has
    // ended there already and the others go on: no reopen).
    if (this.transport === "sse" && this.sse.streams.includes(s.stream) && s.closedAt === null) this.sseChanged();
  }

  /** @internal */
  unsubscribe(s: Subscription): void {
    if (this.ws && this.welcomed && this.subs.get(s.stream) === s && s.inSession) {
      this.ws.send(JSON.stringify({ type: "unsubscribe", stream: s.stream }));
    }
  }

  /** @internal */
  reportError(e: ZerodropError): void {
    if (e.code !== "CLOSED") this.opt.onError?.(e);
  }

  private backoff(): number {
    const cap = Math.min(this.opt.maxDelay, this.opt.baseDelay * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 30);
    return Math.max(Math.random() * cap, this.retryAfterMs);
  }

  private openSocket(): void {
    if (this.closed) return;
    const base = wsBase(this.urls[this.idx % this.urls.length]);
    const url = this.resumeToken ? `${base}/v1/ws` : `${base}/v1/ws?token=${encodeURIComponent(this.token)}`;
    let ws: WebSocket;
    try {
      ws = new WebSocket(url, ["zerodrop.v3", "zerodrop.v2", "zerodrop.v1"]);
    } catch {
      this.scheduleReconnect(false);
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.welcomed = false;
    this.lastSessionError = null;
    for (const s of this.subs.values()) s.confirmed = false;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.unopened = 0;
      this.protocol = ws.protocol;
      this.resuming = this.resumeToken !== null;
      if (this.resumeToken) {
        const lastAck: Record<string, number> = {};
        for (const s of this.subs.values()) if (s.handledSeq !== null && s.inSession) lastAck[s.stream] = s.handledSeq;
        const frame: Record<string, unknown> = { type: "resume", resumeToken: this.resumeToken, lastAck };
        const presence: Record<string, { after: number; epoch?: string }> = {};
        for (const s of this.subs.values()) {
          if (s.inSession && s.wantsPresence && s.presenceSeq !== null) {
            presence[s.stream] = { after: s.presenceSeq, epoch: s.presenceEpoch ?? undefined };
          }
        }
        if (Object.keys(presence).length > 0) frame.presence = presence;
        if (this.freshToken) frame.token = this.freshToken;
        ws.send(JSON.stringify(frame));
      }
    };
    ws.onmessage = (m) => {
      if (this.ws !== ws) return;
      const f = typeof m.data === "string" ? textFrame(m.data) : m.data instanceof ArrayBuffer ? binaryFrame(m.data) : null;
      if (f) this.onFrame(ws, f); // a frame that is not one is ignored
    };
    ws.onclose = (c) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.welcomed = false;
      for (const [, p] of this.pendingPublish) p.reject(new Error("socket closed"));
      this.pendingPublish.clear();
      const code = c.code;
      const fatal: Record<number, ErrorCode> = {
        4401: "UNAUTHORIZED",
        4403: "FORBIDDEN",
        4404: "SESSION_NOT_FOUND",
        4409: "SESSION_TAKEN_OVER",
        4410: "RECONNECT_WINDOW_EXPIRED",
      };
      if (fatal[code]) {
        const e = this.lastSessionError ?? new ZerodropError(fatal[code], `socket closed with ${code}`);
        const provide = this.opt.tokenProvider;
        if (e.code === "TOKEN_EXPIRED" && provide && this.resumeToken && !this.freshToken) {
          // The session outlived its token: resume it with a fresh one (once per expiry).
          provide().then(
            (token) => {
              if (typeof token !== "string" || !token) return this.failAll(e);
              this.token = token;
              this.freshToken = token;
              this.scheduleReconnect(true);
            },
            () => this.failAll(e),
          );
          return;
        }
        this.failAll(e);
        return;
      }
      if (!opened && this.opt.transport === "auto" && ++this.unopened >= 3) {
        void this.check().then((c) => {
          if (c.error) this.failAll(c.error);
          else if (c.reachable) this.fallBackToSse();
          else this.scheduleReconnect(false);
        });
        return;
      }
      if (!opened && !this.resumeToken) {
        void this.probe().then((e) => (e ? this.failAll(e) : this.scheduleReconnect(false)));
        return;
      }
      this.scheduleReconnect(false);
    };
  }

  /** `auto`: WebSocket never got through (a proxy that refuses upgrades): go on over SSE from
   *  what each subscription delivered. */
  private fallBackToSse(): void {
    if (this.closed) return;
    this.transport = "sse";
    this.ws = null;
    this.sseOpen();
  }

  private failAll(e: ZerodropError): void {
    for (const s of [...this.subs.values()]) {
      s.fail(new ZerodropError(e.code, e.message.replace(/^[A-Z_]+: /, ""), { stream: s.stream, epoch: e.epoch }));
    }
    if (this.subs.size === 0) this.reportError(e);
    this.resumeToken = null;
  }

  /** Why a connection with the connect token failed, when it is terminal (401/403). */
  private async probe(): Promise<ZerodropError | null> {
    return (await this.check()).error;
  }

  /** One `GET …/events` with the connect token: `reachable` says HTTP got through (so a
   *  WebSocket that does not is blocked on the way); `error` a terminal 401/403. */
  private async check(): Promise<{ reachable: boolean; error: ZerodropError | null }> {
    const s = [...this.subs.keys()][0] ?? "_";
    const base = httpBase(this.urls[this.idx % this.urls.length]);
    try {
      const r = await fetch(`${base}/v1/streams/${encodeURIComponent(s)}/events?limit=1&after=0`, {
        headers: { Authorization: `Bearer ${this.token}` },
      });
      if (r.status === 401 || (r.status === 403 && this.subs.size > 0)) {
        const b = (await r.json().catch(() => ({}))) as { error?: Record<string, unknown> };
        return {
          reachable: true,
          error: errorFrom(b.error ?? { code: r.status === 401 ? "UNAUTHORIZED" : "FORBIDDEN" }, s),
        };
      }
      return { reachable: r.status < 500, error: null };
    } catch {
      return { reachable: false, error: null }; // unreachable: transient
    }
  }

  private scheduleReconnect(now: boolean): void {
    if (this.closed || this.reconnectTimer) return;
    this.idx = (this.idx + 1) % this.urls.length;
    const delay = now ? 0 : this.backoff();
    this.retryAfterMs = 0;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      this.openSocket();
    }, delay);
  }

  /** Reads every page of the stream's members and hands them to the subscription. */
  private async presenceSnapshot(s: Subscription): Promise<void> {
    if (s.presenceFetching) return;
    s.presenceFetching = true;
    const base = httpBase(this.urls[this.idx % this.urls.length]);
    const members: Member[] = [];
    let first: { epoch: string; presenceSeq: number } | null = null;
    let cursor: string | null = null;
    try {
      do {
        const q: string = cursor ? `?cursor=${encodeURIComponent(cursor)}` : "";
        const r = await fetch(`${base}/v1/streams/${encodeURIComponent(s.stream)}/presence${q}`, {
          headers: { Authorization: `Bearer ${this.token}` },
        });
        if (!r.ok) throw new Error(`presence ${r.status}`);
        const page = (await r.json()) as { epoch: string; presenceSeq: number; members: Member[]; nextCursor?: string | null };
        first ??= { epoch: page.epoch, presenceSeq: page.presenceSeq };
        members.push(...page.members);
        cursor = page.nextCursor ?? null;
      } while (cursor);
    } catch {
      s.presenceFetching = false;
      // Frames keep arriving meanwhile; try again shortly.
      setTimeout(() => {
        if (!s.error && s.presenceSeq === null && this.subs.get(s.stream) === s) void this.presenceSnapshot(s);
      }, 500);
      return;
    }
    s.presenceFetching = false;
    if (s.error || this.subs.get(s.stream) !== s || !first) return;
    if (!s.presenceSnapshot(first.epoch, first.presenceSeq, members)) this.sendSubscribe(s);
  }

  private sendSubscribe(s: Subscription): void {
    const f: Record<string, unknown> = { type: "subscribe", stream: s.stream };
    const after = s.handledSeq ?? s.startAfter;
    if (after !== undefined && after !== null) f.after = after;
    if (s.epoch) f.epoch = s.epoch;
    if (s.wantsPresence) {
      f.presence = true;
      if (s.presenceSeq !== null) {
        f.presenceAfter = s.presenceSeq;
        if (s.presenceEpoch) f.presenceEpoch = s.presenceEpoch;
      }
    }
    this.ws?.send(JSON.stringify(f));
  }

  private onFrame(ws: WebSocket, f: Record<string, unknown>): void {
    switch (f.type) {
      case "welcome": {
        this.welcomed = true;
        this.attempt = 0;
        this.freshToken = null;
        if (typeof f.resumeToken === "string") this.resumeToken = f.resumeToken;
        if (!this.protocol && typeof f.protocol === "string") this.protocol = f.protocol;
        // A resumed session announces its own streams with `subscribed` and their missed
        // events; the others (and all of a new session's) are subscribed from their position.
        for (const s of this.subs.values()) {
          if (!this.resuming) s.inSession = false;
          if (!s.inSession) this.sendSubscribe(s);
        }
        break;
      }
      case "subscribed": {
        const s = this.subs.get(String(f.stream));
        if (!s) break;
        s.confirmed = true;
        s.inSession = true;
        const epoch = String(f.epoch);
        if (s.epoch && s.epoch !== epoch) {
          s.fail(new ZerodropError("EPOCH_CHANGED", "the stream's log was recreated", { stream: s.stream, epoch }));
          break;
        }
        s.epoch = epoch;
        const from = Number(f.fromSeq);
        if (s.delivered === null) {
          s.delivered = from - 1;
          if (s.handledSeq === null) s.handledSeq = from - 1;
          s.ackedSeq = Math.max(s.ackedSeq, from - 1);
        }
        if (s.wantsPresence && s.presenceSeq === null) {
          // Frames follow from the head: a snapshot now, and only the frames after it. A
          // resumed stream without presence frames (no position yet) asks for them first.
          if (typeof f.presenceSeq === "number") void this.presenceSnapshot(s);
          else this.sendSubscribe(s);
        }
        break;
      }
      case "closed": {
        this.subs.get(String(f.stream))?.closing(Number(f.lastSeq));
        break;
      }
      case "presence": {
        const s = this.subs.get(String(f.stream));
        if (!s || !s.wantsPresence) break;
        if (!s.presenceFrame(f as unknown as PresenceFrame)) this.sendSubscribe(s);
        break;
      }
      case "event": {
        const s = this.subs.get(String(f.stream));
        if (!s) break;
        s.inbox.push(f as unknown as RawEvent);
        void this.pump(s);
        break;
      }
      case "token":
        if (typeof f.resumeToken === "string") this.resumeToken = f.resumeToken;
        break;
      case "refresh": {
        // Fetched aside: events keep flowing while the backend mints the token. A provider
        // that fails sends nothing, and the server's deadline ends the socket (`TOKEN_EXPIRED`).
        const provide = this.opt.tokenProvider;
        if (!provide) break;
        provide().then(
          (token) => {
            if (typeof token !== "string" || !token) return;
            this.token = token;
            if (this.ws === ws) ws.send(JSON.stringify({ type: "refresh", token }));
          },
          () => {},
        );
        break;
      }
      case "reconnect":
        if (typeof f.resumeToken === "string") this.resumeToken = f.resumeToken;
        this.retryAfterMs = Number(f.retryAfterMs ?? 0) || 0;
        // Drain: everything in flight arrived before this frame; go now, to the next url.
        this.flushAcks();
        this.ws = null;
        this.welcomed = false;
        ws.close(1000);
        if (this.retryAfterMs > 0) this.scheduleReconnect(false);
        else this.scheduleReconnect(true);
        break;
      case "ping":
        ws.send(JSON.stringify({ type: "pong", t: f.t }));
        break;
      case "published": {
        const p = this.pendingPublish.get(String(f.id));
        if (p) {
          this.pendingPublish.delete(String(f.id));
          p.resolve(Number(f.seq));
        }
        break;
      }
      case "error":
        this.onErrorFrame(f);
        break;
      default:
        break; // unknown frame types are ignored
    }
  }

  private onErrorFrame(f: Record<string, unknown>): void {
    const code = String(f.code);
    if (f.id !== undefined && this.pendingPublish.has(String(f.id))) {
      const p = this.pendingPublish.get(String(f.id));
      this.pendingPublish.delete(String(f.id));
      if (TRANSIENT.has(code)) p?.reject(new Error(code));
      else p?.reject(errorFrom(f));
      return;
    }
    if (TRANSIENT.has(code)) {
      if (typeof f.retryAfterMs === "number") this.retryAfterMs = f.retryAfterMs;
      return;
    }
    const stream = typeof f.stream === "string" ? f.stream : undefined;
    if (stream && f.presence === true) {
      // The presence frames stopped; the events go on. A log that started again or was
      // trimmed past the position: a fresh snapshot after the frames from the head.
      const s = this.subs.get(stream);
      if (s && (code === "EPOCH_CHANGED" || code === "REPLAY_WINDOW_TRIMMED")) {
        s.presenceRestart();
        this.sendSubscribe(s);
      }
      return;
    }
    if (stream) {
      const s = this.subs.get(stream);
      if (s && code !== "INVALID_REQUEST") {
        s.inSession = false;
        s.fail(errorFrom(f, stream));
      }
      return;
    }
    if (TERMINAL_SESSION.has(code)) this.lastSessionError = errorFrom(f);
  }

  /** Delivers a subscription's inbox in order: dedupe, gap repair, key waits. */
  private async pump(s: Subscription): Promise<void> {
    if (s.pumping || s.error) return;
    s.pumping = true;
    try {
      while (s.inbox.length > 0 && !s.error) {
        const e = s.inbox[0];
        if (s.epoch && e.epoch !== s.epoch) {
          s.fail(new ZerodropError("EPOCH_CHANGED", "the stream's log was recreated", { stream: s.stream, epoch: e.epoch }));
          return;
        }
        if (s.delivered !== null && e.seq <= s.delivered) {
          s.inbox.shift();
          continue;
        }
        if (s.delivered !== null && e.seq > s.delivered + 1) {
          const missing = await this.readRange(s, s.delivered, e.seq - 1);
          if (!missing) return;
          s.inbox.unshift(...missing);
          continue;
        }
        if (!s.epoch) s.epoch = e.epoch;
        let data = e.data;
        let encrypted = false;
        let kid: string | undefined;
        if (isSealed(data)) {
          let p;
          try {
            p = parseSealed(data, s.stream);
          } catch (err) {
            s.fail(err as ZerodropError);
            return;
          }
          const key = this.keys.get(p.kid);
          if (!key) {
            this.waitForKey(s);
            return;
          }
          try {
            data = JSON.parse(await openText(key, s.stream, data));
          } catch (err) {
            s.fail(err instanceof ZerodropError ? err : new ZerodropError("DECRYPT_FAILED", String(err), { stream: s.stream }));
            return;
          }
          encrypted = true;
          kid = p.kid;
        }
        if (s.error) return;
        if (s.inbox[0] !== e) continue; // the inbox was changed while decrypting
        s.inbox.shift();
        if (s.keyTimer) {
          clearTimeout(s.keyTimer);
          s.keyTimer = null;
        }
        s.waitingKeySince = null;
        s.give(e, bytesOf(data), encrypted, kid);
      }
    } finally {
      s.pumping = false;
    }
    s.endIfClosed();
  }

  private waitForKey(s: Subscription): void {
    if (s.inbox.length > this.opt.keyBufferEvents) {
      s.fail(new ZerodropError("KEY_BUFFER_FULL", `more than ${this.opt.keyBufferEvents} events waited for a key`, { stream: s.stream }));
      return;
    }
    if (s.waitingKeySince === null) {
      s.waitingKeySince = Date.now();
      s.keyTimer = setTimeout(() => {
        if (s.waitingKeySince !== null) {
          s.fail(new ZerodropError("KEY_UNAVAILABLE", `no key arrived within ${this.opt.keyTimeout} ms`, { stream: s.stream }));
        }
      }, this.opt.keyTimeout);
    }
  }

  /** Reads `(after, to]` over HTTP with the connect token; null when the subscription ended. */
  private async readRange(s: Subscription, after: number, to: number): Promise<RawEvent[] | null> {
    const out: RawEvent[] = [];
    let at = after;
    let tries = 0;
    while (at < to && !s.error) {
      const base = httpBase(this.urls[this.idx % this.urls.length]);
      let page: { events?: RawEvent[]; epoch?: string };
      try {
        const q = `after=${at}&limit=${Math.min(1000, to - at)}${s.epoch ? `&epoch=${s.epoch}` : ""}`;
        page = (await this.getJson(`${base}/v1/streams/${encodeURIComponent(s.stream)}/events?${q}`, s.stream)) as typeof page;
      } catch (e) {
        if (e instanceof ZerodropError) {
          s.fail(e);
          return null;
        }
        if (++tries > 50) {
          await sleep(this.opt.maxDelay);
        } else {
          await sleep(Math.max(Math.random() * Math.min(this.opt.maxDelay, this.opt.baseDelay * 2 ** Math.min(tries, 10)), e instanceof HttpError ? e.retryAfterMs : 0));
        }
        continue;
      }
      const evs = page.events ?? [];
      if (evs.length === 0) break;
      if (evs[0].seq > at + 1) {
        s.fail(new ZerodropError("REPLAY_WINDOW_TRIMMED", "the missing range was trimmed", { stream: s.stream, firstAvailableSeq: evs[0].seq }));
        return null;
      }
      for (const e of evs) {
        if (e.seq > to) break;
        out.push(e);
        at = e.seq;
      }
    }
    return out;
  }

  private async getText(url: string, stream: string): Promise<string> {
    let r: Response;
    try {
      r = await fetch(url, { headers: { Authorization: `Bearer ${this.token}` } });
    } catch (e) {
      throw new HttpError(0, {}, 0);
    }
    const text = await r.text();
    if (r.ok) return text;
    let body: { error?: Record<string, unknown> } = {};
    try {
      body = JSON.parse(text) as typeof body;
    } catch {
      // not JSON
    }
    const err = body.error ?? {};
    const code = String(err.code ?? "");
    if (r.status >= 500 || r.status === 429 || TRANSIENT.has(code)) {
      const ra = Number(r.headers.get("Retry-After") ?? "0") * 1000;
      throw new HttpError(r.status, err, ra);
    }
    throw errorFrom(Object.keys(err).length ? err : { code: r.status === 401 ? "UNAUTHORIZED" : "FORBIDDEN" }, stream);
  }

  private async getJson(url: string, stream: string): Promise<Record<string, unknown>> {
    return JSON.parse(await this.getText(url, stream)) as Record<string, unknown>;
  }

  /** @internal */
  scheduleAck(): void {
    if (this.transport !== "ws" || this.ackTimer || this.closed) return;
    this.ackTimer = setTimeout(() => {
      this.ackTimer = null;
      this.flushAcks();
    }, this.opt.ackInterval);
  }

  private flushAcks(): void {
    const ws = this.ws;
    if (!ws || !this.welcomed || ws.readyState !== WebSocket.OPEN) return;
    const acks: Record<string, number> = {};
    let any = false;
    for (const s of this.subs.values()) {
      if (s.confirmed && s.handledSeq !== null && s.handledSeq > s.ackedSeq) {
        acks[s.stream] = s.handledSeq;
        s.ackedSeq = s.handledSeq;
        any = true;
      }
    }
    if (!any) return;
    if (this.protocol === "zerodrop.v2" || this.protocol === "zerodrop.v3") {
      ws.send(JSON.stringify({ type: "ack", acks }));
    } else {
      for (const [stream, seq] of Object.entries(acks)) ws.send(JSON.stringify({ type: "ack", stream, seq }));
    }
  }

  // ----------------------------------------------------------------------------------- SSE

  /** The set of subscriptions changed: the first opens the response at once; a change to an
   *  open one reopens it once, after every change made in the same tick. */
  private sseChanged(): void {
    if (!this.sse.es && !this.sse.timer) return this.sseOpen();
    if (this.sse.reopen) return;
    this.sse.reopen = true;
    queueMicrotask(() => {
      this.sse.reopen = false;
      if (this.sse.timer) return; // a reconnect is scheduled: it takes the new set
      this.sseOpen();
    });
  }

  private sseStop(): void {
    this.sse.es?.close();
    this.sse.es = null;
    if (this.sse.timer) clearTimeout(this.sse.timer);
    this.sse.timer = null;
    this.sse.streams = [];
  }

  /** The cursor (`?lastEventId=`) of what each subscription delivered: streams grouped by the
   *  epoch last seen (an empty epoch: the stream's current one). A stream with no position
   *  starts at the head. */
  private sseCursor(subs: Subscription[]): string {
    const groups = new Map<string, string[]>();
    for (const s of subs) {
      const after = s.delivered ?? s.startAfter;
      if (after === undefined || after === null) continue;
      const epoch = this.sseEpoch.get(s.stream) ?? "";
      let g = groups.get(epoch);
      if (!g) groups.set(epoch, (g = []));
      g.push(`${s.stream}=${after}`);
    }
    return [...groups].map(([e, g]) => `${e}:${g.join(",")}`).join(";");
  }

  /** (Re)opens the one EventSource for every live subscription, from what each delivered. */
  private sseOpen(): void {
    const state = this.sse;
    state.es?.close();
    state.es = null;
    const subs = [...this.subs.values()].filter((s) => !s.error && s.closingAt === null);
    state.streams = subs.map((s) => s.stream);
    if (this.closed || subs.length === 0) return;
    const base = httpBase(this.urls[this.idx % this.urls.length]);
    let url = `${base}/v1/sse?streams=${subs.map((s) => encodeURIComponent(s.stream)).join(",")}&token=${encodeURIComponent(this.token)}`;
    const cursor = this.sseCursor(subs);
    if (cursor) url += `&lastEventId=${encodeURIComponent(cursor)}`;
    // Whether each stream had a position: without one, the first event sets it.
    const positioned = new Set(subs.filter((s) => (s.delivered ?? s.startAfter) != null).map((s) => s.stream));
    const es = new EventSource(url);
    state.es = es;
    const facts = (m: Event): Record<string, unknown> => {
      try {
        return JSON.parse((m as MessageEvent).data as string) as Record<string, unknown>;
      } catch {
        return {};
      }
    };
    es.addEventListener("event", (m) => {
      if (state.es !== es) return;
      state.attempt = 0;
      state.refreshed = false;
      const e = facts(m) as unknown as RawEvent;
      const s = this.subs.get(String(e.stream));
      if (!s || typeof e.seq !== "number") return;
      if (typeof e.epoch === "string") this.sseEpoch.set(s.stream, e.epoch);
      if (s.delivered === null && !positioned.has(s.stream)) s.delivered = e.seq - 1;
      s.inbox.push(e);
      void this.pump(s);
    });
    es.addEventListener("closed", (m) => {
      if (state.es !== es) return;
      const d = facts(m);
      const s = this.subs.get(String(d.stream));
      if (!s) return;
      // That stream has ended on the server; the others go on (the response ends after the
      // last, and is not reopened).
      state.streams = state.streams.filter((x) => x !== s.stream);
      if (state.streams.length === 0) {
        es.close();
        state.es = null;
      }
      s.closing(Number(d.lastSeq ?? s.delivered ?? 0));
    });
    es.addEventListener("reset", (m) => {
      if (state.es !== es) return;
      const d = facts(m);
      const s = this.subs.get(String(d.stream));
      if (!s) return;
      if (typeof d.epoch === "string") this.sseEpoch.set(s.stream, d.epoch);
      s.fail(errorFrom({ code: d.code ?? "EPOCH_CHANGED", message: "the stream's position cannot be served", ...d }, s.stream));
    });
    es.onerror = (ev: Event) => {
      if (state.es !== es) return;
      // Reopen ourselves (next url, from what was delivered) rather than let EventSource
      // retry the same URL forever or give up after a non-200 answer.
      es.close();
      state.es = null;
      const live = () => [...this.subs.values()].filter((s) => !s.error);
      // The server's own end (`event: error` {code, message}): TOKEN_EXPIRED reopens with a
      // fresh token from the provider (once per expiry); another terminal code ends the
      // subscriptions; a transient one is retried like a dropped response.
      const data = (ev as MessageEvent).data;
      if (typeof data === "string") {
        let d: Record<string, unknown> = {};
        try {
          d = JSON.parse(data) as Record<string, unknown>;
        } catch {
          // not the server's typed end
        }
        const code = typeof d.code === "string" ? d.code : "";
        const provide = this.opt.tokenProvider;
        const failAll = () => {
          for (const s of live()) s.fail(errorFrom(d, s.stream));
        };
        if (code === "TOKEN_EXPIRED" && provide && !state.refreshed) {
          state.refreshed = true;
          provide().then((token) => {
            if (typeof token !== "string" || !token) return failAll();
            this.token = token;
            this.sseOpen();
          }, failAll);
          return;
        }
        if (code && !TRANSIENT.has(code)) {
          failAll();
          return;
        }
      }
      // A refusal before the response started (a non-200) says nothing to EventSource: ask
      // once per stream whether it is still allowed.
      void Promise.all(live().map(async (s) => [s, await this.sseProbe(s)] as const)).then((answers) => {
        for (const [s, err] of answers) if (err) s.fail(err);
        this.idx = (this.idx + 1) % this.urls.length;
        const cap = Math.min(this.opt.maxDelay, this.opt.baseDelay * 2 ** state.attempt);
        state.attempt = Math.min(state.attempt + 1, 30);
        if (state.timer) clearTimeout(state.timer);
        state.timer = setTimeout(() => {
          state.timer = null;
          this.sseOpen();
        }, Math.random() * cap);
      });
    };
  }

  private async sseProbe(s: Subscription): Promise<ZerodropError | null> {
    const base = httpBase(this.urls[this.idx % this.urls.length]);
    try {
      const r = await fetch(`${base}/v1/streams/${encodeURIComponent(s.stream)}/events?limit=1&after=0`, {
        headers: { Authorization: `Bearer ${this.token}` },
      });
      if (r.status === 401 || r.status === 403) {
        const b = (await r.json().catch(() => ({}))) as { error?: Record<string, unknown> };
        return errorFrom(b.error ?? { code: r.status === 401 ? "UNAUTHORIZED" : "FORBIDDEN" }, s.stream);
      }
    } catch {
      // unreachable: transient
    }
    return null;
  }
}
