//! Whether Redis serves: every command runs under a timeout, and its failure is judged once —
//! an outage (the connection, or a server that cannot serve here and now: logged once, at most
//! every [`OUTAGE_LOG_EVERY`], and its end logged too) or a refusal (Redis said no: a line
//! each time); both answer `Unavailable`. Readiness asks `ping`.
//!
//! Must not: retry, or turn a refusal into anything but `Unavailable`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ::redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use super::conn::as_str;
use super::{Shared, lock};
use crate::{StoreError, StoreResult};

/// An outage is logged at most this often (see `Shared::down`).
pub(super) const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(30);

/// Server errors that mean "not here, not now" rather than "this request is wrong": the data
/// is loading after a restart (`LOADING`), this node was demoted to a replica by a failover
/// (`READONLY`), a slot is moving or just moved (`MOVED`, `ASK`, `TRYAGAIN`), or the cluster or
/// its master is down (`CLUSTERDOWN`, `MASTERDOWN`). They pass once the deployment settles.
pub(super) fn is_transient(kind: ServerErrorKind) -> bool {
    matches!(
        kind,
        ServerErrorKind::BusyLoading
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
    )
}

/// The connection, not the command, failed — or the server says it cannot serve here and now
/// ([`is_transient`]): an outage, logged once and answered `STORE_UNAVAILABLE` with
/// `Retry-After`, not a refusal worth a line per request.
pub(super) fn is_outage(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || matches!(e.kind(), ErrorKind::Server(k) if is_transient(k))
}

impl Shared {
    /// Runs a Redis operation under the command timeout; maps every failure to `Unavailable`
    /// and logs an outage once.
    pub(super) async fn run<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> StoreResult<T> {
        self.run_within(self.opts.command_timeout, what, fut).await
    }

    pub(super) async fn run_within<T>(
        &self,
        limit: Duration,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => {
                if !self.up.swap(true, Ordering::Relaxed)
                    && self.announced.swap(false, Ordering::Relaxed)
                {
                    tracing::info!("redis answers again");
                }
                Ok(v)
            }
            Ok(Err(e)) => Err(self.failed(what, e)),
            Err(_) => Err(self.down(what, "timed out")),
        }
    }

    /// A command that failed: an outage ([`is_outage`], logged once), or a refusal — Redis
    /// answered but said no, which is not an outage and is worth a line each time.
    pub(super) fn failed(&self, what: &str, e: RedisError) -> StoreError {
        if is_outage(&e) {
            return self.down(what, &e.to_string());
        }
        tracing::error!(operation = what, error = %e, "redis refused a command");
        StoreError::Unavailable(format!("redis {what}: {e}"))
    }

    /// Logs the start of an outage — at most every [`OUTAGE_LOG_EVERY`], because some
    /// outages flap per request: a master demoted by a failover still answers reads, so
    /// every read would otherwise end an outage that the next write starts again.
    pub(super) fn down(&self, what: &str, why: &str) -> StoreError {
        if self.up.swap(false, Ordering::Relaxed) {
            let mut last = lock(&self.last_announced);
            if last.is_none_or(|t| t.elapsed() >= OUTAGE_LOG_EVERY) {
                *last = Some(Instant::now());
                self.announced.store(true, Ordering::Relaxed);
                tracing::warn!(
                    operation = what,
                    error = why,
                    "redis is unreachable or cannot serve; requests answer STORE_UNAVAILABLE \
                     until it is back"
                );
            }
        }
        StoreError::Unavailable(format!("redis {what}: {why}"))
    }

    /// A single server is asked its `ROLE`: a master demoted to a replica by a failover still
    /// answers, but refuses every write (`READONLY`), so it is not ready (and a connection that
    /// follows Sentinel asks the sentinels for the primary again). A cluster client follows
    /// the masters itself; it is asked `PING`.
    pub(super) async fn ping(&self) -> StoreResult<()> {
        let mut conn = self.conn.clone();
        let cmd = ::redis::cmd(if self.cluster { "PING" } else { "ROLE" });
        let ping = cmd.query_async::<Value>(&mut conn);
        match tokio::time::timeout(self.opts.ping_timeout, ping).await {
            Ok(Ok(Value::Array(role))) if !self.cluster => match role.first().and_then(as_str) {
                Some("slave" | "replica") => {
                    self.conn.not_primary();
                    Err(self.down("ping", "the server is a read-only replica"))
                }
                _ => Ok(()),
            },
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_outage(&e) => Err(self.down("ping", &e.to_string())),
            // It answered (`ROLE` may be denied by an ACL): reachable.
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(self.down("ping", "timed out")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(line: &str) -> RedisError {
        match ::redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
            Ok(Value::ServerError(e)) => e.into(),
            Ok(v) => panic!("not an error reply: {v:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn errors_that_pass_with_the_deployment_are_outages() {
        for line in [
            "READONLY You can't write against a read only replica.",
            "MOVED 3999 127.0.0.1:6381",
            "ASK 3999 127.0.0.1:6381",
            "LOADING Redis is loading the dataset in memory",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
        ] {
            assert!(is_outage(&server_error(line)), "{line}");
        }
        for line in [
            "ERR Error running script (call to f_0123): @user_script:1: bad argument",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "NOSCRIPT No matching script. Please use EVAL.",
            "CROSSSLOT Keys in request don't hash to the same slot",
            "NOPERM this user has no permissions to run the 'eval' command",
        ] {
            assert!(!is_outage(&server_error(line)), "{line}");
        }
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_outage(&io));
    }
}
