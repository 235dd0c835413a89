//! JSON helpers for payloads that are passed through untouched.
//!
//! Payloads are validated by `serde_json` (as `RawValue`) and then only compacted: whitespace
//! outside strings is removed so that an event is one line (SSE `data:` needs that) and its
//! stored size does not depend on the publisher's formatting. Values are never re-ordered or
//! re-encoded.
//!
//! Because payloads are never re-encoded, an object with the same key twice
//! (`{"k":1,"k":2}`) would be served as sent, and readers disagree on which value wins
//! (last, first, or an error): [`duplicate_key`] finds such a key, at any depth, so that it
//! can be refused before it is stored.

use std::borrow::Cow;
use std::collections::HashSet;

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The offset of the closing quote of the string whose content starts at `from` (the text's
/// length when it has none). String contents are skipped with `memchr`, not byte by byte:
/// they are most of a typical payload.
fn string_end(b: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < b.len() {
        match memchr::memchr2(b'"', b'\\', &b[i..]) {
            Some(k) if b[i + k] == b'"' => return i + k,
            Some(k) => i += k + 2,
            None => break,
        }
    }
    b.len()
}

/// Removes insignificant whitespace from valid JSON text.
pub fn compact(json: &str) -> Cow<'_, str> {
    let b = json.as_bytes();
    let mut out: Option<String> = None;
    let (mut from, mut i) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = string_end(b, i + 1) + 1;
                continue;
            }
            // Whitespace is ASCII, so cutting at its offsets keeps the text valid UTF-8.
            c if is_space(c) => {
                let o = out.get_or_insert_with(|| String::with_capacity(json.len()));
                o.push_str(&json[from..i]);
                from = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    match out {
        None => Cow::Borrowed(json),
        Some(mut o) => {
            o.push_str(&json[from..]);
            Cow::Owned(o)
        }
    }
}

/// How deep event `data` may nest (arrays and objects). `serde_json` validates a `RawValue`
/// without a recursion limit, but the clients that parse an event (browsers, SDKs, serde's own
/// default of 128 for a whole frame) have one: a deeper payload would be stored and then be
/// unreadable to its subscribers.
pub const MAX_DEPTH: usize = 64;

/// The deepest nesting of arrays and objects in valid JSON text (0 for a scalar).
pub fn depth(json: &str) -> usize {
    let b = json.as_bytes();
    let (mut depth, mut max, mut i) = (0usize, 0usize, 0);
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = string_end(b, i + 1) + 1;
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    max
}

/// What [`inspect`] finds in valid JSON text, in one pass.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings<'a> {
    /// The deepest nesting of arrays and objects (0 for a scalar), as [`depth`].
    pub depth: usize,
    /// The first object key met twice in the same object, as [`duplicate_key`].
    pub duplicate_key: Option<String>,
    /// The first number beyond a double's range, as [`number_out_of_range`].
    pub out_of_range: Option<&'a str>,
}

/// Depth, a repeated key and a number out of range, found in one pass over valid JSON text
/// (the checks every event's `data` passes before it is stored).
pub fn inspect(json: &str) -> Findings<'_> {
    let b = json.as_bytes();
    let mut found = Findings::default();
    // One entry per open array (`None`) or object (the keys seen so far in it).
    let mut open: Vec<Option<Keys<'_>>> = Vec::new();
    // The next string of the innermost object is a key (after `{` or `,`).
    let mut expect_key = false;
    let (mut depth, mut i) = (0usize, 0);
    while i < b.len() {
        match b[i] {
            b'"' => {
                let end = string_end(b, i + 1);
                if expect_key
                    && found.duplicate_key.is_none()
                    && let Some(Some(keys)) = open.last_mut()
                    && let Err(key) = keys.insert(decode_key(&b[i + 1..end]))
                {
                    found.duplicate_key = Some(String::from_utf8_lossy(&key).into_owned());
                }
                expect_key = false;
                i = end + 1;
                continue;
            }
            c @ (b'{' | b'[') => {
                depth += 1;
                found.depth = found.depth.max(depth);
                expect_key = c == b'{';
                open.push(expect_key.then(Keys::default));
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                open.pop();
                expect_key = false;
            }
            b',' => expect_key = matches!(open.last(), Some(Some(_))),
            c if c.is_ascii_digit() || c == b'-' => {
                let start = i;
                while i < b.len()
                    && (b[i].is_ascii_digit() || matches!(b[i], b'-' | b'+' | b'.' | b'e' | b'E'))
                {
                    i += 1;
                }
                let number = &json[start..i];
                if found.out_of_range.is_none() && overflows(number) {
                    found.out_of_range = Some(number);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// An object's keys so far: a short list searched in order, a set once it is long (so an
/// object of many keys is not quadratic, and the usual few keys allocate no table).
#[derive(Default)]
struct Keys<'a> {
    few: Vec<Cow<'a, [u8]>>,
    many: Option<HashSet<Cow<'a, [u8]>>>,
}

impl<'a> Keys<'a> {
    const FEW: usize = 16;

    /// Adds `key`, or gives it back when the object already has it.
    fn insert(&mut self, key: Cow<'a, [u8]>) -> Result<(), Cow<'a, [u8]>> {
        if let Some(set) = &mut self.many {
            if set.contains(&key) {
                return Err(key);
            }
            set.insert(key);
            return Ok(());
        }
        if self.few.contains(&key) {
            return Err(key);
        }
        self.few.push(key);
        if self.few.len() > Self::FEW {
            self.many = Some(self.few.drain(..).collect());
        }
        Ok(())
    }
}

/// The first object key that appears twice in the same object, at any depth, in valid JSON
/// text (`None` when every object's keys are distinct). Keys are compared as the strings they
/// stand for, escapes decoded: `"a"` and `"\u0061"` are the same key.
pub fn duplicate_key(json: &str) -> Option<String> {
    inspect(json).duplicate_key
}

/// The first number in valid JSON text that is beyond the range of a double (`1e309`,
/// `-1e400`, 310 digits): JSON's grammar allows it and `serde_json` validates it as raw text,
/// but a reader turns it into an error (`serde_json`: "number out of range") or into
/// `Infinity` (`JSON.parse`), so it must not be stored. Numbers that round to 0 are fine.
pub fn number_out_of_range(json: &str) -> Option<&str> {
    inspect(json).out_of_range
}

/// Whether a number's text is beyond a double's range. Only an exponent or more than 309
/// digits can leave it.
fn overflows(number: &str) -> bool {
    let may = number.len() > 300 || number.bytes().any(|b| b | 0x20 == b'e');
    may && serde_json::from_str::<f64>(number).is_err()
}

/// A key's content (between the quotes) as the bytes of the string it stands for: borrowed
/// when it has no escape (valid UTF-8 is already its own spelling), else decoded. A lone
/// surrogate escape becomes its 3-byte generalised UTF-8 form, which valid text never holds,
/// so two keys decode equal exactly when they stand for the same string.
fn decode_key(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.contains(&b'\\') {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' || i + 1 >= raw.len() {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let esc = raw[i + 1];
        i += 2;
        let simple = match esc {
            b'n' => Some(b'\n'),
            b't' => Some(b'\t'),
            b'r' => Some(b'\r'),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'u' => None,
            other => Some(other), // `\"`, `\\`, `\/`
        };
        if let Some(c) = simple {
            out.push(c);
            continue;
        }
        let Some(unit) = hex4(raw, i) else {
            continue;
        };
        i += 4;
        let mut code = u32::from(unit);
        if (0xD800..0xDC00).contains(&unit)
            && raw.get(i..i + 2) == Some(&b"\\u"[..])
            && let Some(low) = hex4(raw, i + 2).filter(|l| (0xDC00..0xE000).contains(l))
        {
            code = 0x10000 + ((code - 0xD800) << 10) + (u32::from(low) - 0xDC00);
            i += 6;
        }
        push_code_point(&mut out, code);
    }
    Cow::Owned(out)
}

fn hex4(raw: &[u8], at: usize) -> Option<u16> {
    let digits = std::str::from_utf8(raw.get(at..at + 4)?).ok()?;
    u16::from_str_radix(digits, 16).ok()
}

/// UTF-8 encoding of a code point, surrogates included (generalised UTF-8).
fn push_code_point(out: &mut Vec<u8>, c: u32) {
    // The casts keep the low bits on purpose: each byte is masked to its UTF-8 payload.
    if c < 0x80 {
        out.push(c as u8);
    } else if c < 0x800 {
        out.extend([0xC0 | (c >> 6) as u8, 0x80 | (c & 0x3F) as u8]);
    } else if c < 0x10000 {
        out.extend([
            0xE0 | (c >> 12) as u8,
            0x80 | ((c >> 6) & 0x3F) as u8,
            0x80 | (c & 0x3F) as u8,
        ]);
    } else {
        out.extend([
            0xF0 | (c >> 18) as u8,
            0x80 | ((c >> 12) & 0x3F) as u8,
            0x80 | ((c >> 6) & 0x3F) as u8,
            0x80 | (c & 0x3F) as u8,
        ]);
    }
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
    fn numbers_beyond_a_double_are_found() {
        for bad in [
            "1e309",
            "[1, -1e400]",
            r#"{"a":"1e999","b":1E+309}"#,
            "1e3092",
        ] {
            assert!(number_out_of_range(bad).is_some(), "{bad}");
        }
        assert_eq!(
            number_out_of_range(r#"{"n":[1.5e300, 2e309]}"#),
            Some("2e309")
        );
        let long = "9".repeat(310);
        assert_eq!(number_out_of_range(&long), Some(long.as_str()));
        for good in [
            "1e308",
            "-1.7976931348623157e308",
            "1e-400",
            "18446744073709551616",
            r#"{"e":true,"f":false,"s":"1e999"}"#,
            "null",
        ] {
            assert_eq!(number_out_of_range(good), None, "{good}");
        }
    }

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

    #[test]
    fn duplicate_keys_are_found_at_any_depth_and_in_any_spelling() {
        assert_eq!(duplicate_key(r#"{"k":1,"k":2}"#).as_deref(), Some("k"));
        assert_eq!(
            duplicate_key(r#"[1,{"a":{"b":[{"c":1,"c":{}}]}}]"#).as_deref(),
            Some("c")
        );
        assert_eq!(duplicate_key(r#"{"a":1,"\u0061":2}"#).as_deref(), Some("a"));
        assert_eq!(duplicate_key(r#"{"é":1,"\u00e9":2}"#).as_deref(), Some("é"));
        assert_eq!(
            duplicate_key(r#"{"😀":1,"\ud83d\ude00":2}"#).as_deref(),
            Some("😀")
        );
        assert_eq!(
            duplicate_key(r#"{"\"":1,"\u0022":2}"#).as_deref(),
            Some("\"")
        );
        assert!(duplicate_key(r#"{"\ud800":1,"\ud800":2}"#).is_some());
        // The same key in different objects, values that look like keys, strings with braces.
        for ok in [
            r#"{"a":{"a":1},"b":[{"a":2},{"a":3}]}"#,
            r#"{"a":"a","b":["a","a"],"c":"{\"a\":1,\"a\":2}"}"#,
            r#"{"a":1,"A":2,"\u0061b":3,"\ud800":4,"\udc00":5}"#,
            r#"[{"k":1},{"k":1}]"#,
            r#""{\"k\":1,\"k\":2}""#,
            "{}",
            "1",
        ] {
            assert_eq!(duplicate_key(ok), None, "{ok}");
        }
    }

    #[test]
    fn inspect_finds_each_thing_once_in_one_pass() {
        // Keys past the short list's length are found through the set, and escapes at a
        // string's end do not end it early.
        let keys: Vec<String> = (0..40).map(|i| format!("\"k{i}\\\\\":{i}")).collect();
        let mut text = format!("{{{}}}", keys.join(","));
        assert_eq!(duplicate_key(&text), None);
        text.insert_str(text.len() - 1, r#","k33\\":[1e400,{"a":[[]]}]"#);
        let found = inspect(&text);
        assert_eq!(found.duplicate_key.as_deref(), Some("k33\\"));
        assert_eq!(found.out_of_range, Some("1e400"));
        assert_eq!(found.depth, 5);
        assert_eq!(
            inspect(r#"{"a":"\"}","b":-2.5E+3}"#),
            Findings {
                depth: 1,
                duplicate_key: None,
                out_of_range: None
            }
        );
    }

    /// A JSON text for `v`, with one object (the `dup`-th met in document order, if any)
    /// holding one of its keys twice, spelled with escapes the second time when `escaped`.
    fn render(v: &serde_json::Value, dup: &mut Option<usize>, escaped: bool, out: &mut String) {
        use serde_json::Value;
        match v {
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    render(x, dup, escaped, out);
                }
                out.push(']');
            }
            Value::Object(m) => {
                let here = match dup {
                    Some(0) => {
                        *dup = None;
                        m.keys().next().cloned()
                    }
                    Some(n) => {
                        *n -= 1;
                        None
                    }
                    None => None,
                };
                out.push('{');
                for (i, (k, x)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push(':');
                    render(x, dup, escaped, out);
                }
                if let Some(k) = here {
                    out.push(',');
                    let spelled = if escaped {
                        let units: String =
                            k.encode_utf16().map(|u| format!("\\u{u:04x}")).collect();
                        format!("\"{units}\"")
                    } else {
                        serde_json::to_string(&k).unwrap()
                    };
                    out.push_str(&spelled);
                    out.push_str(":null");
                }
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }

    fn value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<i32>().prop_map(Value::from),
            "[a-c\"\\\\{}:,é😀 ]{0,4}".prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 48, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-c\"\\\\é😀]{0,3}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn objects(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(a) => a.iter().map(objects).sum(),
            serde_json::Value::Object(m) => 1 + m.values().map(objects).sum::<usize>(),
            _ => 0,
        }
    }

    proptest! {
        #[test]
        fn a_repeated_key_at_any_depth_is_found(v in value(), pick in any::<usize>(), escaped in any::<bool>()) {
            let mut plain = String::new();
            render(&v, &mut None, false, &mut plain);
            // Without repeats: accepted, and compaction keeps the text byte for byte.
            prop_assert_eq!(duplicate_key(&plain), None);
            let (compacted, encoded) = (compact(&plain), serde_json::to_string(&v).unwrap());
            prop_assert_eq!(compacted.as_ref(), plain.as_str());
            prop_assert_eq!(&plain, &encoded);
            let n = objects(&v);
            prop_assume!(n > 0);
            let mut dup = Some(pick % n);
            let mut text = String::new();
            render(&v, &mut dup, escaped, &mut text);
            // Still valid JSON; found whenever the chosen object had a key to repeat.
            serde_json::from_str::<serde_json::Value>(&text).unwrap();
            let repeated = text.len() > plain.len();
            prop_assert_eq!(duplicate_key(&text).is_some(), repeated, "{}", text);
        }
    }
}
