//! Byte payloads: how an event whose payload is bytes rather than JSON (a Durable Streams
//! append to a binary or text stream) sits in the event's `data`.
//!
//! Such a `data` is the one-member object `{"$base64":"<standard base64, padded>"}`: the
//! event stays one JSON document (stored, hashed, trimmed and delivered like any other), and
//! every subscriber can tell it from a JSON payload by its shape. WebSocket and SSE deliver
//! it as it is; a reader that wants the bytes decodes the member ([`data_bytes`]). The bytes
//! round-trip exactly, whatever they are.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The member that marks a byte payload.
pub const BYTES_MEMBER: &str = "$base64";

/// The `data` of an event whose payload is `bytes` (compact JSON).
pub fn bytes_data(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4 + 14);
    s.push_str("{\"$base64\":\"");
    STANDARD.encode_string(bytes, &mut s);
    s.push_str("\"}");
    s
}

/// [`bytes_data`] as raw JSON, for a frame's `data`.
pub fn bytes_value(bytes: &[u8]) -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string(bytes_data(bytes))
        .expect("a byte payload's data is one JSON object")
}

/// The bytes of a byte payload's `data`, or `None` when `data` is not one (any other JSON).
pub fn data_bytes(data: &str) -> Option<Vec<u8>> {
    decode(data.strip_prefix("{\"$base64\":\"")?.strip_suffix("\"}")?)
}

/// The member's text for `bytes` (standard base64, padded).
pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// The bytes of a member's text, or `None` when it is not standard padded base64.
pub fn decode(b64: &str) -> Option<Vec<u8>> {
    STANDARD.decode(b64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_exactly() {
        for b in [
            &b""[..],
            b"Hello",
            &[0u8, 1, 2, 0x7f, 0x80, 0xfe, 0xff],
            b"\r\n\"}",
        ] {
            let d = bytes_data(b);
            let v: serde_json::Value = serde_json::from_str(&d).unwrap();
            assert_eq!(v.as_object().unwrap().len(), 1);
            assert!(v[BYTES_MEMBER].is_string());
            assert_eq!(data_bytes(&d).unwrap(), b);
        }
        assert_eq!(bytes_data(b"Hello"), r#"{"$base64":"SGVsbG8="}"#);
        assert_eq!(data_bytes(r#"{"a":1}"#), None);
        assert_eq!(data_bytes(r#"{"$base64":"!!"}"#), None);
    }
}
