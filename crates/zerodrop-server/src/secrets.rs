//! The four secrets: api key, admin token, JWT secret, resume keys.
//!
//! Each comes from its `ZERODROP_*` variable if set, else from `secrets.json` in the data dir;
//! a secret that is in neither is generated and written there. The file is created with mode
//! 0600 (written to a temporary file with that mode, then renamed, so it is never readable by
//! others, not even for a moment). Secrets are never logged: only the file's path is. The
//! file's format and its reading are `zerodrop-local`'s (re-exported here); this module owns
//! generating, validating and writing.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use zerodrop_core::ResumeKeys;

use crate::config::SecretOverrides;

// The file's name, format and reading are shared with the tools and tests that read it.
pub use zerodrop_local::secrets::{FILE_NAME, SecretsFile, path_in, read_file};

/// The secrets the server runs with.
#[derive(Clone)]
pub struct Secrets {
    pub api_key: String,
    pub admin_token: String,
    pub jwt_secret: String,
    pub resume_keys: ResumeKeys,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets { .. }")
    }
}

/// What `load_or_generate` did, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretsSource {
    /// All four came from the environment; the file was not touched.
    Environment,
    /// Read from (and possibly completed in) this file.
    File {
        path: PathBuf,
        generated: Vec<&'static str>,
    },
}

pub fn generate_token() -> String {
    B64.encode(zerodrop_core::random_bytes::<32>())
}

pub fn load_or_generate(
    data_dir: &Path,
    env: &SecretOverrides,
) -> anyhow::Result<(Secrets, SecretsSource)> {
    if let (Some(a), Some(b), Some(c), Some(d)) = (
        &env.api_key,
        &env.admin_token,
        &env.jwt_secret,
        &env.resume_keys,
    ) {
        let s = build(a.clone(), b.clone(), c.clone(), d)?;
        return Ok((s, SecretsSource::Environment));
    }
    let mut file = read_file(data_dir)?.unwrap_or_default();
    let mut generated = Vec::new();
    let mut fill = |slot: &mut Option<String>, name: &'static str, make: fn() -> String| {
        if slot.as_deref().is_none_or(str::is_empty) {
            *slot = Some(make());
            generated.push(name);
        }
    };
    fill(&mut file.api_key, "apiKey", generate_token);
    fill(&mut file.admin_token, "adminToken", generate_token);
    fill(&mut file.jwt_secret, "jwtSecret", generate_token);
    fill(
        &mut file.resume_keys,
        "resumeKeys",
        ResumeKeys::generate_spec,
    );
    let path = path_in(data_dir);
    if !generated.is_empty() {
        write_private(&path, &serde_json::to_vec_pretty(&file)?)?;
    }
    let pick = |env: &Option<String>, file: &Option<String>| {
        env.clone().or_else(|| file.clone()).unwrap_or_default()
    };
    let s = build(
        pick(&env.api_key, &file.api_key),
        pick(&env.admin_token, &file.admin_token),
        pick(&env.jwt_secret, &file.jwt_secret),
        &pick(&env.resume_keys, &file.resume_keys),
    )?;
    Ok((s, SecretsSource::File { path, generated }))
}

/// Shortest api key, admin token or JWT secret accepted.
const MIN_SECRET_LEN: usize = 16;

/// Checks the secrets set in the environment by the rules a start applies to them, without
/// reading or writing the data dir (`zerodrop check-config`).
pub fn check_overrides(env: &SecretOverrides) -> anyhow::Result<()> {
    for (var, v) in [
        ("ZERODROP_API_KEY", &env.api_key),
        ("ZERODROP_ADMIN_TOKEN", &env.admin_token),
        ("ZERODROP_JWT_SECRET", &env.jwt_secret),
    ] {
        if v.as_ref().is_some_and(|v| v.len() < MIN_SECRET_LEN) {
            bail!("{var} must be at least {MIN_SECRET_LEN} characters");
        }
    }
    if let Some(r) = &env.resume_keys {
        ResumeKeys::parse(r).context("ZERODROP_RESUME_KEYS")?;
    }
    Ok(())
}

fn build(api_key: String, admin: String, jwt: String, resume: &str) -> anyhow::Result<Secrets> {
    for (name, v) in [
        ("api key", &api_key),
        ("admin token", &admin),
        ("JWT secret", &jwt),
    ] {
        if v.len() < MIN_SECRET_LEN {
            bail!("the {name} must be at least {MIN_SECRET_LEN} characters");
        }
    }
    let resume_keys = ResumeKeys::parse(resume).context("ZERODROP_RESUME_KEYS")?;
    Ok(Secrets {
        api_key,
        admin_token: admin,
        jwt_secret: jwt,
        resume_keys,
    })
}

/// Writes `bytes` to `path` so that the file is never readable by anyone but the owner.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let tmp = dir.join(format!(".{}.tmp-{}", FILE_NAME, std::process::id()));
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Creates the data dir (mode 0700 when it is new).
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_with_mode_0600_and_env_wins() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (a, src) = load_or_generate(&data, &SecretOverrides::default()).unwrap();
        let SecretsSource::File { path, generated } = src else {
            panic!("expected a file")
        };
        assert_eq!(generated.len(), 4);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (b, src) = load_or_generate(&data, &SecretOverrides::default()).unwrap();
        assert!(matches!(src, SecretsSource::File { generated, .. } if generated.is_empty()));
        assert_eq!(a.api_key, b.api_key);
        assert_eq!(a.jwt_secret, b.jwt_secret);
        let env = SecretOverrides {
            api_key: Some("k".repeat(20)),
            ..Default::default()
        };
        let (c, _) = load_or_generate(&data, &env).unwrap();
        assert_eq!(c.api_key, "k".repeat(20));
        assert_eq!(c.admin_token, a.admin_token);
        let text = std::fs::read_to_string(path).unwrap();
        let f: SecretsFile = serde_json::from_str(&text).unwrap();
        assert!(f.resume_keys.unwrap().starts_with("k1:"));
        assert!(!format!("{c:?}").contains(&c.api_key));
    }

    #[test]
    fn weak_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let env = SecretOverrides {
            api_key: Some("short".into()),
            ..Default::default()
        };
        assert!(load_or_generate(dir.path(), &env).is_err());
    }
}
