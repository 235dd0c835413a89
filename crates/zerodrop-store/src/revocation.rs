//! Revocations (SPEC §9): who may no longer connect or resume, kept in the store so that every
//! instance sharing it enforces them and a restart forgets none.
//!
//! The same records carry disconnect orders (`disconnect`), which revoke nothing and reach
//! every instance the same way.
//!
//! A revocation names a subject (every session of it created before the revocation, and
//! every connect token for it issued before it) or one session. It holds until `until_ms`
//! (`None`: until deleted). Deciding what a revocation covers is the server's; the store keeps
//! the records and tells instances when the set changed.

use serde::{Deserialize, Serialize};
use zerodrop_core::SessionId;

/// What a revocation covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RevokeTarget {
    Sub(String),
    SessionId(SessionId),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// `rv_` and 16 hex digits.
    pub id: String,
    pub target: RevokeTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was made (Unix ms): what was issued or created before it is covered.
    pub at_ms: u64,
    /// When it lapses (Unix ms); `None`: until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    /// Not a revocation but a disconnect order (`POST /admin/disconnect`): every instance
    /// closes the target's connections open when it learns of it, once; it lapses in seconds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disconnect: bool,
}

impl Revocation {
    /// Still in force at `now_ms`.
    pub fn active(&self, now_ms: u64) -> bool {
        self.until_ms.is_none_or(|u| u > now_ms)
    }
}
