//! Revocation and disconnect (SPEC §9): who may no longer connect or resume, enforced on every
//! instance sharing the store.
//!
//! The records live in the store (durable across restarts); each instance keeps them in
//! memory, re-read at start, after its own changes, and whenever the store's version of them
//! moved (polled every [`POLL`]: a revocation made on one instance reaches the others' live
//! connections within that, plus a wake-up). A change rings every connection, which asks
//! [`App::verdict`] whether it must end.
//!
//! What a revocation covers:
//! - a subject: every session of it created before the revocation (`at`), and every connect
//!   token for it issued (`iat`) before it (a token without `iat` counts as issued before);
//! - a session: that session.
//!
//! A disconnect order revokes nothing: the connections of its target open when an instance
//! learns of it are closed with a `reconnect` frame (as in a drain), once; the client may
//! resume at once.
//!
//! Must not: write sessions, or close a connection itself (the connection core does).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use zerodrop_core::{ErrorCode, SessionId, now_ms};
use zerodrop_store::{Revocation, RevokeTarget};

use super::App;
use crate::auth::ConnectClaims;
use crate::error::ApiError;

/// How often an instance looks whether the store's revocations changed.
pub const POLL: Duration = Duration::from_millis(250);
/// How long a disconnect order is kept (every instance polls many times within it).
const DISCONNECT_TTL_MS: u64 = 30_000;

/// This instance's copy of the revocations and the disconnect orders it has seen.
#[derive(Default)]
pub struct Orders {
    revocations: RwLock<Vec<Revocation>>,
    /// Disconnect orders seen, each with the generation it arrived in.
    disconnects: Mutex<Vec<(u64, RevokeTarget)>>,
    seen_disconnects: Mutex<HashSet<String>>,
    /// Bumped whenever something changed that a connection must look at.
    generation: AtomicU64,
    /// The store's version last read (`None` before the first read).
    version: Mutex<Option<u64>>,
}

/// Who a connection is, for [`App::verdict`].
#[derive(Clone, Copy)]
pub struct Bearer<'a> {
    pub sub: &'a str,
    pub session: Option<&'a SessionId>,
    /// When its authority was issued (Unix ms): its session's creation, or (without a
    /// session) its connect token's `iat`.
    pub issued_ms: u64,
}

/// What a connection must do.
pub enum Verdict {
    Revoked(ApiError),
    Disconnect,
}

fn covers(r: &Revocation, b: Bearer<'_>) -> bool {
    match &r.target {
        RevokeTarget::Sub(s) => s == b.sub && b.issued_ms < r.at_ms,
        RevokeTarget::SessionId(id) => b.session == Some(id),
    }
}

fn matches(t: &RevokeTarget, b: Bearer<'_>) -> bool {
    match t {
        RevokeTarget::Sub(s) => s == b.sub,
        RevokeTarget::SessionId(id) => b.session == Some(id),
    }
}

/// The error a revoked credential or connection gets.
pub fn revoked_error(r: &Revocation) -> ApiError {
    let mut message = "access was revoked by an operator".to_string();
    if let Some(why) = &r.reason {
        message.push_str(": ");
        message.push_str(why);
    }
    ApiError::new(ErrorCode::Revoked, message)
}

impl App {
    /// The current generation of orders: a connection remembers the one it was opened in and
    /// the last one it looked at.
    pub fn orders_generation(&self) -> u64 {
        self.orders.generation.load(Ordering::Acquire)
    }

    /// A revocation covering `b`, if any.
    pub fn revocation_for(&self, b: Bearer<'_>) -> Option<ApiError> {
        let now = self.clock().restriction_now_ms();
        let list = self
            .orders
            .revocations
            .read()
            .unwrap_or_else(|p| p.into_inner());
        list.iter()
            .find(|r| r.active(now) && covers(r, b))
            .map(revoked_error)
    }

    /// A connect token's claims: verified (signature, expiry) and not revoked (its subject
    /// revoked after the token was issued is 401 `REVOKED`).
    pub async fn connect_token(&self, token: &str) -> Result<ConnectClaims, ApiError> {
        self.auth.prepare(token).await;
        self.connect_token_known(token)
    }

    /// [`App::connect_token`] with the JWKS keys as last read (the caller ran
    /// [`crate::auth::Auth::prepare`]).
    pub fn connect_token_known(&self, token: &str) -> Result<ConnectClaims, ApiError> {
        let claims = self.auth.verify_connect(token)?;
        let b = Bearer {
            sub: &claims.sub,
            session: None,
            issued_ms: claims.iat.unwrap_or(0).saturating_mul(1000),
        };
        match self.revocation_for(b) {
            Some(e) => {
                self.metrics.error(e.code);
                Err(e)
            }
            None => Ok(claims),
        }
    }

    /// A fresh connect token offered for a session (`refresh`, a resume with a token): valid
    /// now, with no leeway (see [`crate::auth::Auth::verify_refresh`]).
    pub async fn fresh_token(&self, token: &str) -> Result<ConnectClaims, ApiError> {
        self.auth.prepare(token).await;
        self.auth.verify_refresh(token)
    }

    /// What a connection opened in generation `born` must do now: end (`REVOKED`), take a
    /// disconnect order that arrived after it opened, or nothing.
    pub fn verdict(&self, b: Bearer<'_>, born: u64) -> Option<Verdict> {
        if let Some(e) = self.revocation_for(b) {
            return Some(Verdict::Revoked(e));
        }
        let orders = self
            .orders
            .disconnects
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        orders
            .iter()
            .any(|(g, t)| *g > born && matches(t, b))
            .then_some(Verdict::Disconnect)
    }

    /// Records a revocation or a disconnect order in the store and applies it here at once.
    pub async fn put_order(&self, r: Revocation) -> Result<Revocation, ApiError> {
        self.store.put_revocation(&r).await?;
        self.reload_orders().await;
        Ok(r)
    }

    /// The revocations in force (disconnect orders left out).
    pub async fn list_revocations(&self) -> Result<Vec<Revocation>, ApiError> {
        let mut all = self.store.revocations().await?;
        all.retain(|r| !r.disconnect);
        all.sort_by_key(|r| r.at_ms);
        Ok(all)
    }

    /// Deletes a revocation; `false` when there was none.
    pub async fn delete_revocation(&self, id: &str) -> Result<bool, ApiError> {
        let gone = self.store.delete_revocation(id).await?;
        self.reload_orders().await;
        Ok(gone)
    }

    /// Re-reads the store's revocations when its version moved (or always, when the store
    /// has none: only this process writes it). Called at start and every [`POLL`].
    pub async fn poll_orders(&self) {
        match self.store.revocations_version().await {
            Ok(Some(v)) => {
                let known = *self
                    .orders
                    .version
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if known != Some(v) {
                    self.reload_orders().await;
                }
            }
            Ok(None) => {
                if self
                    .orders
                    .version
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_none()
                {
                    self.reload_orders().await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not look at the revocations"),
        }
    }

    /// Reads every record from the store, and rings every connection if anything changed.
    pub async fn reload_orders(&self) {
        let version = self.store.revocations_version().await.ok().flatten();
        let all = match self.store.revocations().await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the revocations; keeping the last ones read");
                return;
            }
        };
        let now = now_ms();
        let (orders, revocations): (Vec<Revocation>, Vec<Revocation>) =
            all.into_iter().partition(|r| r.disconnect);
        let mut changed = false;
        {
            let mut seen = self
                .orders
                .seen_disconnects
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut list = self
                .orders
                .disconnects
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for o in orders {
                if seen.insert(o.id.clone()) {
                    let g = self.orders.generation.fetch_add(1, Ordering::AcqRel) + 1;
                    list.push((g, o.target.clone()));
                    changed = true;
                    if o.until_ms.is_some_and(|u| u > now) {
                        tracing::info!(order = %o.id, "disconnect order");
                    }
                }
            }
            // A bounded memory: orders older than their lapse are gone from the store too.
            if list.len() > 10_000 {
                let keep = list.len() - 10_000;
                list.drain(..keep);
            }
        }
        {
            let mut current = self
                .orders
                .revocations
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if *current != revocations {
                tracing::info!(active = revocations.len(), "revocations changed");
                *current = revocations;
                changed = true;
            }
            self.metrics.revocations_active(current.len());
        }
        *self
            .orders
            .version
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(version.unwrap_or(0));
        if changed {
            self.orders.generation.fetch_add(1, Ordering::AcqRel);
            self.ring_every_connection();
        }
    }
}

/// A new revocation (or disconnect order) record. It covers what was issued before `at_ms`:
/// sessions by their creation on the server's time line, connect tokens by their `iat` on
/// their issuer's clock; the later of the two clocks, so that neither kind escapes it after a
/// jump of the system clock either way.
pub fn new_order(
    target: RevokeTarget,
    reason: Option<String>,
    until_ms: Option<u64>,
    disconnect: bool,
    clock: &dyn zerodrop_core::Clock,
) -> Revocation {
    let at_ms = clock.now_ms().max(clock.wall_ms());
    Revocation {
        id: format!(
            "{}_{}",
            if disconnect { "dc" } else { "rv" },
            hex::encode(zerodrop_core::random_bytes::<8>())
        ),
        target,
        reason,
        at_ms,
        until_ms: if disconnect {
            Some(now_ms() + DISCONNECT_TTL_MS)
        } else {
            until_ms
        },
        disconnect,
    }
}
