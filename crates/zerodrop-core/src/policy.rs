//! Stream patterns as per-stream settings use them, and the rule that picks the one that
//! applies: the most specific.
//!
//! A pattern is an exact stream id (`orders:eu`) or a prefix ending in `*` (`orders:*`; a
//! lone `*` matches every stream), the same syntax as a connect token's grants
//! ([`crate::grant`]). Of the patterns that match a stream, the most specific wins:
//!
//! 1. an exact id beats every prefix;
//! 2. of two prefixes, the longer one wins (`orders:eu:*` over `orders:*` over `*`).
//!
//! Two different prefixes that both match a stream always differ in length (one is a prefix
//! of the other), and a table holds each pattern once, so there are no ties: the rule names
//! exactly one pattern or none. A table refuses the same pattern twice
//! ([`PatternError::Duplicate`]) rather than keeping one of them silently.
//!
//! A lookup hashes the stream id once (the exact ids) and then compares it with the prefixes,
//! longest first, stopping at the first that matches: a few tens of nanoseconds for a few
//! patterns, and nothing to look up when the table is empty.

use std::collections::HashMap;

use crate::ids::StreamId;
use crate::retention::Retention;

/// An exact stream id or a prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StreamPattern {
    /// The stream with exactly this id.
    Exact(String),
    /// Every stream whose id starts with this (the pattern without its `*`; empty for `*`).
    Prefix(String),
}

/// Why a pattern or a table is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error(
        "{0:?} is neither a stream id nor a prefix ending in '*' \
         (ids are 1-128 characters of A-Z a-z 0-9 _ . : -)"
    )]
    Invalid(String),
    #[error("the pattern {0:?} is given twice")]
    Duplicate(String),
}

impl StreamPattern {
    /// Reads `orders:eu` (exact), `orders:*` (prefix) or `*` (every stream).
    pub fn parse(text: &str) -> Result<StreamPattern, PatternError> {
        let invalid = || PatternError::Invalid(text.to_string());
        match text.strip_suffix('*') {
            Some("") => Ok(StreamPattern::Prefix(String::new())),
            Some(prefix) => {
                StreamId::validate(prefix).map_err(|_| invalid())?;
                Ok(StreamPattern::Prefix(prefix.to_string()))
            }
            None => {
                StreamId::validate(text).map_err(|_| invalid())?;
                Ok(StreamPattern::Exact(text.to_string()))
            }
        }
    }

    pub fn matches(&self, stream: &str) -> bool {
        match self {
            StreamPattern::Exact(id) => id == stream,
            StreamPattern::Prefix(p) => stream.starts_with(p.as_str()),
        }
    }

    /// How specific the pattern is: any exact id ranks above every prefix, and a longer
    /// prefix above a shorter one. Of the patterns matching one stream no two rank the same.
    pub fn rank(&self) -> (bool, usize) {
        match self {
            StreamPattern::Exact(id) => (true, id.len()),
            StreamPattern::Prefix(p) => (false, p.len()),
        }
    }
}

impl std::fmt::Display for StreamPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamPattern::Exact(id) => f.write_str(id),
            StreamPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Values keyed by stream pattern; [`PatternTable::resolve`] finds the most specific.
#[derive(Clone, Debug)]
pub struct PatternTable<T> {
    exact: HashMap<String, T>,
    /// `(prefix, the pattern as written, value)`, longest prefix first, so the first match
    /// is the most specific.
    prefixes: Vec<(String, String, T)>,
}

impl<T> Default for PatternTable<T> {
    fn default() -> Self {
        PatternTable {
            exact: HashMap::new(),
            prefixes: Vec::new(),
        }
    }
}

/// A match: the pattern as written, and its value.
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved<'a, T> {
    pub pattern: &'a str,
    pub value: &'a T,
}

impl<T> Clone for Resolved<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Resolved<'_, T> {}

impl<T> PatternTable<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.prefixes.len()
    }

    /// Adds `value` under `pattern` (validated); the same pattern twice is refused.
    pub fn insert(&mut self, pattern: &str, value: T) -> Result<(), PatternError> {
        let parsed = StreamPattern::parse(pattern)?;
        let text = parsed.to_string();
        match parsed {
            StreamPattern::Exact(id) => {
                if self.exact.contains_key(&id) {
                    return Err(PatternError::Duplicate(text));
                }
                self.exact.insert(id, value);
            }
            StreamPattern::Prefix(p) => {
                if self.prefixes.iter().any(|(q, _, _)| *q == p) {
                    return Err(PatternError::Duplicate(text));
                }
                let at = self
                    .prefixes
                    .iter()
                    .position(|(q, _, _)| q.len() < p.len())
                    .unwrap_or(self.prefixes.len());
                self.prefixes.insert(at, (p, text, value));
            }
        }
        Ok(())
    }

    /// The most specific pattern matching `stream`, with its value; `None` if none matches.
    pub fn resolve(&self, stream: &str) -> Option<Resolved<'_, T>> {
        if self.is_empty() {
            return None;
        }
        if let Some((id, value)) = self.exact.get_key_value(stream) {
            return Some(Resolved { pattern: id, value });
        }
        self.prefixes
            .iter()
            .find(|(p, _, _)| stream.starts_with(p.as_str()))
            .map(|(_, pattern, value)| Resolved { pattern, value })
    }

    /// Every pattern with its value: the exact ids in name order, then the prefixes longest
    /// first (the order in which they win).
    pub fn iter(&self) -> impl Iterator<Item = (StreamPattern, &T)> {
        let mut exact: Vec<(&String, &T)> = self.exact.iter().collect();
        exact.sort_by(|a, b| a.0.cmp(b.0));
        exact
            .into_iter()
            .map(|(id, v)| (StreamPattern::Exact(id.clone()), v))
            .chain(
                self.prefixes
                    .iter()
                    .map(|(p, _, v)| (StreamPattern::Prefix(p.clone()), v)),
            )
    }

    /// Every value, in no particular order, without allocating (for aggregates such as the
    /// longest age).
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.exact
            .values()
            .chain(self.prefixes.iter().map(|(_, _, v)| v))
    }

    /// The same patterns with each value mapped.
    pub fn map<U>(&self, f: impl Fn(&T) -> U) -> PatternTable<U> {
        PatternTable {
            exact: self.exact.iter().map(|(k, v)| (k.clone(), f(v))).collect(),
            prefixes: self
                .prefixes
                .iter()
                .map(|(p, text, v)| (p.clone(), text.clone(), f(v)))
                .collect(),
        }
    }
}

/// Retention per stream: the global limits, and the patterns that set their own.
#[derive(Clone, Debug, Default)]
pub struct RetentionRules {
    pub default: Retention,
    pub patterns: PatternTable<Retention>,
}

impl RetentionRules {
    pub fn new(default: Retention, patterns: PatternTable<Retention>) -> RetentionRules {
        RetentionRules { default, patterns }
    }

    /// The limits that apply to `stream`.
    pub fn for_stream(&self, stream: &str) -> &Retention {
        self.patterns
            .resolve(stream)
            .map_or(&self.default, |r| r.value)
    }

    /// The longest age any stream keeps (a sweep with this age is safe for every stream).
    pub fn longest_age_ms(&self) -> u64 {
        self.patterns
            .values()
            .map(|r| r.max_age_ms)
            .fold(self.default.max_age_ms, u64::max)
    }

    /// The shortest age any stream keeps.
    pub fn shortest_age_ms(&self) -> u64 {
        self.patterns
            .values()
            .map(|r| r.max_age_ms)
            .fold(self.default.max_age_ms, u64::min)
    }

    /// Whether every stream keeps events for the same age (one sweep over all streams does).
    pub fn one_age(&self) -> bool {
        self.longest_age_ms() == self.shortest_age_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(patterns: &[&str]) -> PatternTable<usize> {
        let mut t = PatternTable::new();
        for (i, p) in patterns.iter().enumerate() {
            t.insert(p, i).expect("valid pattern");
        }
        t
    }

    fn winner(t: &PatternTable<usize>, stream: &str) -> Option<String> {
        t.resolve(stream).map(|r| r.pattern.to_string())
    }

    #[test]
    fn exact_beats_prefix_and_longer_prefix_beats_shorter() {
        let t = table(&["*", "orders:*", "orders:eu:*", "orders:eu:1", "orders"]);
        assert_eq!(winner(&t, "orders:eu:1").as_deref(), Some("orders:eu:1"));
        assert_eq!(winner(&t, "orders:eu:2").as_deref(), Some("orders:eu:*"));
        assert_eq!(winner(&t, "orders:us").as_deref(), Some("orders:*"));
        assert_eq!(winner(&t, "orders").as_deref(), Some("orders"));
        assert_eq!(winner(&t, "ordersx").as_deref(), Some("*"));
        assert_eq!(winner(&t, "chat").as_deref(), Some("*"));
        assert_eq!(*t.resolve("orders:eu:1").expect("a match").value, 3);
        let t = table(&["orders:*"]);
        assert_eq!(winner(&t, "orders:").as_deref(), Some("orders:*"));
        assert_eq!(winner(&t, "order"), None);
        assert_eq!(winner(&PatternTable::<usize>::new(), "a"), None);
    }

    #[test]
    fn bad_and_duplicate_patterns_are_refused() {
        let mut t = PatternTable::new();
        for bad in ["", "a b", "a*b", "**", "a:*:*", &"x".repeat(129)] {
            assert!(
                matches!(t.insert(bad, 0), Err(PatternError::Invalid(_))),
                "{bad:?}"
            );
        }
        t.insert("a:*", 0).expect("valid");
        assert_eq!(
            t.insert("a:*", 1),
            Err(PatternError::Duplicate("a:*".into()))
        );
        t.insert("*", 0).expect("valid");
        assert_eq!(t.insert("*", 1), Err(PatternError::Duplicate("*".into())));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn retention_rules_pick_the_streams_limits() {
        let short = Retention {
            max_events: 5,
            max_bytes: 100,
            max_age_ms: 1_000,
        };
        let mut p = PatternTable::new();
        p.insert("tmp:*", short).expect("valid");
        let rules = RetentionRules::new(Retention::default(), p);
        assert_eq!(*rules.for_stream("tmp:1"), short);
        assert_eq!(*rules.for_stream("orders:1"), Retention::default());
        assert_eq!(rules.shortest_age_ms(), 1_000);
        assert_eq!(rules.longest_age_ms(), Retention::default().max_age_ms);
        assert!(!rules.one_age());
        assert!(RetentionRules::default().one_age());
    }

    /// Patterns over a small alphabet, so that they overlap often.
    fn pattern() -> impl Strategy<Value = String> {
        ("[ab:]{0,4}", any::<bool>()).prop_filter_map("a valid pattern", |(s, star)| {
            let p = if star { format!("{s}*") } else { s };
            StreamPattern::parse(&p).ok().map(|_| p)
        })
    }

    proptest! {
        /// The winner matches the stream, and it ranks above every other matching pattern
        /// (no two matching patterns rank the same); no match means no pattern matches.
        #[test]
        fn the_most_specific_matching_pattern_wins(
            patterns in proptest::collection::hash_set(pattern(), 0..12),
            stream in "[ab:]{1,6}",
        ) {
            let patterns: Vec<String> = patterns.into_iter().collect();
            let mut t = PatternTable::new();
            for p in &patterns {
                t.insert(p, p.clone()).expect("valid and distinct");
            }
            let matching: Vec<StreamPattern> = patterns
                .iter()
                .map(|p| StreamPattern::parse(p).expect("valid"))
                .filter(|p| p.matches(&stream))
                .collect();
            match t.resolve(&stream) {
                None => prop_assert!(matching.is_empty()),
                Some(r) => {
                    prop_assert_eq!(r.pattern, r.value.as_str());
                    let won = StreamPattern::parse(r.pattern).expect("valid");
                    prop_assert!(won.matches(&stream));
                    for m in &matching {
                        if *m != won {
                            prop_assert!(m.rank() < won.rank(), "{} beats {}", m, won);
                        }
                    }
                }
            }
        }
    }
}
