//! The presence log's seam, as a property (SPEC §10): whatever joins, renewals, releases,
//! lapses and leaves happen, a snapshot of the members at `presenceSeq` followed by the log
//! after `presenceSeq` gives exactly the members of the end — no hole (a change missed) and no
//! duplicate (a join of a member already in the snapshot, a leave of one not in it) — and the
//! log's seqs are contiguous.

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;
use zerodrop_core::retention::Retention;
use zerodrop_core::{SessionId, StreamId};
use zerodrop_store::{Member, MemoryStore, PresenceAction, PresenceClaim, PresenceStore, Store};
use zerodrop_testkit::sink::Recorder;

#[derive(Clone, Debug)]
enum Op {
    /// A connection of session `n` subscribes (claims, taking over).
    Join(usize),
    /// Its connection goes and its lease ends (the grace passed): the sweep lets it leave.
    Lapse(usize),
    /// The session unsubscribes: it leaves at once.
    Leave(usize),
    /// Every member held is renewed by a beat of its holder.
    Beat,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..6usize).prop_map(Op::Join),
        (0..6usize).prop_map(Op::Lapse),
        (0..6usize).prop_map(Op::Leave),
        Just(Op::Beat),
    ]
}

fn sid(n: usize) -> SessionId {
    SessionId::parse(&format!("s_{n}")).unwrap()
}

fn claim(n: usize, take: bool) -> PresenceClaim {
    PresenceClaim {
        stream: StreamId::new("room:p").unwrap(),
        member: Member {
            sub: format!("u{n}"),
            session_id: sid(n),
            info: None,
            since: 0,
        },
        holder: format!("conn-{n}"),
        take,
        lease_ms: 3_600_000,
    }
}

async fn apply(p: &dyn PresenceStore, op: &Op, held: &mut BTreeSet<usize>) {
    let room = StreamId::new("room:p").unwrap();
    match op {
        Op::Join(n) => {
            p.presence_claim(claim(*n, true), 4).await.unwrap();
            held.insert(*n);
        }
        Op::Lapse(n) => {
            p.presence_release(&room, &sid(*n), &format!("conn-{n}"), 0)
                .await
                .unwrap();
            held.remove(n);
            p.presence_sweep(false).await.unwrap();
        }
        Op::Leave(n) => {
            p.presence_leave(&room, &sid(*n)).await.unwrap();
            held.remove(n);
        }
        Op::Beat => {
            for n in held.iter() {
                p.presence_claim(claim(*n, false), 4).await.unwrap();
            }
        }
    }
}

fn members(page: &zerodrop_store::PresencePage) -> BTreeSet<String> {
    page.members
        .iter()
        .map(|m| m.session_id.as_str().to_string())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn a_snapshot_then_the_log_after_it_has_no_hole_and_no_duplicate(
        before in proptest::collection::vec(op(), 0..30),
        after in proptest::collection::vec(op(), 0..30),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = MemoryStore::new(Retention::default(), Arc::new(Recorder::default()));
            let p = store.presence();
            let room = StreamId::new("room:p").unwrap();
            let mut held = BTreeSet::new();
            for o in &before {
                apply(p, o, &mut held).await;
            }
            let snap = p.presence_members(&room, None, 1000).await.unwrap();
            prop_assert_eq!(snap.occupancy as usize, snap.members.len());
            for o in &after {
                apply(p, o, &mut held).await;
            }
            let log = p.presence_read(&room, snap.seq, 10_000).await.unwrap();
            let mut view = members(&snap);
            let mut expect = snap.seq;
            for e in &log.entries {
                expect += 1;
                prop_assert_eq!(e.seq, expect, "contiguous seqs");
                prop_assert_eq!(&e.epoch, &snap.epoch);
                let id = e.member.session_id.as_str().to_string();
                match e.action {
                    PresenceAction::Join => prop_assert!(view.insert(id), "a duplicate join"),
                    PresenceAction::Leave => prop_assert!(view.remove(&id), "a leave of a non-member"),
                }
            }
            prop_assert_eq!(expect, log.head, "read to the head");
            let end = p.presence_members(&room, None, 1000).await.unwrap();
            prop_assert_eq!(view, members(&end), "the snapshot plus the log is the end state");
            prop_assert!(end.members.len() <= 4, "the cap holds");
            Ok(())
        })?;
    }
}
