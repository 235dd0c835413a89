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
}
