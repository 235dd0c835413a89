//! The live path: this instance's subscription to the live channel (trims, renewed epochs,
//! closes, presence and holder notices of every stream) and to the event channels of the
//! streams it watches (their events, from every instance), the only feed of its sink, in the
//! order Redis published them; kept up by one task that resets the sink after any gap and
//! follows the watched set; and the holder notices this instance publishes.
//!
//! Must not: decide what a subscriber receives (the log does; pub/sub is only a doorbell).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ::redis::aio::PubSubSink;
use ::redis::{Client, RedisError, Value};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use zerodrop_core::{Epoch, Event, Seq, SessionId, StreamId};

use super::keys::{CHANNEL, EVENT_CHANNEL_PATTERN, event_channel};
use super::sentinel::Resolver;
use super::{Shared, lock};
use crate::{StoreError, StoreResult};

/// The pub/sub connection is pinged this often; a silent one is replaced.
pub(super) const LIVE_PING_EVERY: Duration = Duration::from_secs(5);

/// Where the subscription connects: the configured servers in turn (a single server, or a
/// cluster's seed nodes: pub/sub reaches every node), or the primary the sentinels name at
/// that moment.
pub(super) enum Endpoints {
    Fixed(Vec<Client>),
    Sentinel(Arc<Resolver>),
}

impl Endpoints {
    async fn client(&self, attempt: usize) -> Result<Client, RedisError> {
        match self {
            Endpoints::Fixed(clients) => Ok(clients[attempt % clients.len()].clone()),
            Endpoints::Sentinel(resolver) => resolver.primary().await,
        }
    }
}

/// A decoded live message.
pub(super) enum Live<'a> {
    /// A new event (the message also names the append that made it, for diagnostics).
    Event {
        event: Event,
    },
    Trimmed {
        stream: StreamId,
        first: Seq,
        count: u64,
    },
    Renewed {
        stream: StreamId,
        epoch: Epoch,
    },
    Closed {
        stream: StreamId,
        last_seq: Seq,
    },
    /// A connection (on any instance) now holds a session.
    Held {
        holder: &'a str,
        session: SessionId,
    },
    /// A stream's presence log grew.
    Presence {
        stream: StreamId,
    },
}

pub(super) fn text(p: Option<&[u8]>) -> Option<&str> {
    p.and_then(|b| std::str::from_utf8(b).ok())
}

pub(super) fn parse_live(payload: &[u8]) -> Option<Live<'_>> {
    let mut parts = payload.splitn(7, |b| *b == b'|');
    let kind = parts.next()?;
    match kind {
        b"e" => {
            let _origin = text(parts.next())?;
            let stream = StreamId::new(text(parts.next())?).ok()?;
            let seq = text(parts.next())?.parse().ok()?;
            let epoch = Epoch::parse(text(parts.next())?)?;
            let ts = text(parts.next())?.parse().ok()?;
            let json = Bytes::copy_from_slice(parts.next()?);
            let event = Event::from_stored(stream, Seq(seq), epoch, ts, json);
            Some(Live::Event { event })
        }
        b"t" => Some(Live::Trimmed {
            stream: StreamId::new(text(parts.next())?).ok()?,
            first: Seq(text(parts.next())?.parse().ok()?),
            count: text(parts.next())?.parse().ok()?,
        }),
        b"r" => Some(Live::Renewed {
            stream: StreamId::new(text(parts.next())?).ok()?,
            epoch: Epoch::parse(text(parts.next())?)?,
        }),
        b"p" => Some(Live::Presence {
            stream: StreamId::new(text(parts.next())?).ok()?,
        }),
        b"c" => Some(Live::Closed {
            stream: StreamId::new(text(parts.next())?).ok()?,
            last_seq: Seq(text(parts.next())?.parse().ok()?),
        }),
        b"h" => Some(Live::Held {
            holder: text(parts.next())?,
            session: SessionId::parse(text(parts.next())?)?,
        }),
        _ => None,
    }
}

impl Shared {
    pub(super) fn on_live(&self, payload: &[u8]) {
        match parse_live(payload) {
            Some(Live::Event { event }) => {
                let stream = event.stream().clone();
                let (epoch, seq) = (event.epoch().clone(), event.seq().0);
                let event = Arc::new(event.with_committed_at(Instant::now()));
                // Known before any subscriber can see it: a log that later lacks it went back.
                self.observe(&stream, &epoch, seq);
                self.sink.committed(std::slice::from_ref(&event));
            }
            Some(Live::Trimmed {
                stream,
                first,
                count,
            }) => self.sink.trimmed(&stream, first, count),
            Some(Live::Renewed { stream, epoch }) => {
                self.observe(&stream, &epoch, 0);
                self.sink.recreated(&stream);
            }
            Some(Live::Closed { stream, last_seq }) => self.sink.closed(&stream, last_seq),
            Some(Live::Held { holder, session }) => self.sink.session_held(&session, holder),
            Some(Live::Presence { stream }) => self.sink.presence_changed(&stream),
            None => tracing::debug!("ignored a live message in an unknown format"),
        }
    }

    /// The live path is down.
    pub(super) fn live_lost(&self) {
        self.live_up.store(false, Ordering::Relaxed);
    }

    pub(super) async fn announce_holder(&self, id: &SessionId, holder: &str) -> StoreResult<()> {
        if holder.contains('|') {
            return Err(StoreError::Unavailable(
                "a holder name must not contain '|'".into(),
            ));
        }
        let mut conn = self.conn.clone();
        let payload = format!("h|{holder}|{id}");
        self.run("announce holder", async {
            ::redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(payload)
                .query_async::<Value>(&mut conn)
                .await
        })
        .await?;
        Ok(())
    }
}

/// Keeps this instance subscribed to the live channel and to the event channels of the
/// streams it watches, feeding the sink. After any gap in the subscription the sink is reset,
/// because messages published meanwhile were not heard; a stream watched while the
/// subscription runs is told [`LiveSink::missed`] once its channel is subscribed, since its
/// events until then were not heard either.
pub(super) async fn live_loop(
    shared: Arc<Shared>,
    endpoints: Endpoints,
    mut watch_rx: mpsc::UnboundedReceiver<StreamId>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut gap = false;
    let mut attempt: usize = 0;
    let mut logged = false;
    loop {
        let at = attempt;
        attempt = attempt.wrapping_add(1);
        let timeout = shared.opts.connect_timeout;
        // What the new subscription hears from its start: every stream watched now. Later
        // changes arrive on `watch_rx` (those made meanwhile are still queued there).
        let watched: HashSet<StreamId> = lock(&shared.watched).clone();
        let subscribed = tokio::time::timeout(timeout, async {
            let client = endpoints.client(at).await?;
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(CHANNEL).await?;
            if shared.opts.every_stream {
                ps.psubscribe(EVENT_CHANNEL_PATTERN).await?;
            } else if !watched.is_empty() {
                ps.subscribe(watched.iter().map(event_channel).collect::<Vec<_>>())
                    .await?;
            }
            Ok::<_, RedisError>(ps)
        })
        .await;
        let ps = match subscribed {
            Ok(Ok(ps)) => ps,
            Ok(Err(e)) => {
                gap = true;
                if !logged {
                    tracing::warn!(error = %e, "redis live subscription failed; retrying");
                    logged = true;
                }
                ready.take();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => {
                gap = true;
                ready.take();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if logged {
            tracing::info!("redis live subscription restored");
            logged = false;
        }
        shared.live_up.store(true, Ordering::Relaxed);
        if gap {
            shared.sink.reset();
        } else {
            for s in &watched {
                shared.sink.missed(s);
            }
        }
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        let mut hearing = watched;
        let (mut sink, mut stream) = ps.split();
        let mut ping = tokio::time::interval(LIVE_PING_EVERY);
        ping.tick().await;
        let mut changed = Vec::new();
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => shared.on_live(msg.get_payload_bytes()),
                    None => break,
                },
                n = watch_rx.recv_many(&mut changed, 1024) => {
                    if n == 0 {
                        return; // the store is gone
                    }
                    let follow = tokio::time::timeout(
                        timeout,
                        follow_watched(&shared, &mut sink, &mut hearing, &mut changed),
                    );
                    if !matches!(follow.await, Ok(Ok(()))) {
                        break;
                    }
                }
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(timeout, sink.ping::<Value>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        shared.live_lost();
        gap = true;
        if !logged {
            tracing::warn!("redis live subscription lost; resubscribing");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Brings the subscription's event channels (`hearing`) in line with the watched set for the
/// streams named in `changed` (drained): subscribes the newly watched ones and tells the sink
/// each [`LiveSink::missed`] once its channel is confirmed, unsubscribes the ones let go.
async fn follow_watched(
    shared: &Shared,
    sink: &mut PubSubSink,
    hearing: &mut HashSet<StreamId>,
    changed: &mut Vec<StreamId>,
) -> Result<(), RedisError> {
    let (mut start, mut stop) = (Vec::new(), Vec::new());
    {
        let watched = lock(&shared.watched);
        for s in changed.drain(..) {
            match (watched.contains(&s), hearing.contains(&s)) {
                (true, false) => {
                    hearing.insert(s.clone());
                    start.push(s);
                }
                (false, true) => {
                    hearing.remove(&s);
                    stop.push(s);
                }
                _ => {}
            }
        }
    }
    if !stop.is_empty() {
        sink.unsubscribe(stop.iter().map(event_channel).collect::<Vec<_>>())
            .await?;
    }
    if !start.is_empty() {
        sink.subscribe(start.iter().map(event_channel).collect::<Vec<_>>())
            .await?;
        for s in &start {
            shared.sink.missed(s);
        }
    }
    Ok(())
}

impl Shared {
    /// Adds `stream` to the watched set (`on`) or takes it out; the live task follows.
    pub(super) fn watch(&self, stream: &StreamId, on: bool) {
        if self.opts.every_stream {
            return;
        }
        let changed = {
            let mut w = lock(&self.watched);
            if on {
                w.insert(stream.clone())
            } else {
                w.remove(stream)
            }
        };
        if changed {
            let _ = self.watch_tx.send(stream.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_messages_decode() {
        let e = Event::encode(
            StreamId::new("room:1").unwrap(),
            Seq(3),
            Epoch::parse("00ff00ff00ff00ff").unwrap(),
            1_700_000_000_123,
            "{\"a\":\"x|y\"}",
        );
        let mut msg = b"e|inst-9|room:1|3|00ff00ff00ff00ff|1700000000123|".to_vec();
        msg.extend_from_slice(e.json());
        let Some(Live::Event { event }) = parse_live(&msg) else {
            panic!("not an event")
        };
        assert_eq!(event.json(), e.json());
        assert_eq!(event.data(), "{\"a\":\"x|y\"}");
        assert_eq!((event.seq(), event.ts()), (Seq(3), 1_700_000_000_123));
        assert!(matches!(
            parse_live(b"t|room:1|8|7"),
            Some(Live::Trimmed {
                first: Seq(8),
                count: 7,
                ..
            })
        ));
        assert!(matches!(
            parse_live(b"r|room:1|abc"),
            Some(Live::Renewed { .. })
        ));
        assert!(matches!(
            parse_live(b"h|ab12-7|s_1-x"),
            Some(Live::Held { holder: "ab12-7", session }) if session.as_str() == "s_1-x"
        ));
        assert!(parse_live(b"h|ab12-7|bad id").is_none());
        assert!(parse_live(b"e|x|bad stream|1|e|1|{}").is_none());
        assert!(parse_live(b"z|whatever").is_none());
    }
}
