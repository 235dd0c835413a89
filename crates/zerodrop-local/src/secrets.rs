//! `secrets.json`: the file in a data dir that holds the secrets a server generated (api key,
//! admin token, JWT secret, resume keys).
//!
//! This module owns the file's name and format and reads it. It must not generate, write or
//! validate secrets (the server does, with mode 0600), and it never prints a secret: the
//! struct has no `Debug`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The file's name inside a data dir.
pub const FILE_NAME: &str = "secrets.json";

/// The file's contents. Each secret is optional: a file may hold only some of them (the
/// others then come from `ZERODROP_*` variables), and an older file may lack a newer one.
#[derive(Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretsFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    /// `kid:secret[,kid:secret…]`, the first one signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_keys: Option<String>,
}

/// Where `secrets.json` is in `data_dir`.
pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Reads `data_dir`'s `secrets.json`; `None` when there is none.
pub fn read_file(data_dir: &Path) -> anyhow::Result<Option<SecretsFile>> {
    let path = path_in(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let f: SecretsFile = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", path.display()))?;
            Ok(Some(f))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_server_writes_and_tells_a_missing_file_from_a_broken_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_file(dir.path()).unwrap().is_none());
        std::fs::write(
            path_in(dir.path()),
            r#"{"apiKey":"k","adminToken":"a","jwtSecret":"j","resumeKeys":"k1:x"}"#,
        )
        .unwrap();
        let f = read_file(dir.path()).unwrap().unwrap();
        assert_eq!(f.api_key.as_deref(), Some("k"));
        assert_eq!(f.admin_token.as_deref(), Some("a"));
        assert_eq!(f.jwt_secret.as_deref(), Some("j"));
        assert_eq!(f.resume_keys.as_deref(), Some("k1:x"));

        std::fs::write(path_in(dir.path()), r#"{"apiKey":"k"}"#).unwrap();
        let f = read_file(dir.path()).unwrap().unwrap();
        assert!(f.jwt_secret.is_none());
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"apiKey":"k"}"#,
            "absent secrets stay absent when written back"
        );

        std::fs::write(path_in(dir.path()), "not json").unwrap();
        let e = read_file(dir.path()).err().unwrap();
        assert!(format!("{e:#}").contains("is not valid JSON"), "{e:#}");
    }
}
