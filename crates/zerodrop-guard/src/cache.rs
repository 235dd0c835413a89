//! Namespaced response cache (SPEC §7): upstream GET answers kept per namespace, each
//! namespace with a version. An entry answers only while it is fresh and was stored under the
//! namespace's current version, so bumping the version invalidates the whole namespace at
//! once (lazily: stale entries go when met or evicted); clearing removes its entries now.
//!
//! Bounded: at most `max_entries` in all; beyond, the oldest stored entry goes first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::clock::Clock;

struct Entry<V> {
    value: V,
    version: u64,
    stored_at_ms: u64,
    expires_at_ms: u64,
    bytes: usize,
    order: u64,
}

#[derive(Default)]
struct Namespace {
    version: u64,
    hits: u64,
    misses: u64,
}

struct Inner<V> {
    entries: HashMap<(String, String), Entry<V>>,
    /// Store order → key, for eviction of the oldest.
    order: BTreeMap<u64, (String, String)>,
    next_order: u64,
    namespaces: BTreeMap<String, Namespace>,
    evicted: u64,
}

/// One namespace as the snapshot and `GET /admin/cache` show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceStats {
    pub version: u64,
    /// Entries held under the current version and still fresh.
    pub entries: u64,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryInfo {
    pub namespace: String,
    pub key: String,
    pub version: u64,
    pub bytes: u64,
    pub stored_at_ms: u64,
    pub expires_at_ms: u64,
}

pub struct ResponseCache<V> {
    max_entries: usize,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner<V>>,
}

impl<V: Clone> ResponseCache<V> {
    pub fn new(max_entries: usize, clock: Arc<dyn Clock>) -> ResponseCache<V> {
        ResponseCache {
            max_entries,
            clock,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                order: BTreeMap::new(),
                next_order: 0,
                namespaces: BTreeMap::new(),
                evicted: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<V>> {
        // Nothing panics while the lock is held; a poisoned lock still holds consistent state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Declares a namespace at `version` (from the configuration). A version other than the
    /// one held invalidates every entry stored under the old one.
    pub fn set_version(&self, namespace: &str, version: u64) {
        let mut inner = self.lock();
        inner
            .namespaces
            .entry(namespace.to_string())
            .or_default()
            .version = version;
    }

    /// Moves the namespace to its next version: every entry it holds stops answering.
    pub fn bump(&self, namespace: &str) -> u64 {
        let mut inner = self.lock();
        let ns = inner.namespaces.entry(namespace.to_string()).or_default();
        ns.version += 1;
        ns.version
    }

    pub fn get(&self, namespace: &str, key: &str) -> Option<V> {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        let version = inner
            .namespaces
            .get(namespace)
            .map(|n| n.version)
            .unwrap_or(0);
        let id = (namespace.to_string(), key.to_string());
        let hit = match inner.entries.get(&id) {
            Some(e) if e.version == version && e.expires_at_ms > now => Some(e.value.clone()),
            Some(_) => {
                remove(&mut inner, &id);
                None
            }
            None => None,
        };
        let ns = inner.namespaces.entry(namespace.to_string()).or_default();
        if hit.is_some() {
            ns.hits += 1;
        } else {
            ns.misses += 1;
        }
        hit
    }

    /// Stores `value` (of `bytes` bytes) for `ttl_ms` under the namespace's current version.
    pub fn put(&self, namespace: &str, key: &str, value: V, bytes: usize, ttl_ms: u64) {
        if self.max_entries == 0 || ttl_ms == 0 {
            return;
        }
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        let version = inner
            .namespaces
            .entry(namespace.to_string())
            .or_default()
            .version;
        let id = (namespace.to_string(), key.to_string());
        remove(&mut inner, &id);
        while inner.entries.len() >= self.max_entries {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            inner.entries.remove(&oldest);
            inner.evicted += 1;
        }
        let order = inner.next_order;
        inner.next_order += 1;
        inner.order.insert(order, id.clone());
        inner.entries.insert(
            id,
            Entry {
                value,
                version,
                stored_at_ms: now,
                expires_at_ms: now.saturating_add(ttl_ms),
                bytes,
                order,
            },
        );
    }

    /// Removes every entry of the namespace; how many there were (0 when it was empty or
    /// unknown).
    pub fn clear(&self, namespace: &str) -> u64 {
        let mut inner = self.lock();
        let ids: Vec<(String, String)> = inner
            .entries
            .keys()
            .filter(|(ns, _)| ns == namespace)
            .cloned()
            .collect();
        for id in &ids {
            remove(&mut inner, id);
        }
        ids.len() as u64
    }

    /// Per namespace, every declared or used one.
    pub fn by_namespace(&self) -> BTreeMap<String, NamespaceStats> {
        let now = self.clock.now_ms();
        let inner = self.lock();
        let mut out: BTreeMap<String, NamespaceStats> = inner
            .namespaces
            .iter()
            .map(|(name, ns)| {
                let stats = NamespaceStats {
                    version: ns.version,
                    hits: ns.hits,
                    misses: ns.misses,
                    ..NamespaceStats::default()
                };
                (name.clone(), stats)
            })
            .collect();
        for ((ns, _), e) in &inner.entries {
            if let Some(s) = out.get_mut(ns)
                && e.version == s.version
                && e.expires_at_ms > now
            {
                s.entries += 1;
                s.bytes += e.bytes as u64;
            }
        }
        out
    }

    /// Live entries (current version, fresh), oldest stored first, at most `limit`.
    pub fn entries(&self, limit: usize) -> Vec<EntryInfo> {
        let now = self.clock.now_ms();
        let inner = self.lock();
        inner
            .order
            .values()
            .filter_map(|id| {
                let e = inner.entries.get(id)?;
                let version = inner.namespaces.get(&id.0).map(|n| n.version)?;
                (e.version == version && e.expires_at_ms > now).then(|| EntryInfo {
                    namespace: id.0.clone(),
                    key: id.1.clone(),
                    version: e.version,
                    bytes: e.bytes as u64,
                    stored_at_ms: e.stored_at_ms,
                    expires_at_ms: e.expires_at_ms,
                })
            })
            .take(limit)
            .collect()
    }

    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }
}

fn remove<V>(inner: &mut Inner<V>, id: &(String, String)) {
    if let Some(e) = inner.entries.remove(id) {
        inner.order.remove(&e.order);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn cache(max: usize) -> (Arc<ManualClock>, ResponseCache<String>) {
        let clock = Arc::new(ManualClock::new(1_000));
        (clock.clone(), ResponseCache::new(max, clock))
    }

    #[test]
    fn fresh_entries_answer_until_their_ttl() {
        let (clock, c) = cache(10);
        assert_eq!(c.get("app", "/a"), None);
        c.put("app", "/a", "A".into(), 1, 500);
        assert_eq!(c.get("app", "/a").as_deref(), Some("A"));
        assert_eq!(c.get("other", "/a"), None, "namespaces are apart");
        clock.advance(499);
        assert_eq!(c.get("app", "/a").as_deref(), Some("A"));
        clock.advance(1);
        assert_eq!(c.get("app", "/a"), None);
        let s = &c.by_namespace()["app"];
        assert_eq!((s.hits, s.misses, s.entries), (2, 2, 0));
    }

    #[test]
    fn a_new_version_invalidates_and_clear_counts_what_it_removed() {
        let (_, c) = cache(10);
        c.set_version("app", 3);
        c.put("app", "/a", "A".into(), 10, 60_000);
        c.put("app", "/b", "B".into(), 20, 60_000);
        c.put("img", "/x", "X".into(), 5, 60_000);
        let s = &c.by_namespace()["app"];
        assert_eq!((s.version, s.entries, s.bytes), (3, 2, 30));
        c.set_version("app", 4);
        assert_eq!(c.get("app", "/a"), None, "stored under version 3");
        assert_eq!(c.by_namespace()["app"].entries, 0);
        c.put("app", "/a", "A4".into(), 10, 60_000);
        assert_eq!(c.get("app", "/a").as_deref(), Some("A4"));
        assert_eq!(c.bump("app"), 5);
        assert_eq!(c.get("app", "/a"), None);
        assert_eq!(
            c.get("img", "/x").as_deref(),
            Some("X"),
            "other namespaces keep theirs"
        );
        // /b (version 3) is still held until met; clear removes what is held.
        assert_eq!(c.clear("img"), 1);
        assert_eq!(c.clear("img"), 0, "clearing an empty namespace is fine");
        assert_eq!(c.clear("nothing-here"), 0);
        assert_eq!(c.get("img", "/x"), None);
    }

    #[test]
    fn the_oldest_entry_goes_when_full() {
        let (_, c) = cache(2);
        c.put("a", "1", "1".into(), 1, 60_000);
        c.put("a", "2", "2".into(), 1, 60_000);
        c.put("a", "1", "1b".into(), 1, 60_000);
        c.put("a", "3", "3".into(), 1, 60_000);
        assert_eq!(c.get("a", "2"), None, "2 was the oldest stored");
        assert_eq!(c.get("a", "1").as_deref(), Some("1b"));
        assert_eq!(c.get("a", "3").as_deref(), Some("3"));
        assert_eq!(c.evicted(), 1);
        let listed: Vec<String> = c.entries(10).into_iter().map(|e| e.key).collect();
        assert_eq!(listed, vec!["1", "3"]);
        assert_eq!(c.entries(1).len(), 1);
    }

    #[test]
    fn a_zero_sized_cache_or_ttl_stores_nothing() {
        let (_, c) = cache(0);
        c.put("a", "1", "1".into(), 1, 60_000);
        assert_eq!(c.get("a", "1"), None);
        let (_, c) = cache(5);
        c.put("a", "1", "1".into(), 1, 0);
        assert_eq!(c.get("a", "1"), None);
    }
}
