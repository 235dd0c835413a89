//! Compression (SPEC §11): WebSocket `permessage-deflate` (RFC 7692) and the gzip of SSE
//! responses.
//!
//! tungstenite has no extensions, so `permessage-deflate` is a layer under it: [`DeflateIo`]
//! wraps the upgraded connection's bytes and rewrites whole frames as they pass, so the
//! WebSocket code above sees plain frames and keeps every limit and error it has.
//!
//! - **Negotiation** ([`negotiate`]): an offer is accepted unless it asks for a server window
//!   below 32 KiB (`server_max_window_bits` < 15: the compressor cannot promise it; the offer
//!   is declined and the socket runs uncompressed). The answer is always
//!   `permessage-deflate; server_no_context_takeover; client_no_context_takeover` ([`ANSWER`]):
//!   every message is compressed, and decompressed, on its own. That is the memory bound: a
//!   connection keeps no compression state between messages (no 32 KiB window, no ~300 KiB
//!   compressor per socket); each runtime thread has one compressor and one decompressor,
//!   reset per message. Since a message then always compresses to the same bytes, each thread
//!   remembers the last payloads it compressed (`Recent`): an event fanned out to many sockets
//!   is compressed once per thread.
//! - **Outgoing** (server role): a text or binary message of at least [`MIN_COMPRESS`] bytes
//!   goes out compressed (`RSV1`, deflate with a sync flush, the `00 00 ff ff` tail removed);
//!   control frames and smaller messages go out as they are.
//! - **Incoming**: a compressed message (its first frame has `RSV1`; continuations follow) is
//!   gathered, compressed, up to the frame limit, then inflated with the same limit on its
//!   inflated size, and handed up as one plain frame. A message over the limit either way
//!   (a decompression bomb included) reaches tungstenite as a frame header declaring one byte
//!   more than the limit, so it fails exactly like a plain frame that is too large (close 1009,
//!   `PAYLOAD_TOO_LARGE`), having cost at most the limit in memory. Anything else is passed
//!   through untouched, and tungstenite judges it (`RSV1` on a control frame or without the
//!   extension is a protocol error there).
//!
//! The client role (tests, benches) answers the other way round: it watches the handshake's
//! response head go by, turns on when the server accepted the extension, inflates what the
//! server compressed and sends its own frames uncompressed (which RFC 7692 allows).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::http::{HeaderMap, header};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The extension's name.
pub const EXTENSION: &str = "permessage-deflate";
/// The server's answer to an accepted offer.
pub const ANSWER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// Messages smaller than this go out uncompressed: deflate would save nothing on them.
pub const MIN_COMPRESS: usize = 64;
/// Outgoing bytes held, compressed, before a write waits for the socket.
const WRITE_HIGH: usize = 64 * 1024;
/// A buffer emptied holds on to at most this much: an idle socket keeps almost nothing.
const KEEP: usize = 4096;
/// What one read from the socket takes at most.
const READ_CHUNK: usize = 8 * 1024;
/// The deflate level: 1, the fastest. JSON events are small and repetitive; a higher level
/// costs CPU per message for little on them (docs/benchmarks.md).
const LEVEL: u32 = 1;

/// Whether a request's `Sec-WebSocket-Extensions` offers `permessage-deflate` in a form this
/// server accepts (see the module doc).
pub fn negotiate(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(acceptable)
}

/// One offer: `permessage-deflate` with parameters it may carry, each at most once.
fn acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|n| n.eq_ignore_ascii_case(EXTENSION))
    {
        return false;
    }
    let mut seen: Vec<String> = Vec::new();
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (
                n.trim().to_ascii_lowercase(),
                Some(v.trim().trim_matches('"')),
            ),
            None => (p.to_ascii_lowercase(), None),
        };
        if seen.contains(&name) {
            return false;
        }
        let ok = match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => true,
            // Any client window: each message is inflated on its own, with a 32 KiB window.
            ("client_max_window_bits", None) => true,
            ("client_max_window_bits", Some(v)) => window_bits(v).is_some(),
            // The compressor's window is 32 KiB: a smaller one cannot be promised.
            ("server_max_window_bits", Some(v)) => window_bits(v) == Some(15),
            _ => false,
        };
        if !ok {
            return false;
        }
        seen.push(name);
    }
    true
}

fn window_bits(v: &str) -> Option<u8> {
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

/// Which end of the socket a [`DeflateIo`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Compresses what it sends, inflates what it receives (masked frames).
    Server,
    /// Inflates what it receives (unmasked frames), sends its frames as they are.
    Client,
}

/// A connection's bytes with `permessage-deflate` applied (see the module doc). With the
/// extension off it passes everything through and holds nothing.
pub struct DeflateIo<IO> {
    io: IO,
    state: State,
}

enum State {
    Plain,
    /// Client role, before the end of the handshake's response head.
    Head(Box<HeadSoFar>),
    /// Client role, extension declined: these bytes go up, then plain reads.
    Drain(Vec<u8>, usize),
    On(Box<Codec>),
}

struct HeadSoFar {
    limit: usize,
    bytes: Vec<u8>,
}

struct Codec {
    role: Role,
    limit: usize,
    /// Bytes read and not yet parsed.
    raw: Vec<u8>,
    /// Plain frames ready for the reader above, from `out_at`.
    out: Vec<u8>,
    out_at: usize,
    /// Payload bytes of a passed-through frame still to come.
    passing: u64,
    /// The compressed message being gathered: its opcode and payload so far.
    msg: Option<(u8, Vec<u8>)>,
    /// After a message over the limit: what is ready goes up, then the end of the stream.
    failed: bool,
    eof: bool,
    /// Compressed messages received and inflated.
    inflated: u64,
    /// Bytes written by the writer above and not yet parsed into whole frames.
    wraw: Vec<u8>,
    /// Frames ready for the socket, from `wout_at`.
    wout: Vec<u8>,
    wout_at: usize,
}

impl<IO> DeflateIo<IO> {
    /// The server's end: compressing when `on` (the offer was accepted), with `limit` the
    /// largest message accepted (compressed and inflated).
    pub fn server(io: IO, on: bool, limit: usize) -> DeflateIo<IO> {
        let state = if on {
            State::On(Box::new(Codec::new(Role::Server, limit)))
        } else {
            State::Plain
        };
        DeflateIo { io, state }
    }

    /// A client's end, before its handshake: it turns on if the server's response head
    /// accepts `permessage-deflate` (the request must have offered it).
    pub fn client(io: IO, limit: usize) -> DeflateIo<IO> {
        DeflateIo {
            io,
            state: State::Head(Box::new(HeadSoFar {
                limit,
                bytes: Vec::new(),
            })),
        }
    }

    /// Whether the extension is in use.
    pub fn is_on(&self) -> bool {
        matches!(self.state, State::On(_))
    }

    /// How many compressed messages this end has received (and inflated).
    pub fn inflated(&self) -> u64 {
        match &self.state {
            State::On(c) => c.inflated,
            _ => 0,
        }
    }
}

impl Codec {
    fn new(role: Role, limit: usize) -> Codec {
        Codec {
            role,
            limit,
            raw: Vec::new(),
            out: Vec::new(),
            out_at: 0,
            passing: 0,
            msg: None,
            failed: false,
            eof: false,
            inflated: 0,
            wraw: Vec::new(),
            wout: Vec::new(),
            wout_at: 0,
        }
    }

    /// Moves what `raw` holds into `out`, frame by frame.
    fn parse_read(&mut self) -> io::Result<()> {
        let mut at = 0;
        while !self.failed {
            if self.passing > 0 {
                let n =
                    (self.raw.len() - at).min(usize::try_from(self.passing).unwrap_or(usize::MAX));
                self.out.extend_from_slice(&self.raw[at..at + n]);
                at += n;
                self.passing -= n as u64;
                if self.passing > 0 {
                    break;
                }
                continue;
            }
            let Some(h) = Head::parse(&self.raw[at..]) else {
                break;
            };
            let data = h.opcode <= 2;
            let compressed = data
                && match (&self.msg, h.opcode) {
                    (None, 1 | 2) => h.rsv1,
                    (Some(_), 0) => !h.rsv1,
                    _ => false,
                };
            if !compressed {
                if data && self.msg.is_some() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a new message inside a compressed one",
                    ));
                }
                self.out.extend_from_slice(&self.raw[at..at + h.size]);
                at += h.size;
                self.passing = h.len;
                continue;
            }
            let have = self.msg.as_ref().map_or(0, |(_, d)| d.len());
            if h.len > self.limit.saturating_sub(have) as u64 {
                self.too_large();
                break;
            }
            let len = h.len as usize;
            if self.raw.len() - at < h.size + len {
                break;
            }
            let payload = &self.raw[at + h.size..at + h.size + len];
            let (_, buf) = self.msg.get_or_insert_with(|| (h.opcode, Vec::new()));
            let start = buf.len();
            buf.extend_from_slice(payload);
            if h.masked {
                for (i, b) in buf[start..].iter_mut().enumerate() {
                    *b ^= h.key[i % 4];
                }
            }
            at += h.size + len;
            if h.fin {
                let Some((opcode, buf)) = self.msg.take() else {
                    break;
                };
                match inflate(&buf, self.limit)? {
                    Some(plain) => {
                        self.inflated += 1;
                        let mask = self.masks();
                        write_head(&mut self.out, 0x80 | opcode, plain.len(), mask);
                        self.out.extend_from_slice(&plain);
                    }
                    None => self.too_large(),
                }
            }
        }
        self.raw.drain(..at);
        if self.failed || (self.raw.is_empty() && self.raw.capacity() > KEEP) {
            self.raw = Vec::new();
        }
        Ok(())
    }

    /// Frames sent to this role's reader are masked when it is the server.
    fn masks(&self) -> bool {
        self.role == Role::Server
    }

    /// A header one byte over the limit: the reader above fails as for any frame too large.
    fn too_large(&mut self) {
        let mask = self.masks();
        write_head(&mut self.out, 0x81, self.limit.saturating_add(1), mask);
        self.failed = true;
        self.msg = None;
    }

    /// Moves the whole frames of `wraw` into `wout`, compressing data messages.
    fn parse_write(&mut self) {
        let mut at = 0;
        while let Some(h) = Head::parse(&self.wraw[at..]) {
            let len = usize::try_from(h.len).unwrap_or(usize::MAX);
            if self.wraw.len() - at < h.size.saturating_add(len) {
                break;
            }
            let frame = &self.wraw[at..at + h.size + len];
            let payload = &frame[h.size..];
            if self.role == Role::Server
                && h.fin
                && !h.rsv1
                && !h.masked
                && matches!(h.opcode, 1 | 2)
                && len >= MIN_COMPRESS
            {
                let packed = compress(payload);
                write_head(&mut self.wout, 0xc0 | h.opcode, packed.len(), false);
                self.wout.extend_from_slice(&packed);
            } else {
                self.wout.extend_from_slice(frame);
            }
            at += h.size + len;
        }
        self.wraw.drain(..at);
        if self.wraw.is_empty() && self.wraw.capacity() > KEEP {
            self.wraw = Vec::new();
        }
    }
}

/// A frame's header.
struct Head {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    masked: bool,
    len: u64,
    key: [u8; 4],
    /// The header's own length.
    size: usize,
}

impl Head {
    /// The header at the start of `b`, once it is all there.
    fn parse(b: &[u8]) -> Option<Head> {
        let (&b0, &b1) = (b.first()?, b.get(1)?);
        let masked = b1 & 0x80 != 0;
        let (len, mut size) = match b1 & 0x7f {
            126 => (u64::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?])), 4),
            127 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(b.get(2..10)?);
                (u64::from_be_bytes(n), 10)
            }
            l => (u64::from(l), 2),
        };
        let mut key = [0u8; 4];
        if masked {
            key.copy_from_slice(b.get(size..size + 4)?);
            size += 4;
        }
        Some(Head {
            fin: b0 & 0x80 != 0,
            rsv1: b0 & 0x40 != 0,
            opcode: b0 & 0x0f,
            masked,
            len,
            key,
            size,
        })
    }
}

/// A frame header; `mask` adds a zero masking key (a client's frames must be masked; zero
/// leaves the payload as it is).
fn write_head(out: &mut Vec<u8>, b0: u8, len: usize, mask: bool) {
    let m = if mask { 0x80 } else { 0 };
    out.push(b0);
    if len < 126 {
        out.push(m | len as u8);
    } else if let Ok(l) = u16::try_from(len) {
        out.push(m | 126);
        out.extend_from_slice(&l.to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if mask {
        out.extend_from_slice(&[0; 4]);
    }
}

thread_local! {
    /// This thread's compressor and decompressor, reset per message (no context takeover).
    static CODERS: RefCell<(Compress, Decompress)> =
        RefCell::new((Compress::new(Compression::new(LEVEL), false), Decompress::new(false)));
}

/// One message, deflated on its own with a sync flush, without the `00 00 ff ff` tail.
fn compress(payload: &[u8]) -> Vec<u8> {
    let mut out = deflate_sync(payload);
    if out.ends_with(&[0, 0, 0xff, 0xff]) {
        out.truncate(out.len() - 4);
    }
    out
}

/// Payloads up to this size are remembered compressed (per thread, see [`Recent`]).
const RECENT_MAX_PAYLOAD: usize = 4096;
/// How many compressed payloads each thread remembers.
const RECENT_ENTRIES: usize = 64;

/// The payloads this thread compressed last, with their compressed form: every subscriber of
/// an event is sent the same frame, and without context takeover it compresses to the same
/// bytes, so a thread compresses it once, not once per subscriber. At most
/// [`RECENT_ENTRIES`] payloads of at most [`RECENT_MAX_PAYLOAD`] bytes.
#[derive(Default)]
struct Recent {
    entries: std::collections::VecDeque<(u64, Vec<u8>, Vec<u8>)>,
}

impl Recent {
    fn get(&self, hash: u64, plain: &[u8]) -> Option<Vec<u8>> {
        self.entries
            .iter()
            .rev()
            .find(|(h, p, _)| *h == hash && p == plain)
            .map(|(_, _, packed)| packed.clone())
    }

    fn put(&mut self, hash: u64, plain: &[u8], packed: &[u8]) {
        if self.entries.len() >= RECENT_ENTRIES {
            self.entries.pop_front();
        }
        self.entries
            .push_back((hash, plain.to_vec(), packed.to_vec()));
    }
}

thread_local! {
    static RECENT: RefCell<Recent> = RefCell::default();
}

/// `payload` deflated on its own, ending with a sync flush (an empty stored block: the output
/// ends on a byte, and such pieces can follow one another in one deflate stream). Small
/// payloads this thread compressed lately are not compressed again ([`Recent`]).
fn deflate_sync(payload: &[u8]) -> Vec<u8> {
    if payload.len() > RECENT_MAX_PAYLOAD {
        return deflate_fresh(payload);
    }
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        payload.hash(&mut h);
        h.finish()
    };
    if let Some(packed) = RECENT.with_borrow(|r| r.get(hash, payload)) {
        return packed;
    }
    let packed = deflate_fresh(payload);
    RECENT.with_borrow_mut(|r| r.put(hash, payload, &packed));
    packed
}

/// [`deflate_sync`] without the memory of recent payloads.
fn deflate_fresh(payload: &[u8]) -> Vec<u8> {
    CODERS.with_borrow_mut(|(c, _)| {
        c.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        loop {
            let before = c.total_in();
            let at = usize::try_from(before)
                .unwrap_or(usize::MAX)
                .min(payload.len());
            // A sync flush always ends the block: the loop stops once all input is in and the
            // output had room left.
            if c.compress_vec(&payload[at..], &mut out, FlushCompress::Sync)
                .is_err()
            {
                break;
            }
            let all_in = usize::try_from(c.total_in()).unwrap_or(usize::MAX) >= payload.len();
            if all_in && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        out
    })
}

/// Whether a request's `Accept-Encoding` takes gzip (`gzip` or `x-gzip` with a `q` above 0).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let q = parts
                .filter_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip")) && q > 0.0
        })
}

/// A gzip response body made of pieces compressed one by one: each [`GzipBody::piece`] is
/// deflated on its own (this thread's compressor) and ends with a sync flush, so the client can
/// decode it as soon as it arrives; the connection keeps only the CRC and the length.
pub struct GzipBody {
    crc: flate2::Crc,
    started: bool,
    finished: bool,
}

impl Default for GzipBody {
    fn default() -> Self {
        GzipBody::new()
    }
}

impl GzipBody {
    /// The gzip header: deflate, no name, no time, unknown OS.
    const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

    pub fn new() -> GzipBody {
        GzipBody {
            crc: flate2::Crc::new(),
            started: false,
            finished: false,
        }
    }

    /// `plain`, compressed (after the gzip header, the first time).
    pub fn piece(&mut self, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.started {
            out.extend_from_slice(&Self::HEADER);
            self.started = true;
        }
        self.crc.update(plain);
        out.extend_from_slice(&deflate_sync(plain));
        out
    }

    /// The end of the stream (an empty final block, the CRC and the length), once.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        if self.finished {
            return None;
        }
        self.finished = true;
        let mut out = Vec::with_capacity(20);
        if !self.started {
            out.extend_from_slice(&Self::HEADER);
        }
        // A final block with fixed codes holding only its end marker.
        out.extend_from_slice(&[0x03, 0x00]);
        out.extend_from_slice(&self.crc.sum().to_le_bytes());
        out.extend_from_slice(&self.crc.amount().to_le_bytes());
        Some(out)
    }
}

/// One message inflated, or `None` once it would exceed `limit` bytes (never holding more than
/// `limit + 1`). Corrupt data is an error.
fn inflate(packed: &[u8], limit: usize) -> io::Result<Option<Vec<u8>>> {
    const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
    CODERS.with_borrow_mut(|(_, d)| {
        d.reset(false);
        let cap = limit.saturating_add(1);
        let mut out: Vec<u8> = Vec::with_capacity(packed.len().saturating_mul(4).max(256).min(cap));
        let mut input = packed;
        let mut tail_done = false;
        loop {
            if input.is_empty() && !tail_done {
                input = &TAIL;
                tail_done = true;
            }
            if out.len() == out.capacity() {
                if out.len() >= cap {
                    return Ok(None);
                }
                let more = out.capacity().min(cap - out.len());
                out.reserve_exact(more);
            }
            let (in0, out0) = (d.total_in(), d.total_out());
            let status = d
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let used = usize::try_from(d.total_in() - in0).unwrap_or(usize::MAX);
            input = &input[used.min(input.len())..];
            if out.len() > limit {
                return Ok(None);
            }
            let room = out.len() < out.capacity();
            if status == Status::StreamEnd || (input.is_empty() && tail_done && room) {
                return Ok(Some(out));
            }
            if used == 0 && d.total_out() == out0 && room {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated deflate data",
                ));
            }
        }
    })
}

/// The end of an HTTP response head, and whether it accepted the extension.
fn head_end(head: &[u8]) -> Option<(usize, bool)> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
    let on = text.lines().any(|l| {
        l.strip_prefix("sec-websocket-extensions:")
            .is_some_and(|v| v.contains(EXTENSION))
    });
    Some((end, on))
}

impl<IO: AsyncRead + Unpin> AsyncRead for DeflateIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Plain => return Pin::new(&mut this.io).poll_read(cx, buf),
                State::Drain(rest, at) => {
                    let n = (rest.len() - *at).min(buf.remaining());
                    buf.put_slice(&rest[*at..*at + n]);
                    *at += n;
                    if *at == rest.len() {
                        this.state = State::Plain;
                    }
                    return Poll::Ready(Ok(()));
                }
                State::On(c) => {
                    if c.out_at < c.out.len() {
                        let n = (c.out.len() - c.out_at).min(buf.remaining());
                        buf.put_slice(&c.out[c.out_at..c.out_at + n]);
                        c.out_at += n;
                        if c.out_at == c.out.len() {
                            c.out.clear();
                            c.out_at = 0;
                            if c.out.capacity() > KEEP {
                                c.out = Vec::new();
                            }
                        }
                        return Poll::Ready(Ok(()));
                    }
                    if c.failed || c.eof {
                        return Poll::Ready(Ok(()));
                    }
                }
                State::Head(_) => {}
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            let got = rb.filled();
            if let State::On(c) = &mut this.state {
                if got.is_empty() {
                    c.eof = true;
                    // A frame cut short goes up as it is: the reader above sees it end.
                    let rest = std::mem::take(&mut c.raw);
                    c.out.extend_from_slice(&rest);
                } else {
                    c.raw.extend_from_slice(got);
                    c.parse_read()?;
                }
                continue;
            }
            let State::Head(h) = &mut this.state else {
                continue;
            };
            if got.is_empty() {
                // The connection ended inside the head: what there is goes up, then the end.
                this.state = State::Drain(std::mem::take(&mut h.bytes), 0);
                continue;
            }
            h.bytes.extend_from_slice(got);
            let Some((end, on)) = head_end(&h.bytes) else {
                continue;
            };
            let rest = h.bytes.split_off(end);
            let shown = std::mem::take(&mut h.bytes);
            if on {
                let mut c = Codec::new(Role::Client, h.limit);
                c.out = shown;
                c.raw = rest;
                c.parse_read()?;
                this.state = State::On(Box::new(c));
            } else {
                // Not accepted: the head and what followed go up as they are, then plain.
                let mut all = shown;
                all.extend_from_slice(&rest);
                this.state = State::Drain(all, 0);
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> DeflateIo<IO> {
    /// Writes what is ready for the socket; `Pending` only when it cannot all go now.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let State::On(c) = &mut self.state else {
            return Poll::Ready(Ok(()));
        };
        while c.wout_at < c.wout.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &c.wout[c.wout_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            c.wout_at += n;
        }
        c.wout.clear();
        c.wout_at = 0;
        if c.wout.capacity() > KEEP {
            c.wout = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for DeflateIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match &this.state {
            State::On(c) if c.role == Role::Server => {}
            _ => return Pin::new(&mut this.io).poll_write(cx, buf),
        }
        if this.poll_drain(cx)?.is_pending()
            && let State::On(c) = &this.state
            && c.wout.len() - c.wout_at >= WRITE_HIGH
        {
            return Poll::Pending;
        }
        if let State::On(c) = &mut this.state {
            c.wraw.extend_from_slice(buf);
            c.parse_write();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offers(v: &str) -> bool {
        let mut h = HeaderMap::new();
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v.parse().unwrap());
        negotiate(&h)
    }

    #[test]
    fn offers_are_accepted_unless_they_ask_for_a_small_server_window() {
        assert!(offers("permessage-deflate; client_max_window_bits"));
        assert!(offers("permessage-deflate"));
        assert!(offers(
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=10"
        ));
        assert!(offers("x-webkit-deflate-frame, permessage-deflate"));
        assert!(offers(
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ));
        assert!(!offers("permessage-deflate; server_max_window_bits=10"));
        assert!(!offers("permessage-deflate; server_max_window_bits"));
        assert!(!offers("permessage-deflate; client_max_window_bits=16"));
        assert!(!offers("permessage-deflate; unknown_param"));
        assert!(!offers(
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
        ));
        assert!(!offers("x-webkit-deflate-frame"));
        assert!(!negotiate(&HeaderMap::new()));
    }

    #[test]
    fn a_payload_compressed_lately_is_not_compressed_again() {
        let msg = br#"{"type":"event","stream":"s","seq":99,"data":{"padding":"qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq"}}"#;
        let first = deflate_sync(msg);
        assert_eq!(deflate_sync(msg), first);
        assert_eq!(deflate_fresh(msg), first);
        assert!(RECENT.with_borrow(|r| r.entries.iter().any(|(_, p, _)| p == msg)));
        // Bounded: older payloads make room.
        for i in 0..RECENT_ENTRIES {
            deflate_sync(format!("payload number {i} of many").as_bytes());
        }
        assert!(
            RECENT.with_borrow(|r| r.entries.len() == RECENT_ENTRIES
                && !r.entries.iter().any(|(_, p, _)| p == msg))
        );
        // Large payloads are not remembered.
        let big = vec![b'z'; RECENT_MAX_PAYLOAD + 1];
        deflate_sync(&big);
        assert!(RECENT.with_borrow(|r| !r.entries.iter().any(|(_, p, _)| *p == big)));
    }

    #[test]
    fn a_message_compresses_and_inflates_back() {
        let msg = br#"{"type":"event","stream":"s","seq":1,"data":{"a":1,"b":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#;
        let packed = compress(msg);
        assert!(packed.len() < msg.len());
        assert_eq!(inflate(&packed, 1000).unwrap().unwrap(), msg.to_vec());
        // The limit holds on the inflated size.
        assert_eq!(inflate(&packed, msg.len() - 1).unwrap(), None);
        assert_eq!(
            inflate(&packed, msg.len()).unwrap().unwrap().len(),
            msg.len()
        );
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 10 * 1024 * 1024];
        let packed = compress(&zeros);
        assert!(packed.len() < 128 * 1024, "{}", packed.len());
        assert_eq!(inflate(&packed, 131_072).unwrap(), None);
    }

    #[test]
    fn a_gzip_body_decodes_piece_by_piece() {
        use std::io::Write;
        let mut body = GzipBody::new();
        let mut dec = flate2::write::GzDecoder::new(Vec::new());
        let mut want = Vec::new();
        for i in 0..5 {
            let plain = format!(
                "id: {i}\ndata: {{\"n\":{i},\"pad\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}}\n\n"
            );
            want.extend_from_slice(plain.as_bytes());
            dec.write_all(&body.piece(plain.as_bytes())).unwrap();
            dec.flush().unwrap();
            // Each piece decodes fully on arrival.
            assert_eq!(dec.get_ref(), &want);
        }
        dec.write_all(&body.finish().unwrap()).unwrap();
        assert_eq!(body.finish(), None);
        assert_eq!(dec.finish().unwrap(), want);
    }

    #[test]
    fn accept_encoding() {
        let takes = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, v.parse().unwrap());
            accepts_gzip(&h)
        };
        assert!(takes("gzip"));
        assert!(takes("gzip, deflate, br, zstd"));
        assert!(takes("br;q=1.0, GZIP;q=0.5"));
        assert!(!takes("gzip;q=0"));
        assert!(!takes("identity"));
        assert!(!takes("br, *"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    /// A client frame: masked with `key`.
    fn client_frame(b0: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut f = Vec::new();
        write_head(&mut f, b0, payload.len(), false);
        f[1] |= 0x80;
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    #[test]
    fn a_fragmented_compressed_message_around_a_ping_reads_as_one_plain_frame() {
        let msg =
            br#"{"type":"subscribe","stream":"room:1","after":0,"pad":"xxxxxxxxxxxxxxxxxxxxxxxx"}"#;
        let packed = compress(msg);
        let (a, b) = packed.split_at(packed.len() / 2);
        let mut c = Codec::new(Role::Server, 1024);
        let mut wire = client_frame(0x41, a, [1, 2, 3, 4]); // text, RSV1, not final
        wire.extend(client_frame(0x89, b"hi", [5, 6, 7, 8])); // ping
        wire.extend(client_frame(0x80, b, [9, 9, 9, 9])); // continuation, final
        // Byte by byte: every split of the input gives the same output.
        for byte in wire {
            c.raw.push(byte);
            c.parse_read().unwrap();
        }
        let mut want = client_frame(0x89, b"hi", [5, 6, 7, 8]);
        write_head(&mut want, 0x81, msg.len(), true);
        want.extend_from_slice(msg);
        assert_eq!(c.out, want);
        assert_eq!(c.inflated, 1);
        assert!(c.raw.is_empty() && c.msg.is_none());
    }

    #[test]
    fn a_compressed_message_over_the_limit_becomes_a_header_over_the_limit() {
        let mut c = Codec::new(Role::Server, 100);
        let packed = compress(&[b'a'; 101]);
        c.raw = client_frame(0xc1, &packed, [0, 0, 0, 0]);
        c.parse_read().unwrap();
        let h = Head::parse(&c.out).unwrap();
        assert_eq!((h.opcode, h.len, h.masked), (1, 101, true));
        assert!(c.failed);
        // Exactly at the limit: read.
        let mut c = Codec::new(Role::Server, 101);
        c.raw = client_frame(0xc1, &packed, [0, 0, 0, 0]);
        c.parse_read().unwrap();
        assert!(!c.failed);
        assert_eq!(Head::parse(&c.out).unwrap().len, 101);
    }

    #[test]
    fn outgoing_data_frames_are_compressed_and_control_frames_are_not() {
        let msg = br#"{"type":"event","stream":"room:1","seq":7,"data":{"k":"vvvvvvvvvvvvvvvvvvvvvvvv"}}"#;
        let mut c = Codec::new(Role::Server, 1 << 20);
        write_head(&mut c.wraw, 0x81, msg.len(), false);
        c.wraw.extend_from_slice(msg);
        write_head(&mut c.wraw, 0x89, 2, false);
        c.wraw.extend_from_slice(b"hi");
        write_head(&mut c.wraw, 0x81, 5, false);
        c.wraw.extend_from_slice(b"small");
        c.parse_write();
        let h = Head::parse(&c.wout).unwrap();
        assert!(h.rsv1 && h.fin && h.opcode == 1 && !h.masked);
        let end = h.size + h.len as usize;
        let body = &c.wout[h.size..end];
        assert_eq!(inflate(body, 1 << 20).unwrap().unwrap(), msg.to_vec());
        let mut rest = Vec::new();
        write_head(&mut rest, 0x89, 2, false);
        rest.extend_from_slice(b"hi");
        write_head(&mut rest, 0x81, 5, false);
        rest.extend_from_slice(b"small");
        assert_eq!(&c.wout[end..], &rest[..]);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(inflate(&[0xff, 0xff, 0xff, 0xff, 0x00], 1000).is_err());
    }
}
