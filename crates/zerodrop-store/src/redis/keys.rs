//! Every Redis key and channel name the store uses (see the list in the store's module doc).
//! All keys of one stream share the hash tag `{<stream>}`, so each stream script runs on one
//! cluster slot; a session's keys are tagged by its id, a subject's set by the subject.
//!
//! Must not: build a key anywhere else; a key built twice can drift out of its slot.

use zerodrop_core::{SessionId, StreamId};

use crate::guard::JobId;

/// The shared base epoch of a single server's streams.
pub(super) const BASE_EPOCH_KEY: &str = "zd:epoch";
/// Sorted set: stream → time before which it needs no age check.
pub(super) const STREAMS_INDEX: &str = "zd:streams";
/// Sorted set: session id → delete-at time (ms).
pub(super) const SESSIONS_INDEX: &str = "zd:sessions";
/// The live doorbell: trims, renewed epochs, closes, presence and holder notices of every
/// stream, heard by every instance.
pub(super) const CHANNEL: &str = "zd:live";
/// The prefix of a stream's event channel ([`event_channel`]), as the scripts spell it
/// (`channel .. ':e:' .. stream`), and the pattern that hears every stream's.
pub(super) const EVENT_CHANNEL_PATTERN: &str = "zd:live:e:*";

/// The channel of `s`'s new events, heard only by the instances that watch the stream.
pub(super) fn event_channel(s: &StreamId) -> String {
    [CHANNEL, ":e:", s.as_str()].concat()
}
/// Hash: revocation id → the record (JSON); one slot with its version counter.
pub(super) const REVOCATIONS: &str = "zd:{rev}:h";
/// Bumped with every change of [`REVOCATIONS`].
pub(super) const REVOCATIONS_VERSION: &str = "zd:{rev}:v";

/// `zd:{<stream>}:<suffix>`: a key of the stream's slot. Keys are built by concatenation
/// rather than `format!`: an append builds two, and `format!` cost about 800 instructions each.
fn in_slot(s: &StreamId, suffix: &str) -> String {
    ["zd:{", s.as_str(), "}:", suffix].concat()
}

pub(super) fn meta_key(s: &StreamId) -> String {
    in_slot(s, "m")
}

/// The stream's record ([`crate::Store::stream_record`]), beside its log in its slot.
pub(super) fn record_key(s: &StreamId) -> String {
    in_slot(s, "r")
}

pub(super) fn log_key(s: &StreamId) -> String {
    in_slot(s, "l")
}

pub(super) fn idem_key(s: &StreamId, key: &str) -> String {
    ["zd:{", s.as_str(), "}:i:", key].concat()
}

pub(super) fn session_key(id: &SessionId) -> String {
    ["zd:s:{", id.as_str(), "}"].concat()
}

/// A subject's live sessions, tagged by the subject (its own slot on a cluster).
pub(super) fn subject_key(sub: &str) -> String {
    ["zd:u:{", sub, "}"].concat()
}

pub(super) fn stream_field(s: &StreamId) -> String {
    ["t:", s.as_str()].concat()
}

// ---------------------------------------- the job queue and the idempotency records

pub(super) const JOB_SEQ: &str = "zd:{jobs}:seq";
pub(super) const JOB_DEDUPE: &str = "zd:{jobs}:dd";
pub(super) const IDEM_SCOPES: &str = "zd:{idem}:scopes";
pub(super) const PUBLISH_STREAMS: &str = "zd:{idem}:ps";

pub(super) fn job_key(id: JobId) -> String {
    format!("zd:{{jobs}}:j:{id}")
}

/// The scope's length first: scopes and keys are free text, and `("a:b", "c")` must not
/// name the record of `("a", "b:c")`.
pub(super) fn idem_prefix(scope: &str) -> String {
    format!("zd:{{idem}}:r:{}:{scope}:", scope.len())
}

pub(super) fn idem_created_key(scope: &str) -> String {
    format!("zd:{{idem}}:c:{scope}")
}

pub(super) fn idem_expiry_key(scope: &str) -> String {
    format!("zd:{{idem}}:e:{scope}")
}

pub(super) fn publish_index_key(s: &StreamId) -> String {
    in_slot(s, "ik")
}

pub(super) fn publish_hits_key(s: &StreamId, key: &str) -> String {
    ["zd:{", s.as_str(), "}:ih:", key].concat()
}

pub(super) fn publish_hits_prefix(s: &StreamId) -> String {
    publish_hits_key(s, "")
}

#[cfg(test)]
mod tests {
    use ::redis::cluster_routing::Slot;

    use super::*;

    #[test]
    fn every_key_of_a_stream_is_on_one_slot() {
        for s in ["room:1", "a", "call:42", "x.y_z-0", &"q".repeat(128)] {
            let stream = StreamId::new(s).unwrap();
            let slot = Slot::for_key(meta_key(&stream));
            assert_eq!(Slot::for_key(log_key(&stream)), slot);
            assert_eq!(Slot::for_key(idem_key(&stream, "any {key} at all")), slot);
            assert_eq!(Slot::for_key(publish_hits_key(&stream, "{k}")), slot);
            assert_eq!(Slot::for_key(publish_index_key(&stream)), slot);
            assert_eq!(slot, Slot::for_key(s), "the tag is the stream id itself");
        }
        let id = SessionId::generate();
        assert_eq!(Slot::for_key(session_key(&id)), Slot::for_key(id.as_str()));
    }

    /// The names are stored data: a change would leave every existing stream behind.
    #[test]
    fn keys_are_spelled_as_stored() {
        let s = StreamId::new("room:1").unwrap();
        assert_eq!(meta_key(&s), "zd:{room:1}:m");
        assert_eq!(record_key(&s), "zd:{room:1}:r");
        assert_eq!(log_key(&s), "zd:{room:1}:l");
        assert_eq!(idem_key(&s, "k 1"), "zd:{room:1}:i:k 1");
        assert_eq!(publish_index_key(&s), "zd:{room:1}:ik");
        assert_eq!(publish_hits_key(&s, "k"), "zd:{room:1}:ih:k");
        assert_eq!(event_channel(&s), "zd:live:e:room:1");
        assert_eq!(stream_field(&s), "t:room:1");
        assert_eq!(subject_key("u1"), "zd:u:{u1}");
        let id = SessionId::parse("s_abc").unwrap();
        assert_eq!(session_key(&id), "zd:s:{s_abc}");
    }

    #[test]
    fn each_family_of_keys_is_on_one_slot() {
        let slot = Slot::for_key(JOB_SEQ);
        for k in [JOB_DEDUPE, &job_key(u64::MAX)] {
            assert_eq!(Slot::for_key(k), slot, "{k}");
        }
        assert_eq!(slot, Slot::for_key("jobs"));
        let slot = Slot::for_key(IDEM_SCOPES);
        for scope in ["gh", "a {b} c", "publish:x"] {
            for k in [
                format!("{}any {{key}}", idem_prefix(scope)),
                idem_created_key(scope),
                idem_expiry_key(scope),
            ] {
                assert_eq!(Slot::for_key(&k), slot, "{k}");
            }
        }
        assert_eq!(slot, Slot::for_key("idem"));
    }

    #[test]
    fn record_keys_do_not_collide_across_scopes() {
        assert_ne!(
            format!("{}c", idem_prefix("a:b")),
            format!("{}b:c", idem_prefix("a"))
        );
    }
}
