//! What a client may do: the `streams` and `publish` claims of a connect token.
//!
//! A pattern is either an exact stream id or a prefix ending in `*` (`room:*`). A lone `*`
//! allows every stream. Grants are stored with the session, so a resumed connection (which
//! presents no connect token) keeps exactly the rights it was opened with.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    #[serde(default)]
    pub streams: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    /// The connect token's public `info` claim, shown to the stream's presence (bounded at
    /// connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

impl Grants {
    pub fn may_subscribe(&self, stream: &str) -> bool {
        self.streams.iter().any(|p| pattern_matches(p, stream))
    }

    pub fn may_publish(&self, stream: &str) -> bool {
        self.publish.iter().any(|p| pattern_matches(p, stream))
    }
}

pub fn pattern_matches(pattern: &str, stream: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => stream.starts_with(prefix),
        None => pattern == stream,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_prefix_patterns() {
        let g = Grants {
            streams: vec!["room:*".into(), "user:7".into()],
            publish: vec![],
            info: None,
        };
        assert!(g.may_subscribe("room:1"));
        assert!(g.may_subscribe("room:"));
        assert!(g.may_subscribe("user:7"));
        assert!(!g.may_subscribe("user:70"));
        assert!(!g.may_subscribe("roo"));
        assert!(!g.may_publish("room:1"));
        let all = Grants {
            streams: vec!["*".into()],
            publish: vec!["*".into()],
            info: None,
        };
        assert!(all.may_subscribe("x") && all.may_publish("y"));
    }
}
