//! Where a client's `GET /v1/upstreams/{upstream}/{*path}` may go: only below the upstream's
//! configured base URL.
//!
//! The path is read as the client sent it (the original URI, before any decoding or
//! normalisation), one segment at a time. A segment that is a dot segment (`.`, `..`, also
//! percent-encoded, any case), or that carries an encoded slash or a backslash (`%2F`, `\`,
//! `%5C`), is refused: each is a way to climb out of the base path, at this server or at
//! whatever sits between it and the upstream. What remains is decoded and appended with the
//! URL's path-segment API (which encodes each segment again, so no segment can become two),
//! and the result is checked once more to be under the base before anything is called.

use reqwest::Url;

/// A client's path below an upstream, as decoded segments, and its query as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientPath {
    segments: Vec<String>,
    query: Option<String>,
}

/// Why a client path was refused (the message of a 400 `INVALID_REQUEST`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PathRefused(pub String);

fn refused(m: impl Into<String>) -> PathRefused {
    PathRefused(m.into())
}

/// `%XX` decoded; a `%` not followed by two hex digits stays as it is (as axum decodes).
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Whether a segment, once decoded, could still be read as a way out by a party that decodes
/// it again (`%2e%2e`, `%2f`, `%5c` that were themselves encoded).
fn encoded_escape(decoded: &str) -> bool {
    let lower = decoded.to_ascii_lowercase();
    lower.contains("%2f") || lower.contains("%5c") || {
        let again = String::from_utf8_lossy(&percent_decode(&lower)).into_owned();
        again == "." || again == ".."
    }
}

impl ClientPath {
    /// Parses the raw path below the upstream's name (`items/1`, as the client sent it) and
    /// the raw query.
    pub fn parse(raw: &str, query: Option<&str>) -> Result<ClientPath, PathRefused> {
        let mut segments = Vec::new();
        for seg in raw.split('/') {
            let lower = seg.to_ascii_lowercase();
            if lower.contains("%2f") {
                return Err(refused(
                    "an encoded slash (%2F) is not allowed in an upstream path",
                ));
            }
            if seg.contains('\\') || lower.contains("%5c") {
                return Err(refused(
                    "a backslash (\\ or %5C) is not allowed in an upstream path",
                ));
            }
            let decoded = String::from_utf8(percent_decode(seg))
                .map_err(|_| refused("an upstream path must be UTF-8 once percent-decoded"))?;
            if decoded == "." || decoded == ".." || encoded_escape(&decoded) {
                return Err(refused(
                    "dot segments (`.`, `..`, also percent-encoded) are not allowed in an upstream path",
                ));
            }
            segments.push(decoded);
        }
        Ok(ClientPath {
            segments,
            query: query.map(String::from),
        })
    }

    /// The path and query as the cache and the logs name them (`/items/1?x=2`).
    pub fn display(&self) -> String {
        let mut s = format!("/{}", self.segments.join("/"));
        if let Some(q) = &self.query {
            s.push('?');
            s.push_str(q);
        }
        s
    }

    /// The URL to call under `base`, or `None` when it would not stay below `base`'s path.
    pub fn under(&self, base: &Url) -> Option<Url> {
        let mut url = base.clone();
        url.path_segments_mut()
            .ok()?
            .pop_if_empty()
            .extend(&self.segments);
        url.set_query(self.query.as_deref());
        url.set_fragment(None);
        stays_under(base, &url).then_some(url)
    }
}

/// Whether `url` is on `base`'s origin and its path is `base`'s path or below it, with no dot
/// segment left in it (defence in depth: [`ClientPath::parse`] already refused them).
pub fn stays_under(base: &Url, url: &Url) -> bool {
    if url.origin() != base.origin() {
        return false;
    }
    let prefix = base.path().trim_end_matches('/');
    let path = url.path();
    let below = path == prefix || path.starts_with(&format!("{prefix}/"));
    let dotted = url.path_segments().is_some_and(|mut s| {
        s.any(|seg| {
            let again = String::from_utf8_lossy(&percent_decode(seg)).into_owned();
            again == "." || again == ".."
        })
    });
    below && !dotted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn to(b: &str, raw: &str, q: Option<&str>) -> Result<String, PathRefused> {
        let p = ClientPath::parse(raw, q)?;
        Ok(p.under(&base(b)).expect("stays under").to_string())
    }

    #[test]
    fn ordinary_paths_go_below_the_base() {
        assert_eq!(
            to("http://h:1/api", "items/1", Some("x=2")).unwrap(),
            "http://h:1/api/items/1?x=2"
        );
        assert_eq!(
            to("http://h:1", "items/", None).unwrap(),
            "http://h:1/items/"
        );
        assert_eq!(
            to("http://h:1/api/", "a%20b/caf%C3%A9", None).unwrap(),
            "http://h:1/api/a%20b/caf%C3%A9"
        );
        // A literal `%` and a `?` that was encoded stay encoded: one segment each.
        assert_eq!(
            to("http://h:1/api", "50%25/what%3F", None).unwrap(),
            "http://h:1/api/50%25/what%3F"
        );
        assert_eq!(
            ClientPath::parse("items/1", Some("x=2")).unwrap().display(),
            "/items/1?x=2"
        );
    }

    #[test]
    fn every_way_out_is_refused() {
        for raw in [
            "..",
            ".",
            "../secret",
            "..%2Fsecret",
            "..%2fsecret",
            "%2E%2E/secret",
            "%2e%2E/secret",
            ".%2E/secret",
            "%2e/x",
            "ok/..%2F..%2Finternal%2Fadmin",
            "ok/../../internal",
            "a/./b",
            "a%2Fb",
            "a\\b",
            "..\\secret",
            "..%5Csecret",
            "%5c",
            "%252E%252E/secret",
            "x%252Fy",
            "%FF",
        ] {
            assert!(ClientPath::parse(raw, None).is_err(), "{raw} was accepted");
        }
        // Names that merely contain dots are fine.
        for raw in ["...", "a..b", ".well-known/x", "v1.2/file.json", "..."] {
            assert!(ClientPath::parse(raw, None).is_ok(), "{raw} was refused");
        }
    }

    #[test]
    fn the_result_is_checked_against_the_base() {
        let b = base("http://h:1/api");
        assert!(stays_under(&b, &base("http://h:1/api")));
        assert!(stays_under(&b, &base("http://h:1/api/x")));
        assert!(!stays_under(&b, &base("http://h:1/apix")));
        assert!(!stays_under(&b, &base("http://h:1/secret")));
        assert!(!stays_under(&b, &base("http://h:2/api/x")));
        assert!(!stays_under(&b, &base("http://h:1/api/%2e%2e")));
        assert!(stays_under(&base("http://h:1"), &base("http://h:1/x")));
    }
}
