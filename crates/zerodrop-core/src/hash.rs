//! The chained digest of a stream's retained events (`hash` in `GET /v1/streams/{stream}`).
//!
//! `h₀` is 32 zero bytes; for each retained event in seq order, `hᵢ = SHA-256(hᵢ₋₁ ‖ json)`
//! where `json` is the event exactly as served (the SSE `data:` line, an element of `events`).
//! The result is `hₙ` in lowercase hex. A client holding the same events computes the same
//! value with any SHA-256 (WebCrypto included), so two replicas or a client and the server can
//! compare logs without shipping them.

use sha2::{Digest, Sha256};

#[derive(Clone, Default)]
pub struct ChainHash {
    h: [u8; 32],
}

impl ChainHash {
    pub fn push(&mut self, event_json: &[u8]) {
        let mut d = Sha256::new();
        d.update(self.h);
        d.update(event_json);
        self.h.copy_from_slice(&d.finalize());
    }

    pub fn hex(&self) -> String {
        hex::encode(self.h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_every_event_and_order() {
        let mut a = ChainHash::default();
        assert_eq!(a.hex(), "0".repeat(64));
        a.push(b"1");
        a.push(b"2");
        let mut b = ChainHash::default();
        b.push(b"2");
        b.push(b"1");
        assert_ne!(a.hex(), b.hex());
        let mut c = ChainHash::default();
        c.push(b"1");
        c.push(b"2");
        assert_eq!(a.hex(), c.hex());
    }

    /// The published vectors (docs/vectors/stream-digest.json) are what every implementation,
    /// the browser SDK's included, must reproduce byte for byte.
    #[test]
    fn the_published_vectors_hold() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/vectors/stream-digest.json"
        );
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = doc["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 4);
        let mut trimmed = 0;
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let first = case["firstSeq"].as_u64().unwrap();
            let head = case["headSeq"].as_u64().unwrap();
            let events = case["events"].as_array().unwrap();
            let mut h = ChainHash::default();
            for (i, e) in events.iter().enumerate() {
                let text = e.as_str().unwrap();
                let seq = serde_json::from_str::<serde_json::Value>(text).unwrap()["seq"]
                    .as_u64()
                    .unwrap();
                assert_eq!(
                    seq,
                    first + i as u64,
                    "{name}: retained events run from firstSeq"
                );
                h.push(text.as_bytes());
            }
            assert_eq!(
                head + 1 - first,
                events.len() as u64,
                "{name}: up to headSeq"
            );
            assert_eq!(
                case["count"].as_u64().unwrap(),
                events.len() as u64,
                "{name}"
            );
            assert_eq!(case["hash"].as_str().unwrap(), h.hex(), "{name}");
            if first > 1 {
                trimmed += 1;
            }
        }
        assert_eq!(trimmed, 1, "one case covers a trimmed log");
        assert_eq!(cases[0]["hash"].as_str().unwrap(), "0".repeat(64));
    }
}
