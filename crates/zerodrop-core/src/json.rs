//! JSON helpers for payloads that are passed through untouched.
//!
//! Payloads are validated by `serde_json` (as `RawValue`) and then only compacted: whitespace
//! outside strings is removed so that an event is one line (SSE `data:` needs that) and its
//! stored size does not depend on the publisher's formatting. Values are never re-ordered or
//! re-encoded.

use std::borrow::Cow;

/// The bytes of valid JSON text that stand outside strings, with their offsets (the quotes
/// and everything between them are skipped).
fn outside_strings(json: &str) -> impl Iterator<Item = (usize, u8)> + '_ {
    let (mut in_str, mut esc) = (false, false);
    json.bytes().enumerate().filter(move |&(_, b)| {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            false
        } else if b == b'"' {
            in_str = true;
            false
        } else {
            true
        }
    })
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Removes insignificant whitespace from valid JSON text.
pub fn compact(json: &str) -> Cow<'_, str> {
    let mut spaces = outside_strings(json)
        .filter(|&(_, b)| is_space(b))
        .peekable();
    if spaces.peek().is_none() {
        return Cow::Borrowed(json);
    }
    // Whitespace is ASCII, so cutting at its offsets keeps the text valid UTF-8.
    let mut out = String::with_capacity(json.len());
    let mut from = 0;
    for (i, _) in spaces {
        out.push_str(&json[from..i]);
        from = i + 1;
    }
    out.push_str(&json[from..]);
    Cow::Owned(out)
}

/// How deep event `data` may nest (arrays and objects). `serde_json` validates a `RawValue`
/// without a recursion limit, but the clients that parse an event (browsers, SDKs, serde's own
/// default of 128 for a whole frame) have one: a deeper payload would be stored and then be
/// unreadable to its subscribers.
pub const MAX_DEPTH: usize = 64;

/// The deepest nesting of arrays and objects in valid JSON text (0 for a scalar).
pub fn depth(json: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for (_, b) in outside_strings(json) {
        match b {
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_nesting_outside_strings() {
        assert_eq!(depth("1"), 0);
        assert_eq!(depth(r#""[[[""#), 0);
        assert_eq!(depth(r#"{"a":[1,{"b":[]}],"c":"]]]\"[["}"#), 4);
        assert_eq!(depth(&format!("{}{}", "[".repeat(65), "]".repeat(65))), 65);
    }
    use proptest::prelude::*;

    #[test]
    fn compacts_outside_strings_only() {
        assert!(matches!(compact(r#"{"a":1}"#), Cow::Borrowed(_)));
        assert_eq!(
            compact("{ \"a\" : [1, 2],\n \"b\": \"x y\\\" z\" }"),
            r#"{"a":[1,2],"b":"x y\" z"}"#
        );
        assert_eq!(compact(" 1 "), "1");
    }

    proptest! {
        #[test]
        fn compacting_keeps_the_value(v in any::<Vec<(String, i32)>>()) {
            let value: serde_json::Value = v.into_iter().map(|(k, n)| (k, serde_json::json!([n, {"s": " x "}]))).collect::<serde_json::Map<_, _>>().into();
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            let c = compact(&pretty);
            prop_assert!(!c.contains('\n'));
            let back: serde_json::Value = serde_json::from_str(&c).unwrap();
            prop_assert_eq!(back, value.clone());
            let compact_ref = serde_json::to_string(&value).unwrap();
            prop_assert_eq!(c.as_ref(), compact_ref.as_str());
        }
    }
}
