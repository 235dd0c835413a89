//! A CPU hog: busy threads that make the machine as loaded as a shared CI runner, so tests of
//! timing-sensitive guarantees (a drain's flush-then-close) run where scheduling is late.
//!
//! The threads spin until the hog is dropped or its deadline passes, whichever comes first.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct CpuHog {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl CpuHog {
    /// `threads` spinning threads, each stopping by itself after `limit`.
    pub fn start(threads: usize, limit: Duration) -> CpuHog {
        let stop = Arc::new(AtomicBool::new(false));
        let until = Instant::now() + limit;
        let threads = (0..threads)
            .map(|i| {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name(format!("cpu-hog-{i}"))
                    .spawn(move || {
                        let mut spins = 0u64;
                        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                            for _ in 0..10_000 {
                                spins = std::hint::black_box(spins.wrapping_add(1));
                            }
                        }
                        spins
                    })
                    .expect("spawn a cpu hog thread")
            })
            .collect();
        CpuHog { stop, threads }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
