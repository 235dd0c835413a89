//! Every Redis key and channel name the store uses (see the list in the store's module doc).
//! All keys of one stream share the hash tag `{<stream>}`, so each stream script runs on one
//! cluster slot; a session's keys are tagged by its id, a subject's set by the subject.
//!
//! Must not: build a key anywhere else; a key built twice can drift out of its slot.

use zerodrop_core::{SessionId, StreamId};

/// The shared base epoch of a single server's streams.
pub(super) const BASE_EPOCH_KEY: &str = "zd:epoch";
/// Sorted set: stream → time before which it needs no age check.
pub(super) const STREAMS_INDEX: &str = "zd:streams";
/// Sorted set: session id → delete-at time (ms).
pub(super) const SESSIONS_INDEX: &str = "zd:sessions";
/// The live doorbell.
pub(super) const CHANNEL: &str = "zd:live";

pub(super) fn meta_key(s: &StreamId) -> String {
    format!("zd:{{{s}}}:m")
}

pub(super) fn log_key(s: &StreamId) -> String {
    format!("zd:{{{s}}}:l")
}

pub(super) fn idem_key(s: &StreamId, key: &str) -> String {
    format!("zd:{{{s}}}:i:{key}")
}

pub(super) fn session_key(id: &SessionId) -> String {
    format!("zd:s:{{{id}}}")
}

/// A subject's live sessions, tagged by the subject (its own slot on a cluster).
pub(super) fn subject_key(sub: &str) -> String {
    format!("zd:u:{{{sub}}}")
}

pub(super) fn stream_field(s: &StreamId) -> String {
    format!("t:{s}")
}

#[cfg(test)]
mod tests {
    use ::redis::cluster_routing::Slot;

    use super::super::guard;
    use super::*;

    #[test]
    fn every_key_of_a_stream_is_on_one_slot() {
        for s in ["room:1", "a", "call:42", "x.y_z-0", &"q".repeat(128)] {
            let stream = StreamId::new(s).unwrap();
            let slot = Slot::for_key(meta_key(&stream));
            assert_eq!(Slot::for_key(log_key(&stream)), slot);
            assert_eq!(Slot::for_key(idem_key(&stream, "any {key} at all")), slot);
            assert_eq!(Slot::for_key(guard::publish_hits_key(&stream, "{k}")), slot);
            assert_eq!(Slot::for_key(guard::publish_index_key(&stream)), slot);
            assert_eq!(slot, Slot::for_key(s), "the tag is the stream id itself");
        }
        let id = SessionId::generate();
        assert_eq!(Slot::for_key(session_key(&id)), Slot::for_key(id.as_str()));
    }
}
