//! Following the primary that Redis Sentinel elected: `redis+sentinel://` URLs, the lookup
//! of the current primary, and [`Primary`], a connection that re-resolves it.
//!
//! Why this shape: a [`ConnectionManager`] reconnects to one address forever, which after a
//! failover is a dead server or a demoted one that refuses every write (`READONLY`). So a
//! [`Primary`] holds a manager for the address the sentinels named last, and forgets it when
//! a command meets an outage ([`is_outage`]: the connection failed or timed out, or the
//! server answered `READONLY`, `MASTERDOWN`, `LOADING`…) or when `ROLE` says it is a replica.
//! The next command asks the sentinels again (`SENTINEL MASTERS`, then `ROLE` on the address
//! they name: the library's [`Sentinel::async_master_for`]), so zerodrop follows a failover
//! without a restart.
//!
//! Must not: send a command again after it failed — the command that met the outage answers
//! `Unavailable` like any other (it may have run: a repeated append would be a duplicate),
//! and only the commands after it go to the new primary.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use ::redis::{
    Client, Cmd, ErrorKind, Pipeline, RedisConnectionInfo, RedisError, RedisFuture, RedisResult,
    Value,
};

use super::health::is_outage;
use super::lock;

/// The URL scheme that selects Sentinel: `redis+sentinel://[[user]:password@]host:port[,host:port…]/<master name>[/<db>]`.
pub const SCHEME: &str = "redis+sentinel://";

/// A parsed `redis+sentinel://` URL. The credentials and database are the data nodes' (the
/// primary and its replicas); the sentinels are asked without credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `host:port` of every sentinel, in the order given (the first that answers is asked).
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the primary under (`sentinel monitor <name> …`).
    pub master: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .finish()
    }
}

impl SentinelUrl {
    /// `None` when `url` is not a Sentinel URL at all; an error names what is wrong with one
    /// that is (never the password).
    pub fn parse(url: &str) -> Option<Result<SentinelUrl, String>> {
        let rest = url.trim().strip_prefix(SCHEME)?;
        Some(Self::parse_rest(rest))
    }

    fn parse_rest(rest: &str) -> Result<SentinelUrl, String> {
        let (authority, path) = rest.split_once('/').ok_or(
            "a redis+sentinel:// URL needs the master's name after the hosts: \
             redis+sentinel://host:26379,host:26379/mymaster",
        )?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pw)) => (
                    Some(user.to_string()).filter(|s| !s.is_empty()),
                    Some(pw.to_string()),
                ),
                None => (None, Some(u.to_string())),
            },
        };
        let mut sentinels = Vec::new();
        for h in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let (host, port) = match h.rsplit_once(':') {
                Some((host, port)) => {
                    let port = port
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("`{h}` is not host:port"))?;
                    (host, port)
                }
                None => (h, 26379),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(format!("`{h}` has no host"));
            }
            sentinels.push((host.to_string(), port));
        }
        if sentinels.is_empty() {
            return Err("a redis+sentinel:// URL needs at least one sentinel host".into());
        }
        let mut parts = path.split('/');
        let master = parts.next().unwrap_or_default().to_string();
        if master.is_empty() || master.contains(['?', '#']) {
            return Err("a redis+sentinel:// URL needs the master's name as its path".into());
        }
        let db = match parts.next().filter(|d| !d.is_empty()) {
            None => 0,
            Some(d) => d
                .parse::<i64>()
                .ok()
                .filter(|d| *d >= 0)
                .ok_or_else(|| format!("`{d}` is not a database number"))?,
        };
        if parts.next().is_some() {
            return Err("a redis+sentinel:// URL's path is /<master name>[/<db>]".into());
        }
        Ok(SentinelUrl {
            sentinels,
            master,
            username,
            password,
            db,
        })
    }
}

/// Asks the sentinels where the primary is. Each lookup starts from fresh sentinel
/// connections: lookups happen only after a failure, and no lock is held across one.
pub(super) struct Resolver {
    url: SentinelUrl,
    timeout: Duration,
}

impl Resolver {
    pub(super) fn new(url: SentinelUrl, timeout: Duration) -> Resolver {
        Resolver { url, timeout }
    }

    /// A client for the primary the sentinels name now, checked with `ROLE`; bounded by the
    /// resolver's timeout.
    pub(super) async fn primary(&self) -> RedisResult<Client> {
        let sentinels: Vec<String> = self
            .url
            .sentinels
            .iter()
            .map(|(h, p)| format!("redis://{h}:{p}"))
            .collect();
        let mut data = RedisConnectionInfo::default().set_db(self.url.db);
        if let Some(u) = &self.url.username {
            data = data.set_username(u);
        }
        if let Some(p) = &self.url.password {
            data = data.set_password(p);
        }
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(data);
        let lookup = async {
            let mut sentinel = Sentinel::build(sentinels)?;
            sentinel
                .async_master_for(&self.url.master, Some(&node))
                .await
        };
        match tokio::time::timeout(self.timeout, lookup).await {
            Ok(found) => found,
            Err(_) => Err(RedisError::from((
                ErrorKind::Io,
                "no sentinel named a reachable primary in time",
            ))),
        }
    }
}

/// The manager of the primary last named, and which lookup produced it.
struct Current {
    generation: u64,
    conn: ConnectionManager,
}

/// A connection to whatever server the sentinels name as primary; `Clone` shares it.
#[derive(Clone)]
pub(super) struct Primary {
    inner: Arc<PrimaryInner>,
}

struct PrimaryInner {
    resolver: Arc<Resolver>,
    config: ConnectionManagerConfig,
    current: Mutex<Option<Current>>,
    /// A lookup is under way: other commands answer at once instead of piling up behind it.
    resolving: AtomicBool,
    generations: AtomicU64,
}

impl Primary {
    pub(super) fn new(resolver: Arc<Resolver>, config: ConnectionManagerConfig) -> Primary {
        Primary {
            inner: Arc::new(PrimaryInner {
                resolver,
                config,
                current: Mutex::new(None),
                resolving: AtomicBool::new(false),
                generations: AtomicU64::new(0),
            }),
        }
    }

    /// The current primary's connection, looked up first if there is none.
    async fn conn(&self) -> RedisResult<(u64, ConnectionManager)> {
        if let Some(c) = lock(&self.inner.current).as_ref() {
            return Ok((c.generation, c.conn.clone()));
        }
        if self.inner.resolving.swap(true, Ordering::AcqRel) {
            return Err(RedisError::from((
                ErrorKind::Io,
                "the sentinels are being asked for the primary",
            )));
        }
        let _done = Resolving(&self.inner.resolving);
        let client = self.inner.resolver.primary().await?;
        let conn = ConnectionManager::new_lazy_with_config(client, self.inner.config.clone())?;
        let generation = self.inner.generations.fetch_add(1, Ordering::Relaxed) + 1;
        *lock(&self.inner.current) = Some(Current {
            generation,
            conn: conn.clone(),
        });
        Ok((generation, conn))
    }

    /// The primary of `generation` failed or is one no longer: the next command asks the
    /// sentinels again. A later generation is left alone.
    pub(super) fn forget(&self, generation: Option<u64>) {
        let mut current = lock(&self.inner.current);
        if current
            .as_ref()
            .is_some_and(|c| generation.is_none_or(|g| g == c.generation))
        {
            *current = None;
        }
    }

    fn judge(&self, generation: u64, e: &RedisError) {
        if is_outage(e) {
            self.forget(Some(generation));
        }
    }
}

/// Clears the "lookup under way" flag however the lookup ends (cancelled included).
struct Resolving<'a>(&'a AtomicBool);

impl Drop for Resolving<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl ConnectionLike for Primary {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.conn().await?;
            let reply = conn.req_packed_command(cmd).await;
            if let Err(e) = &reply {
                self.judge(generation, e);
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.conn().await?;
            let reply = conn.req_packed_commands(pipeline, offset, count).await;
            match &reply {
                Err(e) => self.judge(generation, e),
                // A pipeline that ignores errors carries them as values (`READONLY` too).
                Ok(values) => {
                    for v in values {
                        if let Value::ServerError(e) = v {
                            self.judge(generation, &e.clone().into());
                        }
                    }
                }
            }
            reply
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.resolver.url.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<SentinelUrl, String> {
        SentinelUrl::parse(url).expect("a sentinel URL")
    }

    #[test]
    fn sentinel_urls_name_every_sentinel_and_the_master() {
        let u = parse("redis+sentinel://a:26379, b:26380 ,[::1]:26381/mymaster").unwrap();
        assert_eq!(
            u.sentinels,
            vec![
                ("a".to_string(), 26379),
                ("b".to_string(), 26380),
                ("::1".to_string(), 26381)
            ]
        );
        assert_eq!((u.master.as_str(), u.db), ("mymaster", 0));
        assert_eq!((u.username, u.password), (None, None));

        let u = parse("redis+sentinel://app:s3cret@h/zd/2").unwrap();
        assert_eq!(u.sentinels, vec![("h".to_string(), 26379)]);
        assert_eq!((u.master.as_str(), u.db), ("zd", 2));
        assert_eq!(u.username.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert!(!format!("{u:?}").contains("s3cret"));
        let u = parse("redis+sentinel://:pw@h:1/m").unwrap();
        assert_eq!((u.username, u.password.as_deref()), (None, Some("pw")));

        assert!(SentinelUrl::parse("redis://h:6379").is_none());
        for bad in [
            "redis+sentinel://h:26379",
            "redis+sentinel://h:26379/",
            "redis+sentinel:///m",
            "redis+sentinel://h:0/m",
            "redis+sentinel://h:x/m",
            "redis+sentinel://h/m/-1",
            "redis+sentinel://h/m/0/extra",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
