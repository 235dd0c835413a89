//! Presence with the SQLite store: kept in the process ([`PresenceBook`]), not in the file.
//!
//! Only one instance serves an SQLite file, so every connection that can hold a member is in
//! this process, and a member outlives the process by at most its lease anyway. Writing each
//! heartbeat through the single group-committing writer would cost an fsync batch every few
//! seconds per thousand members for state that a restart must drop regardless (no connection
//! survives it). So the members and the presence logs live in memory, under the same rules as
//! every store (`crate::presence`), and a restart starts every presence log again in a new
//! epoch: clients holding a presence position are told `EPOCH_CHANGED` and take a fresh
//! snapshot, and members rejoin as their clients resume (docs/decisions.md, "Presence").

use std::sync::Arc;

use zerodrop_core::clock::Clock;

use crate::LiveSink;
use crate::presence::PresenceBook;

/// The store's presence, on the writer's clock; the sink hears of every change.
pub(super) fn book(sink: Arc<dyn LiveSink>, clock: Arc<dyn Clock>) -> PresenceBook {
    PresenceBook::new(sink, clock)
}
