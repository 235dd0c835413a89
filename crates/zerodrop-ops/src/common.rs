//! What every tool shares: where the server is, where the credentials come from, where the
//! report goes, and the progress bar.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// The server a tool talks to and the credentials it may need.
///
/// Credentials are looked up flag → `ZERODROP_*` variable → `--data-dir`'s `secrets.json`,
/// in that order (clap handles the first two).
#[derive(Args, Clone, Debug)]
pub struct TargetArgs {
    /// Base URL of the zerodrop instance.
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    pub url: String,
    #[command(flatten)]
    pub creds: CredArgs,
}

#[derive(Args, Clone, Debug, Default)]
pub struct CredArgs {
    // Generated secrets are URL-safe base64 and may start with `-`: such a value is the
    // flag's value, not another flag.
    /// API key for publishing and reading (backends' credential) [env: ZERODROP_API_KEY]
    #[arg(long, allow_hyphen_values = true)]
    pub api_key: Option<String>,
    /// JWT secret used to mint connect tokens for the synthetic clients
    /// [env: ZERODROP_JWT_SECRET]
    #[arg(long, allow_hyphen_values = true)]
    pub jwt_secret: Option<String>,
    /// Admin token for /admin/* (drain, snapshot) [env: ZERODROP_ADMIN_TOKEN]
    #[arg(long, allow_hyphen_values = true)]
    pub admin_token: Option<String>,
    /// Data directory whose secrets.json supplies any credential not given otherwise
    /// [env: ZERODROP_DATA_DIR; default: ./zerodrop-data when it has one]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// PEM file with CA certificates to trust for `https://` URLs on top of the system's
    /// roots (a private or self-signed CA)
    #[arg(long, env = "ZERODROP_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
}

/// Credentials after the lookup.
#[derive(Clone, Debug, Default)]
pub struct Creds {
    pub api_key: Option<String>,
    pub jwt_secret: Option<String>,
    pub admin_token: Option<String>,
}

/// Trusts the CA certificates in `path` (besides the system's roots) for every `https://` and
/// `wss://` connection this process opens. Only the first file installed takes effect (a tool
/// has one `--ca-file`).
pub fn install_ca_file(path: &Path) -> anyhow::Result<()> {
    static INSTALLED: OnceLock<PathBuf> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    let tls =
        zerodrop_client::Tls::with_ca_file(path).map_err(|e| anyhow::anyhow!("--ca-file: {e}"))?;
    let _ = tls.install_default();
    let _ = INSTALLED.set(path.to_path_buf());
    Ok(())
}

/// A variable's value; unset and empty are the same (an empty secret is no secret).
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl CredArgs {
    /// Flags, then `ZERODROP_*` variables, then `secrets.json`. A `--ca-file` becomes the
    /// process's TLS trust for every client the tool opens.
    pub fn resolve(&self) -> anyhow::Result<Creds> {
        if let Some(path) = &self.ca_file {
            install_ca_file(path)?;
        }
        self.resolve_with(env_var)
    }

    fn resolve_with(&self, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Creds> {
        let mut c = Creds {
            api_key: self.api_key.clone().or_else(|| env("ZERODROP_API_KEY")),
            jwt_secret: self
                .jwt_secret
                .clone()
                .or_else(|| env("ZERODROP_JWT_SECRET")),
            admin_token: self
                .admin_token
                .clone()
                .or_else(|| env("ZERODROP_ADMIN_TOKEN")),
        };
        if c.api_key.is_some() && c.jwt_secret.is_some() && c.admin_token.is_some() {
            return Ok(c);
        }
        // An explicit data dir must be readable; the server's default one is only a fallback.
        let (dir, explicit) = match self
            .data_dir
            .clone()
            .or_else(|| env("ZERODROP_DATA_DIR").map(PathBuf::from))
        {
            Some(d) => (d, true),
            None => (PathBuf::from("zerodrop-data"), false),
        };
        let s = match zerodrop_local::secrets::read_file(&dir)? {
            Some(s) => s,
            None if !explicit => return Ok(c),
            None => bail!(
                "{} does not exist",
                zerodrop_local::secrets::path_in(&dir).display()
            ),
        };
        c.api_key = c.api_key.or(s.api_key);
        c.jwt_secret = c.jwt_secret.or(s.jwt_secret);
        c.admin_token = c.admin_token.or(s.admin_token);
        Ok(c)
    }
}

impl Creds {
    pub fn api_key(&self) -> anyhow::Result<&str> {
        self.api_key.as_deref().context(
            "no API key: pass --api-key, set ZERODROP_API_KEY, or point --data-dir at the server's data directory",
        )
    }
    pub fn jwt_secret(&self) -> anyhow::Result<&str> {
        self.jwt_secret.as_deref().context(
            "no JWT secret: pass --jwt-secret, set ZERODROP_JWT_SECRET, or point --data-dir at the server's data directory",
        )
    }
    pub fn admin_token(&self) -> anyhow::Result<&str> {
        self.admin_token.as_deref().context(
            "no admin token: pass --admin-token, set ZERODROP_ADMIN_TOKEN, or point --data-dir at the server's data directory",
        )
    }
}

/// Where reports go.
#[derive(Args, Clone, Debug, Default)]
pub struct OutArgs {
    /// Directory for the JSON report [default: .output/reliability].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

impl OutArgs {
    pub fn dir(&self) -> PathBuf {
        self.out_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(".output/reliability"))
    }
}

/// Writes `<tool>[-<profile>]-<UTC stamp>.json` into `dir` and returns its path. Two reports
/// in the same second get `-2`, `-3`… rather than overwriting each other.
pub fn write_report(
    dir: &Path,
    tool: &str,
    profile: Option<&str>,
    report: &impl Serialize,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = zerodrop_core::utc_stamp(zerodrop_core::now_ms());
    let stem = match profile {
        Some(p) => format!("{tool}-{p}-{stamp}"),
        None => format!("{tool}-{stamp}"),
    };
    let body = serde_json::to_vec_pretty(report)?;
    for n in 1..1000 {
        let name = if n == 1 {
            format!("{stem}.json")
        } else {
            format!("{stem}-{n}.json")
        };
        let path = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                use std::io::Write;
                f.write_all(&body)
                    .with_context(|| format!("writing {}", path.display()))?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
    bail!("too many reports named {stem} in {}", dir.display())
}

/// Every progress bar of this process, stacked on one stderr target (a game day's overall
/// bar above the bar of the drill it is running); hidden when stderr is not a terminal
/// (indicatif's default).
pub fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4)))
}

/// Prints a summary line to stdout without tearing the progress bars on stderr.
pub fn say(line: impl std::fmt::Display) {
    bars().suspend(|| println!("{line}"));
}

/// A bar over a known duration; hidden when stderr is not a terminal (indicatif's default).
pub fn duration_bar(total: Duration, label: &str) -> ProgressBar {
    let pb = bars().add(ProgressBar::new(total.as_secs().max(1)));
    pb.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    zerodrop_core::now_ms()
}

/// A short random id for stream names and client ids of one run.
pub fn run_id() -> String {
    let b = zerodrop_core::random_bytes::<4>();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its hard limit: every
/// drill client holds a socket, and the default soft limit (often 1,024) is below a scale
/// milestone. Returns the (soft, hard) limits now in force. Processes this one starts (a game
/// day's instances) inherit the raised limit.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            r = want;
        }
    }
    Ok((r.rlim_cur as u64, r.rlim_max as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unnecessary_cast)]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let (soft, hard) = raise_nofile_limit().unwrap();
        assert_eq!(soft, hard);
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
        assert_eq!(r.rlim_cur as u64, hard);
    }

    #[test]
    fn a_secret_that_starts_with_a_hyphen_is_a_value() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            creds: CredArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "zerodrop",
            "--api-key",
            "-jX4k",
            "--jwt-secret",
            "--s3",
            "--admin-token",
            "-a",
        ])
        .unwrap();
        assert_eq!(cli.creds.api_key.as_deref(), Some("-jX4k"));
        assert_eq!(cli.creds.jwt_secret.as_deref(), Some("--s3"));
        assert_eq!(cli.creds.admin_token.as_deref(), Some("-a"));
    }

    #[test]
    fn credentials_fall_back_to_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("secrets.json"),
            r#"{"apiKey":"k-file","adminToken":"a-file","jwtSecret":"j-file","resumeKeys":"k1:xxxxxxxxxxxxxxxxxxxx"}"#,
        )
        .unwrap();
        let args = CredArgs {
            api_key: Some("k-flag".into()),
            data_dir: Some(dir.path().to_path_buf()),
            ..CredArgs::default()
        };
        let env = |k: &str| (k == "ZERODROP_JWT_SECRET").then(|| "j-env".to_string());
        let c = args.resolve_with(env).unwrap();
        assert_eq!(c.api_key.as_deref(), Some("k-flag"), "a flag wins");
        assert_eq!(
            c.jwt_secret.as_deref(),
            Some("j-env"),
            "a variable beats the file"
        );
        let c = args.resolve_with(|_| None).unwrap();
        assert_eq!(c.jwt_secret.as_deref(), Some("j-file"));
        assert_eq!(c.admin_token.as_deref(), Some("a-file"));
        let missing = CredArgs {
            data_dir: Some(dir.path().join("nope")),
            ..CredArgs::default()
        };
        assert!(missing.resolve_with(|_| None).is_err());
        let from_env = CredArgs::default();
        let dir_var = dir.path().to_str().unwrap().to_string();
        let c = from_env
            .resolve_with(|k| (k == "ZERODROP_DATA_DIR").then(|| dir_var.clone()))
            .unwrap();
        assert_eq!(
            c.admin_token.as_deref(),
            Some("a-file"),
            "ZERODROP_DATA_DIR is honoured"
        );
    }

    #[test]
    fn reports_get_unique_spec_names() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_report(
            dir.path(),
            "drill",
            Some("quick"),
            &serde_json::json!({"a":1}),
        )
        .unwrap();
        let b = write_report(
            dir.path(),
            "drill",
            Some("quick"),
            &serde_json::json!({"a":2}),
        )
        .unwrap();
        assert_ne!(a, b);
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("drill-quick-") && name.ends_with("Z.json"),
            "{name}"
        );
        assert_eq!(name.len(), "drill-quick-".len() + 16 + 5);
        let c = write_report(dir.path(), "capacity", None, &1).unwrap();
        assert!(
            c.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("capacity-2")
        );
    }
}
