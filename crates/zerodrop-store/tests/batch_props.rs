//! The batch rule, property-tested on the memory store: each stream's part of a batch is
//! appended whole — contiguous, in request order, after what the stream held — or not at
//! all, and a refused part leaves its stream exactly as it was while the other parts commit.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use zerodrop_core::retention::Retention;
use zerodrop_core::{Seq, StreamId};
use zerodrop_store::{
    BatchItem, IdempotencyKey, MemoryStore, NoSink, Store, StoreError, StreamBatch,
};

/// One item: which of three streams, its data, and an optional key out of a few (so keys
/// repeat, within a batch and across batches, with the same or another body).
fn item() -> impl Strategy<Value = (u8, u8, Option<u8>)> {
    (0u8..3, 0u8..4, proptest::option::of(0u8..4))
}

/// One stream's part as the model sees it: the stream and its items' data and keys.
type Part = (u8, Vec<(String, Option<u8>)>);

/// A key with its body's fingerprint (the data itself, padded: distinct for distinct data).
fn key(k: u8, data: &str) -> IdempotencyKey {
    let mut fingerprint = [0u8; 32];
    let n = data.len().min(32);
    fingerprint[..n].copy_from_slice(&data.as_bytes()[..n]);
    IdempotencyKey {
        key: format!("k{k}"),
        fingerprint,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn each_part_is_appended_whole_in_order_or_not_at_all(
        batches in proptest::collection::vec(proptest::collection::vec(item(), 1..12), 1..6)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let retention = Retention { max_events: 10_000, max_bytes: u64::MAX, max_age_ms: u64::MAX };
            let store = MemoryStore::new(retention, Arc::new(NoSink));
            // The model: per stream, the data appended; per (stream, key), (data, seq).
            let mut log: BTreeMap<u8, Vec<String>> = BTreeMap::new();
            let mut keys: BTreeMap<(u8, u8), (String, u64)> = BTreeMap::new();
            for batch in batches {
                let mut parts: Vec<Part> = Vec::new();
                for (s, d, k) in batch {
                    let data = format!("\"d{d}\"");
                    match parts.iter_mut().find(|(ps, _)| *ps == s) {
                        Some((_, items)) => items.push((data, k)),
                        None => parts.push((s, vec![(data, k)])),
                    }
                }
                let request: Vec<StreamBatch> = parts
                    .iter()
                    .map(|(s, items)| StreamBatch {
                        stream: StreamId::new(&format!("s:{s}")).unwrap(),
                        items: items
                            .iter()
                            .map(|(data, k)| BatchItem {
                                data: data.clone(),
                                idempotency: k.map(|k| key(k, data)),
                            })
                            .collect(),
                    })
                    .collect();
                let out = store.append_batch(request).await.unwrap();
                prop_assert_eq!(out.len(), parts.len());
                for ((s, items), got) in parts.iter().zip(out) {
                    // The model's verdict for this part, decided before anything is written.
                    let mut reused = false;
                    let mut seen: BTreeMap<u8, String> = BTreeMap::new();
                    for (data, k) in items {
                        let Some(k) = k else { continue };
                        let earlier = seen.get(k).cloned()
                            .or_else(|| keys.get(&(*s, *k)).map(|(d, _)| d.clone()));
                        match earlier {
                            Some(d) if d != *data => reused = true,
                            _ => { seen.insert(*k, data.clone()); }
                        }
                    }
                    let stream_log = log.entry(*s).or_default();
                    if reused {
                        prop_assert_eq!(got.unwrap_err(), StoreError::IdempotencyKeyReused);
                        continue;
                    }
                    let got = got.unwrap();
                    let mut part_keys: BTreeMap<u8, u64> = BTreeMap::new();
                    for ((data, k), o) in items.iter().zip(&got) {
                        let first = k.and_then(|k| {
                            part_keys.get(&k).copied().or_else(|| keys.get(&(*s, k)).map(|x| x.1))
                        });
                        match first {
                            Some(seq) => {
                                prop_assert!(o.duplicate);
                                prop_assert_eq!(o.seq, Seq(seq));
                            }
                            None => {
                                prop_assert!(!o.duplicate);
                                stream_log.push(data.clone());
                                prop_assert_eq!(o.seq, Seq(stream_log.len() as u64));
                                if let Some(k) = k {
                                    part_keys.insert(*k, o.seq.0);
                                    keys.insert((*s, *k), (data.clone(), o.seq.0));
                                }
                            }
                        }
                    }
                }
                // The stored logs are exactly the model's: contiguous, in request order.
                for (s, expected) in &log {
                    let stream = StreamId::new(&format!("s:{s}")).unwrap();
                    let r = store.read(&stream, Seq(0), 10_000).await.unwrap();
                    prop_assert_eq!(r.info.head, Seq(expected.len() as u64));
                    let datas: Vec<String> = r.events.iter().map(|e| {
                        let v: serde_json::Value = serde_json::from_slice(e.json()).unwrap();
                        v["data"].to_string()
                    }).collect();
                    let seqs: Vec<u64> = r.events.iter().map(|e| e.seq().0).collect();
                    prop_assert_eq!(&datas, expected);
                    prop_assert_eq!(seqs, (1..=expected.len() as u64).collect::<Vec<_>>());
                }
            }
            Ok(())
        })?;
    }
}
