//! How durable a 201 is: the durability level, and the rules that read it from a store's own
//! settings (SQLite's `PRAGMA synchronous`; Redis's `appendonly`, `appendfsync` and the
//! replicas `WAIT` asks for), never from zerodrop's flags alone.
//!
//! The levels, weakest first (the order `--require-durability` compares with):
//!
//! | level | a 201 survives | stores |
//! |---|---|---|
//! | `memory` | nothing: a restart of the store loses it | the memory store; Redis `appendonly no` (RDB snapshots at most: everything since the last one is lost); SQLite `synchronous=OFF` |
//! | `os_buffered` | a crash of the store's process, not of its machine (power loss, kernel panic) | SQLite `synchronous=NORMAL`; Redis `appendonly yes` with `appendfsync everysec` or `no` |
//! | `replicated` | the loss of the store's machine, as long as one of N replicas survives it | Redis with `--redis-wait-replicas N` ≥ 1 and weaker persistence |
//! | `fsync` | a power loss: it is on the disk before the 201 | SQLite `synchronous=FULL` or `EXTRA`; Redis `appendonly yes` with `appendfsync always` |
//!
//! Must not: do I/O (each backend reads its settings and hands them here).

use std::fmt;
use std::str::FromStr;

/// What a 201 survives, weakest first: the derived order is the strength order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Durability {
    /// Nothing is persisted: a restart of the store loses every event.
    Memory,
    /// In the operating system's buffers: survives the store's process crashing, not its
    /// machine losing power.
    OsBuffered,
    /// Held by N ≥ 1 replicas (Redis `WAIT`) before the 201.
    Replicated,
    /// On the disk (fsync) before the 201.
    Fsync,
}

impl Durability {
    /// Every level, weakest first.
    pub const ALL: [Durability; 4] = [
        Durability::Memory,
        Durability::OsBuffered,
        Durability::Replicated,
        Durability::Fsync,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Memory => "memory",
            Durability::OsBuffered => "os_buffered",
            Durability::Replicated => "replicated",
            Durability::Fsync => "fsync",
        }
    }

    /// A 201 at this level survives the loss of the store's machine (`replicated`, `fsync`).
    pub fn survives_machine_loss(self) -> bool {
        self >= Durability::Replicated
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown durability level {0:?}; one of memory, os_buffered, replicated, fsync")]
pub struct UnknownDurability(pub String);

impl FromStr for Durability {
    type Err = UnknownDurability;

    fn from_str(s: &str) -> Result<Durability, UnknownDurability> {
        Durability::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| UnknownDurability(s.to_string()))
    }
}

/// A store's durability as read from its own settings: the level follows from these facts
/// ([`StoreDurability::level`]), and so does the sentence that says why and how to raise it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreDurability {
    /// The memory store keeps nothing.
    Memory,
    /// SQLite's `PRAGMA synchronous`, as the write connection reports it (0 `OFF`, 1 `NORMAL`,
    /// 2 `FULL`, 3 `EXTRA`). It is a setting of the connection, made when the store opened the
    /// file and unchanged until it closes.
    Sqlite {
        synchronous: i64,
    },
    Redis(RedisPersistence),
}

/// What a Redis store's level is read from. On a Redis Cluster, the master with the weakest
/// level (every append goes to one master, and any may be the one).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RedisPersistence {
    /// `CONFIG GET appendonly` (`yes`, `no`); `None` when it could not be read.
    pub appendonly: Option<String>,
    /// `CONFIG GET appendfsync` (`always`, `everysec`, `no`); `None` when it could not be read.
    pub appendfsync: Option<String>,
    /// `--redis-wait-replicas`: replicas every append waits for (`WAIT N`) before its 201.
    pub wait_replicas: u32,
    /// `connected_slaves` from `INFO replication`; `None` when it could not be read.
    pub connected_replicas: Option<u64>,
    /// Why the persistence settings are not known, when they are not.
    pub unread: Option<Unread>,
}

/// Why Redis's persistence settings could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unread {
    /// Redis answered and refused `CONFIG GET` (managed services often disable it: `ERR unknown
    /// command`, an ACL's `NOPERM`). The level stays the weakest that cannot be excluded.
    Refused(String),
    /// Redis has not answered since the store started; the settings are read when it does.
    Unreachable(String),
}

impl Unread {
    pub fn as_str(&self) -> &str {
        match self {
            Unread::Refused(why) | Unread::Unreachable(why) => why,
        }
    }
}

impl RedisPersistence {
    /// Nothing read yet, or `CONFIG GET` refused: the facts known from zerodrop's own
    /// settings only.
    pub fn unread(wait_replicas: u32, why: Unread) -> RedisPersistence {
        RedisPersistence {
            wait_replicas,
            unread: Some(why),
            ..RedisPersistence::default()
        }
    }

    /// What persistence alone gives: `appendonly yes` with `appendfsync always` is `fsync`,
    /// with `everysec` or `no` (written to the operating system before the reply, synced by
    /// Redis each second or by the system) `os_buffered`; `appendonly no` (RDB snapshots at
    /// most) or settings not read, `memory`: the weakest level that cannot be excluded.
    pub fn persistence_level(&self) -> Durability {
        let yes = |v: &Option<String>, want: &str| {
            v.as_deref()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case(want))
        };
        if !yes(&self.appendonly, "yes") {
            return Durability::Memory;
        }
        if yes(&self.appendfsync, "always") {
            Durability::Fsync
        } else if yes(&self.appendfsync, "everysec") || yes(&self.appendfsync, "no") {
            Durability::OsBuffered
        } else {
            Durability::Memory
        }
    }

    /// The persistence level, raised to `replicated` when every append waits for N ≥ 1
    /// replicas. Fewer connected replicas than N do not lower it: every publish then fails
    /// its `WAIT` (503 `STORE_UNAVAILABLE`), so no 201 is given that N replicas do not hold.
    pub fn level(&self) -> Durability {
        let own = self.persistence_level();
        if self.wait_replicas >= 1 {
            own.max(Durability::Replicated)
        } else {
            own
        }
    }

    /// Fewer replicas are connected than `WAIT` asks for: every publish answers 503.
    pub fn short_of_replicas(&self) -> bool {
        self.wait_replicas >= 1
            && self
                .connected_replicas
                .is_some_and(|n| n < u64::from(self.wait_replicas))
    }
}

/// `PRAGMA synchronous`'s name for its number.
pub fn sqlite_synchronous_name(n: i64) -> &'static str {
    match n {
        0 => "OFF",
        1 => "NORMAL",
        2 => "FULL",
        3 => "EXTRA",
        _ => "unknown",
    }
}

impl StoreDurability {
    pub fn level(&self) -> Durability {
        match self {
            StoreDurability::Memory => Durability::Memory,
            StoreDurability::Sqlite { synchronous } => match synchronous {
                2 | 3 => Durability::Fsync,
                1 => Durability::OsBuffered,
                _ => Durability::Memory,
            },
            StoreDurability::Redis(r) => r.level(),
        }
    }

    /// The store has not answered since it started, so nothing could be read yet (Redis only;
    /// the level is a placeholder: the weakest that cannot be excluded).
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            StoreDurability::Redis(RedisPersistence {
                unread: Some(Unread::Unreachable(_)),
                ..
            })
        )
    }

    /// The setting that holds the level where it is, in words an operator can act on.
    pub fn cause(&self) -> String {
        match self {
            StoreDurability::Memory => "--store memory keeps nothing on disk".into(),
            StoreDurability::Sqlite { synchronous } => format!(
                "SQLite PRAGMA synchronous={}, set by --sqlite-synchronous",
                sqlite_synchronous_name(*synchronous)
            ),
            StoreDurability::Redis(r) => {
                let persistence = match &r.unread {
                    Some(Unread::Refused(why)) => {
                        format!("Redis refused CONFIG GET ({why}), so its persistence is unknown")
                    }
                    Some(Unread::Unreachable(why)) => {
                        format!("Redis has not answered yet ({why}), so its persistence is unknown")
                    }
                    None => format!(
                        "Redis appendonly {}, appendfsync {}",
                        r.appendonly.as_deref().unwrap_or("?"),
                        r.appendfsync.as_deref().unwrap_or("?")
                    ),
                };
                if r.wait_replicas >= 1 {
                    format!(
                        "{persistence}; every publish waits for {} replica(s) (--redis-wait-replicas)",
                        r.wait_replicas
                    )
                } else {
                    format!("{persistence}; no replica is waited for (--redis-wait-replicas 0)")
                }
            }
        }
    }

    /// What raises the level to `want`, or `None` when it already is at least that.
    pub fn how_to_reach(&self, want: Durability) -> Option<String> {
        if self.level() >= want {
            return None;
        }
        Some(match self {
            StoreDurability::Memory => {
                "use --store sqlite (the default, fsync) or --store redis with persistence".into()
            }
            StoreDurability::Sqlite { .. } => {
                "set --sqlite-synchronous full (ZERODROP_SQLITE_SYNCHRONOUS=full)".into()
            }
            StoreDurability::Redis(r) => {
                let fsync = if matches!(r.unread, Some(Unread::Refused(_))) {
                    "allow CONFIG GET to zerodrop's Redis user and turn on appendonly yes with \
                     appendfsync always"
                } else {
                    "on the Redis server, CONFIG SET appendonly yes and CONFIG SET appendfsync \
                     always (and keep them in redis.conf)"
                };
                match want {
                    Durability::Fsync => format!("{fsync} (fsync)"),
                    Durability::Replicated => format!(
                        "set --redis-wait-replicas 1 or more (ZERODROP_REDIS_WAIT_REPLICAS) with \
                         replicas attached (replicated), or {fsync} (fsync)"
                    ),
                    Durability::OsBuffered | Durability::Memory => format!(
                        "on the Redis server, CONFIG SET appendonly yes (appendfsync everysec: \
                         os_buffered), or {fsync} (fsync)"
                    ),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(appendonly: &str, appendfsync: &str, wait: u32) -> RedisPersistence {
        RedisPersistence {
            appendonly: Some(appendonly.into()),
            appendfsync: Some(appendfsync.into()),
            wait_replicas: wait,
            connected_replicas: Some(0),
            unread: None,
        }
    }

    #[test]
    fn levels_are_ordered_weakest_first_and_named_exactly() {
        use Durability::*;
        assert!(Memory < OsBuffered && OsBuffered < Replicated && Replicated < Fsync);
        let names: Vec<&str> = Durability::ALL.iter().map(|d| d.as_str()).collect();
        assert_eq!(names, ["memory", "os_buffered", "replicated", "fsync"]);
        for d in Durability::ALL {
            assert_eq!(d.as_str().parse::<Durability>(), Ok(d));
            assert_eq!(d.to_string(), d.as_str());
        }
        for bad in ["", "FSYNC", "os-buffered", "none", "replica"] {
            assert_eq!(
                bad.parse::<Durability>(),
                Err(UnknownDurability(bad.into()))
            );
        }
        // What `--require-durability replicated` accepts.
        let accepted: Vec<Durability> = Durability::ALL
            .into_iter()
            .filter(|d| *d >= Replicated)
            .collect();
        assert_eq!(accepted, [Replicated, Fsync]);
        assert!(Fsync.survives_machine_loss() && Replicated.survives_machine_loss());
        assert!(!OsBuffered.survives_machine_loss() && !Memory.survives_machine_loss());
    }

    #[test]
    fn sqlite_levels_follow_pragma_synchronous() {
        let level = |n| StoreDurability::Sqlite { synchronous: n }.level();
        assert_eq!(level(0), Durability::Memory);
        assert_eq!(level(1), Durability::OsBuffered);
        assert_eq!(level(2), Durability::Fsync);
        assert_eq!(level(3), Durability::Fsync);
        assert_eq!(StoreDurability::Memory.level(), Durability::Memory);
        let normal = StoreDurability::Sqlite { synchronous: 1 };
        assert_eq!(
            normal.cause(),
            "SQLite PRAGMA synchronous=NORMAL, set by --sqlite-synchronous"
        );
        assert_eq!(
            normal.how_to_reach(Durability::Fsync).as_deref(),
            Some("set --sqlite-synchronous full (ZERODROP_SQLITE_SYNCHRONOUS=full)")
        );
        assert_eq!(normal.how_to_reach(Durability::OsBuffered), None);
    }

    #[test]
    fn redis_levels_follow_its_persistence_settings() {
        use Durability::*;
        for (appendonly, appendfsync, want) in [
            ("yes", "always", Fsync),
            ("yes", "everysec", OsBuffered),
            ("yes", "no", OsBuffered),
            ("no", "always", Memory),
            ("no", "everysec", Memory),
            ("no", "no", Memory),
            ("YES", "Always", Fsync),
            ("yes", "sometimes", Memory),
        ] {
            let r = redis(appendonly, appendfsync, 0);
            assert_eq!(r.level(), want, "{appendonly} {appendfsync}");
            assert_eq!(StoreDurability::Redis(r).level(), want);
        }
    }

    #[test]
    fn waiting_for_replicas_raises_redis_to_replicated_never_lowers_it() {
        use Durability::*;
        assert_eq!(redis("no", "everysec", 1).level(), Replicated);
        assert_eq!(redis("yes", "everysec", 2).level(), Replicated);
        assert_eq!(redis("yes", "always", 1).level(), Fsync);
        // Fewer replicas connected than WAIT asks for: no 201 at all, the level stands.
        let mut short = redis("no", "no", 2);
        short.connected_replicas = Some(1);
        assert!(short.short_of_replicas());
        assert_eq!(short.level(), Replicated);
        short.connected_replicas = Some(2);
        assert!(!short.short_of_replicas());
        assert!(!redis("no", "no", 0).short_of_replicas());
    }

    #[test]
    fn a_refused_config_get_reports_the_weakest_level_that_cannot_be_excluded() {
        use Durability::*;
        let refused = |wait| {
            RedisPersistence::unread(wait, Unread::Refused("ERR unknown command 'CONFIG'".into()))
        };
        assert_eq!(refused(0).level(), Memory);
        assert_eq!(refused(1).level(), Replicated);
        let d = StoreDurability::Redis(refused(0));
        assert_eq!(
            d.cause(),
            "Redis refused CONFIG GET (ERR unknown command 'CONFIG'), so its persistence is \
             unknown; no replica is waited for (--redis-wait-replicas 0)"
        );
        assert!(
            d.how_to_reach(Fsync)
                .unwrap()
                .starts_with("allow CONFIG GET")
        );
        assert!(!d.unreachable());
        let unreachable = RedisPersistence::unread(0, Unread::Unreachable("timed out".into()));
        assert_eq!(unreachable.level(), Memory);
        assert_eq!(
            unreachable.unread.as_ref().map(Unread::as_str),
            Some("timed out")
        );
        assert!(StoreDurability::Redis(unreachable).unreachable());
    }

    #[test]
    fn redis_causes_name_the_settings_and_the_way_up() {
        let d = StoreDurability::Redis(redis("yes", "everysec", 0));
        assert_eq!(
            d.cause(),
            "Redis appendonly yes, appendfsync everysec; no replica is waited for \
             (--redis-wait-replicas 0)"
        );
        assert!(
            d.how_to_reach(Durability::Replicated)
                .unwrap()
                .starts_with("set --redis-wait-replicas 1 or more")
        );
        assert!(
            d.how_to_reach(Durability::Fsync)
                .unwrap()
                .contains("CONFIG SET appendfsync always")
        );
        let d = StoreDurability::Redis(redis("no", "everysec", 1));
        assert_eq!(
            d.cause(),
            "Redis appendonly no, appendfsync everysec; every publish waits for 1 replica(s) \
             (--redis-wait-replicas)"
        );
        assert_eq!(d.how_to_reach(Durability::Replicated), None);
    }
}
