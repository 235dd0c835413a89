//! The log and checkpoint rules, property-tested against a model on the `memory` and
//! `sqlite` stores: random appends, one at a time and in batches (one commit each: on SQLite,
//! one chunk that retention may reach into), with count retention, reads after and before
//! random positions and acks (stale, fresh and beyond head) on a few streams of one session. After every step the
//! store must agree with the model: contiguous seqs, the right retained window, reads that
//! start exactly after the cursor when it is retained, acks that only move forward.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use zerodrop_core::retention::Retention;
use zerodrop_core::{AckUpdate, Grants, Seq, SessionId, StreamId, now_ms};
use zerodrop_store::{
    AppendRequest, BatchItem, MemoryStore, NoSink, ReadRange, SessionRecord, SessionStream,
    SqliteOptions, SqliteStore, Store, StoreError, StreamBatch,
};

const STREAMS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Append {
        stream: usize,
    },
    AppendMany {
        stream: usize,
        n: u64,
    },
    Read {
        stream: usize,
        after: u64,
        limit: usize,
    },
    ReadBefore {
        stream: usize,
        before: u64,
        limit: usize,
    },
    Ack {
        stream: usize,
        seq: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..STREAMS).prop_map(|stream| Op::Append { stream }),
        2 => (0..STREAMS, 1u64..12).prop_map(|(stream, n)| Op::AppendMany { stream, n }),
        2 => (0..STREAMS, 0u64..40, 1usize..12)
            .prop_map(|(stream, after, limit)| Op::Read { stream, after, limit }),
        1 => (0..STREAMS, 0u64..60, 1usize..12)
            .prop_map(|(stream, before, limit)| Op::ReadBefore { stream, before, limit }),
        2 => (0..STREAMS, 0u64..40).prop_map(|(stream, seq)| Op::Ack { stream, seq }),
    ]
}

#[derive(Default, Clone)]
struct ModelStream {
    /// Seq → the payload tag appended with it (every seq ever appended).
    tags: BTreeMap<u64, u64>,
    ack: u64,
}

impl ModelStream {
    fn head(&self) -> u64 {
        self.tags.len() as u64
    }
    fn first(&self, max_events: u64) -> u64 {
        self.head().saturating_sub(max_events) + 1
    }
}

fn sid(i: usize) -> StreamId {
    StreamId::new(&format!("m:{i}")).unwrap()
}

async fn check(store: Arc<dyn Store>, max_events: u64, ops: Vec<Op>) {
    let mut model = vec![ModelStream::default(); STREAMS];
    let epoch = store.stream_info(&sid(0)).await.unwrap().epoch;
    let id = SessionId::generate();
    let streams = (0..STREAMS)
        .map(|i| {
            let st = SessionStream {
                epoch: epoch.clone(),
                ack: Seq(0),
                dropped_through: Seq(0),
            };
            (sid(i), st)
        })
        .collect();
    store
        .create_session(SessionRecord {
            id: id.clone(),
            sub: "u1".into(),
            grants: Grants {
                streams: vec!["m:*".into()],
                publish: vec![],
                info: None,
            },
            created_at_ms: now_ms(),
            expires_at_ms: now_ms() + 900_000,
            streams,
        })
        .await
        .unwrap();
    let mut tag = 1000u64;
    for op in ops {
        match op {
            Op::Append { stream } => {
                tag += 1;
                let m = &mut model[stream];
                let o = store
                    .append(AppendRequest {
                        stream: sid(stream),
                        data: tag.to_string(),
                        idempotency: None,
                    })
                    .await
                    .unwrap();
                assert_eq!(o.seq, Seq(m.head() + 1), "seqs are contiguous");
                assert!(!o.duplicate);
                m.tags.insert(o.seq.0, tag);
            }
            Op::AppendMany { stream, n } => {
                let m = &mut model[stream];
                let tags: Vec<u64> = (0..n).map(|i| tag + 1 + i).collect();
                tag += n;
                let items = tags
                    .iter()
                    .map(|t| BatchItem {
                        data: t.to_string(),
                        idempotency: None,
                    })
                    .collect();
                let mut out = store
                    .append_batch(vec![StreamBatch {
                        stream: sid(stream),
                        items,
                    }])
                    .await
                    .unwrap();
                let outcomes = out.pop().unwrap().unwrap();
                let seqs: Vec<u64> = outcomes.iter().map(|o| o.seq.0).collect();
                let want: Vec<u64> = (m.head() + 1..=m.head() + n).collect();
                assert_eq!(seqs, want, "a batch takes the next seqs, in order");
                for (s, t) in seqs.into_iter().zip(tags) {
                    m.tags.insert(s, t);
                }
            }
            Op::ReadBefore {
                stream,
                before,
                limit,
            } => {
                let m = &model[stream];
                let (head, first) = (m.head(), m.first(max_events));
                let r = store
                    .read_range(&sid(stream), ReadRange::Before(Seq(before)), limit)
                    .await
                    .unwrap();
                assert_eq!((r.info.head, r.info.first_seq), (Seq(head), Seq(first)));
                let seqs: Vec<u64> = r.events.iter().map(|e| e.seq().0).collect();
                let newest = before.saturating_sub(1).min(head);
                let want: Vec<u64> = (first..=newest).rev().take(limit).collect();
                assert_eq!(seqs, want, "before {before}: newest first, none trimmed");
                for e in &r.events {
                    assert_eq!(e.data(), m.tags[&e.seq().0].to_string());
                }
            }
            Op::Read {
                stream,
                after,
                limit,
            } => {
                let m = &model[stream];
                let (head, first) = (m.head(), m.first(max_events));
                let r = store.read(&sid(stream), Seq(after), limit).await.unwrap();
                assert_eq!(r.info.head, Seq(head));
                assert_eq!(r.info.first_seq, Seq(first), "retention keeps the newest");
                assert_eq!(r.info.count, head + 1 - first);
                let seqs: Vec<u64> = r.events.iter().map(|e| e.seq().0).collect();
                assert!(seqs.len() <= limit);
                assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
                assert!(seqs.iter().all(|s| *s > after && *s >= first && *s <= head));
                if after >= first.saturating_sub(1) {
                    // The cursor's next event is retained: the read starts exactly there.
                    let want = head.saturating_sub(after).min(limit as u64);
                    assert_eq!(seqs.len() as u64, want, "after {after}, head {head}");
                    if want > 0 {
                        assert_eq!(seqs[0], after + 1);
                    }
                }
                for e in &r.events {
                    assert_eq!(
                        e.data(),
                        m.tags[&e.seq().0].to_string(),
                        "payload of its seq"
                    );
                }
            }
            Op::Ack { stream, seq } => {
                let m = &mut model[stream];
                let got = store.checkpoint(&id, &sid(stream), Seq(seq)).await;
                if seq > m.head() {
                    assert_eq!(
                        got.unwrap_err(),
                        StoreError::AckBeyondHead {
                            requested: Seq(seq),
                            head: Seq(m.head())
                        }
                    );
                } else if seq > m.ack {
                    assert_eq!(got.unwrap(), AckUpdate::Applied(Seq(seq)));
                    m.ack = seq;
                } else {
                    assert_eq!(
                        got.unwrap(),
                        AckUpdate::Ignored(Seq(m.ack)),
                        "never backwards"
                    );
                }
            }
        }
    }
    let s = store.load_session(&id).await.unwrap().unwrap();
    for (i, m) in model.iter().enumerate() {
        assert_eq!(s.streams[&sid(i)].ack, Seq(m.ack));
    }
}

fn retention(max_events: u64) -> Retention {
    Retention {
        max_events,
        max_bytes: 1 << 40,
        max_age_ms: 86_400_000,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn memory_store_follows_the_model(max_events in 2u64..8, ops in prop::collection::vec(op(), 1..80)) {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new(retention(max_events), Arc::new(NoSink)));
        runtime().block_on(check(store, max_events, ops));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_store_follows_the_model(max_events in 2u64..8, ops in prop::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = SqliteOptions::new(dir.path().join("zerodrop.db"));
        opts.retention = retention(max_events);
        let store = Arc::new(SqliteStore::open(opts, Arc::new(NoSink)).unwrap());
        runtime().block_on(check(store.clone(), max_events, ops));
        store.close();
    }
}
