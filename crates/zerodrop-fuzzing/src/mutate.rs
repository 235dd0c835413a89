//! A small deterministic mutator for the smoke test: the same seed gives the same inputs on
//! every machine, so a failure in CI reproduces. No coverage feedback (that is libFuzzer's
//! job in the long runs); it only makes sure the targets meet inputs beyond their seeds.

/// xorshift64*: enough randomness for picking mutations, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Tokens that matter to the parsers under test: JSON structure, escapes, the separators of
/// tokens and ids, numbers at their limits, TOML syntax.
const DICTIONARY: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b".",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e309",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1.5",
    b"\"type\"",
    b"\"data\"",
    b"\"acks\"",
    b"v1",
    b"k1",
    b"=",
    b"\n",
    b"[upstreams.a]",
    b"[webhooks.a]",
    b"\xff",
    b"\xc3\xa9",
    b" ",
];

/// `input` changed by one to four edits; `other` may be spliced in.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(8) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next_u64() as u8;
            }
            2 if !out.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(out.len());
                out.drain(at.min(end)..end);
            }
            3 => {
                let word = DICTIONARY[rng.below(DICTIONARY.len())];
                out.splice(at..at, word.iter().copied());
            }
            4 if !out.is_empty() => {
                // Repeat a slice: nesting, long runs.
                let from = rng.below(out.len());
                let end = (from + 1 + rng.below(16)).min(out.len());
                let piece = out[from..end].repeat(1 + rng.below(80));
                out.splice(at..at, piece);
            }
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(64)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            6 => out.truncate(at),
            _ => out.insert(at, rng.next_u64() as u8),
        }
    }
    out
}

/// Runs `target` over every seed, then over `mutations` mutated seeds (chosen and mutated
/// from `seed`); answers how many inputs it ran.
pub fn run(target: fn(&[u8]), seeds: &[Vec<u8>], mutations: usize, seed: u64) -> usize {
    for s in seeds {
        target(s);
    }
    if seeds.is_empty() {
        return 0;
    }
    let mut rng = Rng::new(seed);
    for _ in 0..mutations {
        let a = &seeds[rng.below(seeds.len())];
        let b = &seeds[rng.below(seeds.len())];
        target(&mutate(&mut rng, a, b));
    }
    seeds.len() + mutations
}
