//! A live sink that records what a store reports, to check the live contract.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zerodrop_core::{Event, Seq, StreamId};
use zerodrop_store::LiveSink;

#[derive(Default)]
pub struct Recorder {
    /// `(stream, seq)` of every committed event, in the order the sink heard of them.
    pub committed: Mutex<Vec<(String, u64)>>,
    /// `(stream, first retained seq, count)` of every trim.
    pub trims: Mutex<Vec<(String, u64, u64)>>,
    pub resets: AtomicU64,
    /// Streams whose feed started late or again ([`LiveSink::missed`]), in order.
    pub missed: Mutex<Vec<String>>,
}

impl LiveSink for Recorder {
    fn committed(&self, events: &[Arc<Event>]) {
        let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        for e in events {
            c.push((e.stream().to_string(), e.seq().0));
        }
    }

    fn trimmed(&self, stream: &StreamId, first: Seq, count: u64) {
        let mut t = self.trims.lock().unwrap_or_else(|p| p.into_inner());
        t.push((stream.to_string(), first.0, count));
    }

    fn reset(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }

    fn missed(&self, stream: &StreamId) {
        let mut m = self.missed.lock().unwrap_or_else(|p| p.into_inner());
        m.push(stream.to_string());
    }
}

impl Recorder {
    /// The seqs the sink heard of for `stream`, in order.
    pub fn seqs_of(&self, stream: &str) -> Vec<u64> {
        let c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
        c.iter()
            .filter(|(s, _)| s == stream)
            .map(|(_, q)| *q)
            .collect()
    }

    /// Whether the sink was told that `stream`'s feed started ([`LiveSink::missed`]).
    pub fn was_missed(&self, stream: &str) -> bool {
        let m = self.missed.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().any(|s| s == stream)
    }

    /// Events trimmed so far, over all streams.
    pub fn trimmed_total(&self) -> u64 {
        let t = self.trims.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().map(|t| t.2).sum()
    }
}

/// Waits (polling, at most `limit`) until `f` holds; fails the test naming `what` otherwise.
pub async fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
