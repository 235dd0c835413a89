//! The shared test vectors (docs/vectors), checked by the Rust SDK: the stream digest over the
//! events as served, and the end-to-end sealed format — the same files the browser SDK's
//! tests and the server's tests read.

use serde_json::Value;
use zerodrop_client::consistency::chain;

fn vectors(name: &str) -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/vectors/");
    let text = std::fs::read_to_string(format!("{path}{name}")).expect("vector file");
    serde_json::from_str(&text).expect("vector JSON")
}

#[test]
fn the_stream_digest_matches_every_vector() {
    let v = vectors("stream-digest.json");
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for c in cases {
        let events: Vec<&str> = c["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert_eq!(
            events.len() as u64,
            c["count"].as_u64().unwrap(),
            "{}",
            c["name"]
        );
        assert_eq!(chain(&events), c["hash"].as_str().unwrap(), "{}", c["name"]);
    }
}

#[cfg(feature = "e2e")]
mod e2e {
    use super::*;
    use serde_json::value::RawValue;
    use zerodrop_client::e2e::{E2eError, GroupKey, Sealed, open_text, parse_sealed, seal_text};

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn key(c: &Value) -> GroupKey {
        GroupKey::new(&hex(c["key"].as_str().unwrap()).try_into().unwrap())
    }

    fn raw(v: &Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    #[test]
    fn sealing_gives_exactly_the_vectors_and_opens_them_back() {
        let v = vectors("e2e-aes256gcm.json");
        for c in v["cases"].as_array().unwrap() {
            let name = c["name"].as_str().unwrap();
            let (kid, stream) = (c["kid"].as_str().unwrap(), c["stream"].as_str().unwrap());
            let plaintext = c["plaintext"].as_str().unwrap();
            let nonce: [u8; 12] = hex(c["nonce"].as_str().unwrap()).try_into().unwrap();
            let sealed = seal_text(&key(c), kid, stream, plaintext, Some(nonce));
            let want: Sealed = serde_json::from_value(c["sealed"].clone()).unwrap();
            assert_eq!(sealed, want, "{name}");
            let parsed = parse_sealed(&raw(&c["sealed"])).unwrap().expect(name);
            assert_eq!(
                open_text(&key(c), stream, &parsed).unwrap(),
                plaintext,
                "{name}"
            );
        }
    }

    #[test]
    fn every_invalid_vector_is_refused_with_its_code() {
        let v = vectors("e2e-aes256gcm.json");
        let invalid = v["invalid"].as_array().unwrap();
        assert!(invalid.len() >= 5);
        for c in invalid {
            let name = c["name"].as_str().unwrap();
            let stream = c["stream"].as_str().unwrap();
            let got: Result<String, E2eError> = parse_sealed(&raw(&c["sealed"]))
                .and_then(|p| open_text(&key(c), stream, &p.expect("the sealed shape")));
            assert_eq!(
                got.map_err(|e| e.code()),
                Err(c["error"].as_str().unwrap()),
                "{name}"
            );
        }
    }
}
