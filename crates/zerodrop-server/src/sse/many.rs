//! Server-Sent Events over many streams on one response (`GET /v1/sse?streams=a,b,c`, SPEC
//! §11): browsers allow six HTTP/1.1 connections per origin, so a page with many
//! subscriptions shares one `EventSource`.
//!
//! Every message's `id:` is a [`Cursor`]: the position of *every* stream of the response
//! (`<epoch>:<stream>=<seq>,…` groups, `;` between epochs), so a bare `EventSource`
//! reconnect with `Last-Event-ID` resumes each stream exactly where it was — no gap, no
//! duplicate — whichever stream the last message was about. The same value may be given as
//! `?lastEventId=` (a page opening a new `EventSource` for a changed set of streams).
//!
//! Where each stream starts is decided by the session module (`App::place`), one stream at a
//! time, like on the one-stream route; a hole is per stream: `event: reset` for that stream
//! (its `id:` the cursor with that stream restarted before its oldest retained event) while
//! the others go on. `event: closed` ends one stream; the response ends when every stream
//! has. Everything else (auth, pings, drains, expiry, stalls) is the one-stream route's.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use zerodrop_core::{Epoch, Seq, StreamId};
use zerodrop_store::PresenceEntry;

use super::{SseBody, SseConn, SseWire, authenticate, encoded, stream_response};
use crate::app::authz::Action;
use crate::app::{App, Hole, Placement, Position};
use crate::connection::{Exit, Leave, Wire};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::Query;
use crate::live::Delivery;
use crate::metrics::Transport;

#[derive(Deserialize)]
pub struct ManyQuery {
    /// The streams, comma-separated (at most `--max-streams-per-session`).
    streams: Option<String>,
    token: Option<String>,
    resume: Option<String>,
    /// A cursor (an `id:` of this route), for a new `EventSource`; `Last-Event-ID` wins.
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
    /// `presence=true`: every stream's presence entries too, from each presence log's head.
    #[serde(default)]
    presence: bool,
}

pub async fn handler(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<ManyQuery>,
) -> Response {
    match open(app, headers, q).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The position of every stream of a response, in the order of `?streams=`: what its `id:`
/// says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// No epoch: a cursor a client wrote from bare seqs (the stream's current epoch, or with
    /// `?resume=` the session's, as a bare `Last-Event-ID` on the one-stream route).
    positions: Vec<(StreamId, Option<Epoch>, Seq)>,
}

impl Cursor {
    /// Parses an `id:` of this route: `<epoch>:<stream>=<seq>(,<stream>=<seq>)*` groups
    /// separated by `;`; an empty epoch is none. At most `most` streams, each once;
    /// `INVALID_REQUEST` otherwise.
    pub fn parse(s: &str, most: usize) -> ApiResult<Cursor> {
        let bad = |why: &str| ApiError::invalid(format!("invalid SSE cursor: {why}"));
        let mut positions: Vec<(StreamId, Option<Epoch>, Seq)> = Vec::new();
        for group in s.trim().split(';') {
            let (epoch, entries) = group
                .split_once(':')
                .ok_or_else(|| bad("a group is <epoch>:<stream>=<seq>,…"))?;
            let epoch = match epoch {
                "" => None,
                e => Some(Epoch::parse(e).ok_or_else(|| bad("bad epoch"))?),
            };
            for entry in entries.split(',') {
                let (stream, seq) = entry
                    .rsplit_once('=')
                    .ok_or_else(|| bad("an entry is <stream>=<seq>"))?;
                let stream = StreamId::new(stream).map_err(|e| bad(&e.to_string()))?;
                let seq = seq.parse::<u64>().map_err(|_| bad("bad seq"))?;
                if positions.iter().any(|(s, _, _)| *s == stream) {
                    return Err(bad("a stream is named twice").with("stream", stream.as_str()));
                }
                if positions.len() == most {
                    return Err(bad(&format!("more than {most} streams")));
                }
                positions.push((stream, epoch.clone(), Seq(seq)));
            }
        }
        Ok(Cursor { positions })
    }

    /// The position of `stream`, if the cursor has one.
    pub fn get(&self, stream: &StreamId) -> Option<(Option<&Epoch>, Seq)> {
        self.positions
            .iter()
            .find(|(s, _, _)| s == stream)
            .map(|(_, e, n)| (e.as_ref(), *n))
    }

    /// Sets the position of `stream` (added at the end when new).
    pub fn set(&mut self, stream: &StreamId, epoch: &Epoch, seq: Seq) {
        match self.positions.iter_mut().find(|(s, _, _)| s == stream) {
            Some(p) => {
                if p.1.as_ref() != Some(epoch) {
                    p.1 = Some(epoch.clone());
                }
                p.2 = seq;
            }
            None => self
                .positions
                .push((stream.clone(), Some(epoch.clone()), seq)),
        }
    }

    pub fn streams(&self) -> impl Iterator<Item = &StreamId> {
        self.positions.iter().map(|(s, _, _)| s)
    }

    /// Appends the encoding to `out`: streams grouped by epoch, groups in the order of their
    /// first stream.
    pub fn encode_into(&self, out: &mut String) {
        let mut done = vec![false; self.positions.len()];
        let mut first_group = true;
        for i in 0..self.positions.len() {
            if done[i] {
                continue;
            }
            let epoch = &self.positions[i].1;
            if !first_group {
                out.push(';');
            }
            first_group = false;
            out.push_str(epoch.as_ref().map_or("", Epoch::as_str));
            out.push(':');
            let mut first = true;
            for (j, (stream, e, seq)) in self.positions.iter().enumerate().skip(i) {
                if done[j] || e != epoch {
                    continue;
                }
                done[j] = true;
                if !first {
                    out.push(',');
                }
                first = false;
                let _ = write!(out, "{}={}", stream.as_str(), seq.0);
            }
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        self.encode_into(&mut s);
        s
    }
}

/// `?streams=`: present, non-empty, valid, each once, at most `most`.
fn parse_streams(q: Option<&str>, most: usize) -> ApiResult<Vec<StreamId>> {
    let q = q
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::invalid("pass ?streams=<stream>,<stream>,…"))?;
    let mut out: Vec<StreamId> = Vec::new();
    for s in q.split(',') {
        let stream = StreamId::new(s.trim()).map_err(|e| {
            ApiError::invalid(format!("invalid stream in ?streams=: {e}")).with("stream", s)
        })?;
        if out.contains(&stream) {
            return Err(ApiError::invalid("a stream is named twice in ?streams=").with("stream", s));
        }
        if out.len() == most {
            return Err(ApiError::invalid(format!(
                "one SSE response carries at most {most} streams"
            )));
        }
        out.push(stream);
    }
    Ok(out)
}

async fn open(app: Arc<App>, headers: HeaderMap, q: ManyQuery) -> ApiResult<Response> {
    let gzip = app.cfg.sse_gzip && crate::deflate::accepts_gzip(&headers);
    let most = app.cfg.max_streams_per_session;
    let streams = parse_streams(q.streams.as_deref(), most)?;
    let given = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::invalid("invalid SSE cursor: not text"))?
                .to_string(),
        ),
        None => q.last_event_id.clone(),
    }
    .filter(|s| !s.trim().is_empty());
    let given = given.map(|s| Cursor::parse(&s, most)).transpose()?;
    if let Some(c) = &given
        && let Some(s) = c.streams().find(|s| !streams.contains(s))
    {
        return Err(
            ApiError::invalid("the SSE cursor names a stream that is not in ?streams=")
                .with("stream", s.as_str()),
        );
    }
    // Refused (draining, full) before any store work.
    let slot = app.admit()?;
    let auth = authenticate(&app, &headers, q.token.as_deref(), q.resume.as_deref()).await?;
    let mut authz = Vec::with_capacity(streams.len());
    for stream in &streams {
        let until = if auth.who_grants.may_subscribe(stream.as_str()) {
            app.authorize(&auth.who, &auth.who_grants, Action::Subscribe, Some(stream))
                .await?
        } else {
            None
        };
        authz.push(until);
    }
    let resuming = given.is_some() || auth.session.is_some();
    let mut first_chunk = vec![Bytes::from_static(b"retry: 1000\n\n")];
    let mut cursor = Cursor {
        positions: Vec::with_capacity(streams.len()),
    };
    let mut holes = Vec::new();
    let mut starts = Vec::with_capacity(streams.len());
    for stream in &streams {
        let position = match given.as_ref().and_then(|c| c.get(stream)) {
            Some((epoch, seq)) => Position::After {
                seq,
                epoch: epoch.cloned(),
            },
            None => Position::Unstated,
        };
        let placed = match app.place(stream, auth.asker(), position, None).await {
            Ok(p) => p,
            Err(e) => {
                if auth.session.is_some() {
                    app.metrics.resume_failed(Transport::Sse, e.code);
                }
                return Err(e.with("stream", stream.as_str()));
            }
        };
        let start = match placed {
            Placement::Start(s) => s,
            Placement::Hole(h) => {
                if let Some(s) = &auth.session {
                    app.restart_in_session(&s.id, &h).await;
                }
                app.metrics.error(h.code);
                let start = crate::app::StreamStart {
                    epoch: h.epoch.clone(),
                    after: h.restart_after(),
                    head: h.head,
                };
                holes.push(h);
                start
            }
        };
        cursor.set(stream, &start.epoch, start.after);
        starts.push(start);
    }
    // The resets go out with the whole cursor as their id, every stream placed.
    for h in &holes {
        first_chunk.push(reset_block(h, &cursor));
    }
    if resuming {
        app.metrics.resume_succeeded(Transport::Sse);
    }
    let mut core = auth.into_core(app, slot);
    for ((stream, start), until) in streams.iter().zip(&starts).zip(authz) {
        core.enter(stream.clone(), start).await?;
        if q.presence {
            core.watch_presence(stream, None, None)
                .await
                .map_err(|e| e.with("stream", stream.as_str()))?;
        }
        core.authorized(stream, until);
    }
    core.log_opened(None);
    let wire = ManyWire {
        inner: SseWire {
            pending: first_chunk.into(),
            chunk: Vec::new(),
        },
        open: streams.len(),
        cursor,
        id: String::new(),
    };
    let state = SseConn::new(core, wire).with_gzip(gzip);
    let res = stream_response(Body::from_stream(futures_util::stream::unfold(
        state,
        |mut st| async move {
            st.next_chunk()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(b), st))
        },
    )));
    Ok(encoded(res, gzip))
}

/// `event: reset` for a hole of one stream: the hole's code and facts with its `stream`,
/// and the whole cursor (with that stream restarted) as its id.
fn reset_block(hole: &Hole, cursor: &Cursor) -> Bytes {
    let data = json!({
        "stream": hole.stream.as_str(),
        "code": hole.code.as_str(),
        "epoch": hole.epoch,
        "firstAvailableSeq": hole.first_available,
        "headSeq": hole.head,
    });
    Bytes::from(format!(
        "id: {}\nevent: reset\ndata: {}\n\n",
        cursor.encode(),
        data
    ))
}

/// The one-stream wire, with every message's id the cursor over all the streams.
struct ManyWire {
    inner: SseWire,
    cursor: Cursor,
    /// Streams not closed yet: the response ends with the last.
    open: usize,
    /// Scratch for encoding ids.
    id: String,
}

impl SseBody for ManyWire {
    fn pending(&mut self) -> &mut VecDeque<Bytes> {
        &mut self.inner.pending
    }
}

impl Wire for ManyWire {
    async fn event(&mut self, d: &Delivery) -> Result<(), Exit> {
        let e = &d.event;
        self.cursor.set(e.stream(), e.epoch(), e.seq());
        self.id.clear();
        self.cursor.encode_into(&mut self.id);
        let c = &mut self.inner.chunk;
        c.extend_from_slice(b"id: ");
        c.extend_from_slice(self.id.as_bytes());
        c.extend_from_slice(b"\nevent: event\ndata: ");
        c.extend_from_slice(e.json());
        c.extend_from_slice(b"\n\n");
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Exit> {
        self.inner.flush().await
    }

    /// Each stream goes on from its oldest retained event after its `reset`.
    fn goes_on_after_hole(&self) -> bool {
        true
    }

    async fn hole(&mut self, hole: &Hole) -> Result<(), Exit> {
        self.inner.flush().await?;
        self.cursor
            .set(&hole.stream, &hole.epoch, hole.restart_after());
        self.inner
            .pending
            .push_back(reset_block(hole, &self.cursor));
        Ok(())
    }

    /// `event: closed` for that stream; the others go on, and the response ends after the
    /// last. The stream stays in the cursor at its last seq, so a reconnect gets `closed`
    /// for it again at once.
    async fn closed(&mut self, stream: &StreamId, last_seq: Seq) -> Result<(), Exit> {
        self.inner.flush().await?;
        let data = json!({"stream": stream.as_str(), "lastSeq": last_seq.0});
        self.inner
            .pending
            .push_back(Bytes::from(format!("event: closed\ndata: {data}\n\n")));
        self.open = self.open.saturating_sub(1);
        if self.open == 0 {
            return Err(Exit::Gone("closed"));
        }
        Ok(())
    }

    async fn ping(&mut self) -> Result<bool, Exit> {
        self.inner.ping().await
    }

    async fn token(&mut self, resume_token: String) -> Result<(), Exit> {
        self.inner.token(resume_token).await
    }

    async fn ask_refresh(&mut self, exp: u64, deadline: u64) -> Result<(), Exit> {
        self.inner.ask_refresh(exp, deadline).await
    }

    /// The whole response ends with the refusal (as on the one-stream route).
    async fn refuse(&mut self, e: ApiError) -> Result<(), Exit> {
        self.inner.refuse(e).await
    }

    async fn drain(&mut self, resume_token: Option<String>, why: Leave) -> Exit {
        self.inner.drain(resume_token, why).await
    }

    async fn presence(&mut self, e: &PresenceEntry) -> Result<(), Exit> {
        self.inner.presence(e).await
    }

    async fn presence_lost(&mut self, e: ApiError) -> Result<(), Exit> {
        self.inner.presence_lost(e).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(s: &str) -> StreamId {
        StreamId::new(s).unwrap()
    }

    #[test]
    fn a_cursor_round_trips_grouped_by_epoch() {
        let (e1, e2) = (Epoch::parse("aa11").unwrap(), Epoch::parse("bb22").unwrap());
        let mut c = Cursor { positions: vec![] };
        c.set(&sid("room:1"), &e1, Seq(5));
        c.set(&sid("b.x-y_z"), &e2, Seq(0));
        c.set(&sid("room:2"), &e1, Seq(7));
        assert_eq!(c.encode(), "aa11:room:1=5,room:2=7;bb22:b.x-y_z=0");
        assert_eq!(
            Cursor::parse(&c.encode(), 10).unwrap().get(&sid("room:2")),
            Some((Some(&e1), Seq(7)))
        );
        assert_eq!(Cursor::parse(&c.encode(), 10).unwrap().encode(), c.encode());
    }

    #[test]
    fn a_cursor_may_leave_epochs_out() {
        let c = Cursor::parse(":a=3,b=4;e1:c=5", 10).unwrap();
        assert_eq!(c.get(&sid("a")), Some((None, Seq(3))));
        assert_eq!(c.get(&sid("c")).map(|p| p.1), Some(Seq(5)));
        assert_eq!(c.encode(), ":a=3,b=4;e1:c=5");
    }

    #[test]
    fn bad_cursors_are_invalid_requests() {
        for bad in [
            "",
            "aa11",
            "aa11:room",
            "aa11:room=x",
            "aa11:room=-1",
            "a a:room=1",
            "aa11:ro om=1",
            "aa11:room=1,room=2",
            "aa11:room=1;bb:room=2",
            "aa11:room=1;",
            ":room=",
            "aa11:a=1,b=2,c=3",
        ] {
            let e = Cursor::parse(bad, 2).unwrap_err();
            assert_eq!(e.code.as_str(), "INVALID_REQUEST", "{bad}");
        }
    }
}
