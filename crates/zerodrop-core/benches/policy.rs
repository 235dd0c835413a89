//! What resolving a stream's policy costs per publish.
//!
//! `cargo bench -p zerodrop-core --bench policy` builds pattern tables of 0, 8 and 64
//! patterns (half exact ids, half prefixes of several lengths, as `[streams."<pattern>"]`
//! tables give them), resolves the retention limits of a stream that an exact id matches, one
//! a prefix matches and one nothing matches, `LOOKUPS` times each (env, default 2,000,000),
//! and prints the median nanoseconds per lookup over `ROUNDS` rounds (default 5), beside the
//! cost of validating the same stream id (`StreamId::new`, which every publish already pays)
//! measured in the same run.

use std::hint::black_box;
use std::time::Instant;

use zerodrop_core::{PatternTable, Retention, RetentionRules, StreamId};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rules(patterns: usize) -> RetentionRules {
    let mut t = PatternTable::new();
    for i in 0..patterns {
        let limits = Retention {
            max_events: 100 + i as u64,
            ..Retention::default()
        };
        let pattern = if i % 2 == 0 {
            format!("tenant:{i}:orders:eu")
        } else {
            format!("tenant:{}*", "x:".repeat(i % 7) + &i.to_string())
        };
        t.insert(&pattern, limits).expect("valid pattern");
    }
    t.insert("tenant:*", Retention::default())
        .expect("valid pattern");
    if patterns == 0 {
        return RetentionRules::new(Retention::default(), PatternTable::new());
    }
    RetentionRules::new(Retention::default(), t)
}

/// Nanoseconds per call of `f` over `n` calls.
fn ns_per(n: u64, mut f: impl FnMut() -> u64) -> f64 {
    let start = Instant::now();
    let mut sum = 0u64;
    for _ in 0..n {
        sum = sum.wrapping_add(f());
    }
    black_box(sum);
    start.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds = env_u64("ROUNDS", 5);
    let n = env_u64("LOOKUPS", 2_000_000);
    let streams = [
        ("exact id", "tenant:4:orders:eu"),
        ("prefix", "tenant:x:x:x:3:orders:17"),
        ("no pattern", "chat:lobby:42"),
    ];
    println!("policy lookup, median ns per lookup over {rounds} rounds of {n}");
    println!(
        "{:<10} {:<12} {:>10} {:>16} {:>8}",
        "patterns", "stream", "lookup", "StreamId::new", "ratio"
    );
    for patterns in [0usize, 8, 64] {
        let r = rules(patterns);
        for (what, stream) in streams {
            let mut lookup = Vec::new();
            let mut validate = Vec::new();
            for _ in 0..rounds {
                lookup.push(ns_per(n, || {
                    black_box(&r).for_stream(black_box(stream)).max_events
                }));
                validate.push(ns_per(n, || {
                    StreamId::new(black_box(stream)).map_or(0, |s| s.as_str().len() as u64)
                }));
            }
            let (l, v) = (median(lookup), median(validate));
            println!(
                "{:<10} {:<12} {:>8.1}ns {:>14.1}ns {:>7.2}x",
                if patterns == 0 { 0 } else { patterns + 1 },
                what,
                l,
                v,
                l / v
            );
        }
    }
}
