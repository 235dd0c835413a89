//! A stream's members as the application sees them ([`PresenceView`]), kept current by the
//! client's driver from a snapshot and the stream's `presence` frames, across reconnects.
//!
//! The seam rule (docs/protocol.md, "Presence"): subscribe with `presence` first (frames
//! follow the presence log's head `H`), then take a snapshot at `presenceSeq = P ≥ H`, and
//! apply only the frames after `P` — `join` sets a member by session id, `leave` removes it.
//! A resume goes on from the last applied seq; a frame of another epoch, a seq that skips
//! one, or a presence error starts over with a fresh snapshot.

use std::collections::BTreeMap;

use serde::Deserialize;
use tokio::sync::watch;

use crate::frames::{PresenceFrame, PresenceMember};

/// The members of one stream at one presence position.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Members {
    /// The presence log's epoch and the last seq applied (`None`: no snapshot yet).
    pub epoch: Option<String>,
    pub seq: Option<u64>,
    /// By session id.
    pub members: BTreeMap<String, PresenceMember>,
}

/// The application's view of a stream's members (from [`crate::Subscription::presence`]).
#[derive(Clone, Debug)]
pub struct PresenceView(pub(crate) watch::Receiver<Members>);

impl PresenceView {
    /// The members now.
    pub fn members(&self) -> Vec<PresenceMember> {
        self.0.borrow().members.values().cloned().collect()
    }

    /// The whole state now (members, epoch, position).
    pub fn current(&self) -> Members {
        self.0.borrow().clone()
    }

    /// Waits until the members change; `false` once the subscription is gone.
    pub async fn changed(&mut self) -> bool {
        self.0.changed().await.is_ok()
    }
}

/// One page of `GET /v1/streams/{stream}/presence`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresencePage {
    pub stream: String,
    pub epoch: String,
    pub presence_seq: u64,
    pub occupancy: u64,
    pub members: Vec<PresenceMember>,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// The driver's side of a view.
pub(crate) struct Tracker {
    tx: watch::Sender<Members>,
    state: Members,
    /// Frames that arrived before the snapshot (applied after it, those past its seq).
    early: Vec<PresenceFrame>,
}

/// What the driver must do after a frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    Nothing,
    /// Take a (fresh) snapshot.
    Snapshot,
}

impl Tracker {
    pub(crate) fn new() -> (Tracker, PresenceView) {
        let (tx, rx) = watch::channel(Members::default());
        let t = Tracker {
            tx,
            state: Members::default(),
            early: Vec::new(),
        };
        (t, PresenceView(rx))
    }

    /// Where the frames should go on from: `(after, epoch)`, once a snapshot was applied.
    pub(crate) fn position(&self) -> Option<(u64, Option<String>)> {
        self.state.seq.map(|s| (s, self.state.epoch.clone()))
    }

    /// Forget the position: the next `subscribed` takes a fresh snapshot.
    pub(crate) fn restart(&mut self) {
        self.state.seq = None;
        self.early.clear();
    }

    pub(crate) fn needs_snapshot(&self) -> bool {
        self.state.seq.is_none()
    }

    /// A snapshot's pages (in order), then the frames that came before it.
    pub(crate) fn snapshot(&mut self, pages: Vec<PresencePage>) -> Next {
        let Some(first) = pages.first() else {
            return Next::Snapshot;
        };
        self.state = Members {
            epoch: Some(first.epoch.clone()),
            seq: Some(first.presence_seq),
            members: pages
                .iter()
                .flat_map(|p| p.members.iter())
                .map(|m| (m.session_id.clone(), m.clone()))
                .collect(),
        };
        for f in std::mem::take(&mut self.early) {
            if self.apply(f) == Next::Snapshot {
                return Next::Snapshot;
            }
        }
        self.tx.send_replace(self.state.clone());
        Next::Nothing
    }

    /// One `presence` frame.
    pub(crate) fn frame(&mut self, f: PresenceFrame) -> Next {
        if self.state.seq.is_none() {
            self.early.push(f);
            return Next::Nothing;
        }
        let next = self.apply(f);
        if next == Next::Nothing {
            self.tx.send_replace(self.state.clone());
        }
        next
    }

    fn apply(&mut self, f: PresenceFrame) -> Next {
        let seq = self.state.seq.unwrap_or(0);
        if self.state.epoch.as_deref() != Some(f.epoch.as_str()) || f.seq > seq + 1 {
            self.restart();
            return Next::Snapshot;
        }
        if f.seq <= seq {
            return Next::Nothing; // already in the snapshot, or a repeat
        }
        match f.action.as_str() {
            "join" => {
                self.state
                    .members
                    .insert(f.member.session_id.clone(), f.member);
            }
            _ => {
                self.state.members.remove(&f.member.session_id);
            }
        }
        self.state.seq = Some(f.seq);
        Next::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, action: &str, sid: &str) -> PresenceFrame {
        PresenceFrame {
            stream: "room:1".into(),
            seq,
            epoch: "e1".into(),
            action: action.into(),
            member: PresenceMember {
                sub: "u".into(),
                session_id: sid.into(),
                info: None,
                since: 1,
            },
        }
    }

    fn page(seq: u64, sids: &[&str]) -> PresencePage {
        PresencePage {
            stream: "room:1".into(),
            epoch: "e1".into(),
            presence_seq: seq,
            occupancy: sids.len() as u64,
            members: sids.iter().map(|s| frame(0, "join", s).member).collect(),
            next_cursor: None,
        }
    }

    #[test]
    fn frames_before_the_snapshot_apply_only_past_it() {
        let (mut t, view) = Tracker::new();
        // Subscribed at head 2; frames 3 and 4 arrive; the snapshot is taken at 3.
        assert_eq!(t.frame(frame(3, "join", "c")), Next::Nothing);
        assert_eq!(t.frame(frame(4, "leave", "a")), Next::Nothing);
        assert_eq!(t.snapshot(vec![page(3, &["a", "b", "c"])]), Next::Nothing);
        let ids: Vec<String> = view.members().into_iter().map(|m| m.session_id).collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(t.position(), Some((4, Some("e1".into()))));
        // A repeat changes nothing; a skipped seq or another epoch asks for a snapshot.
        assert_eq!(t.frame(frame(4, "leave", "a")), Next::Nothing);
        assert_eq!(t.frame(frame(6, "join", "d")), Next::Snapshot);
        assert!(t.needs_snapshot());
    }
}
