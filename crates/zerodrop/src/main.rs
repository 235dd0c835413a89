//! `zerodrop`: the one binary. `serve` runs the gateway; `check-config` checks its settings
//! without starting it; `token` mints a connect token for development; `secrets show` prints
//! one secret for scripts; `healthcheck` asks a running server's health endpoint (the
//! container's HEALTHCHECK); the operator tools come from `zerodrop-ops`.

mod check_config;

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use zerodrop_server::config::{LogFormat, SecretOverrides};
use zerodrop_server::{Config, ServeArgs};

#[derive(Parser)]
#[command(
    name = "zerodrop",
    version,
    about = "A real-time gateway that never loses a message"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (embedded SQLite by default; no set-up needed).
    Serve(ServeArgs),
    /// Resolve the settings exactly as `serve` would and print them (secrets redacted); exit
    /// 1 naming the bad setting. Starts nothing and leaves the data dir alone.
    CheckConfig(ServeArgs),
    /// Print a connect token (JWT HS256) for development.
    Token(TokenArgs),
    /// The secrets a server runs with.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Ask a running server's `/health/live` (or `--ready`: `/health/ready`); exit 0 on 200.
    Healthcheck(HealthcheckArgs),
    #[command(flatten)]
    Ops(zerodrop_ops::OpsCommand),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The client's identity (`sub` claim).
    #[arg(long)]
    sub: String,
    /// Streams the client may subscribe to: ids or prefixes ending in `*`, comma-separated.
    #[arg(long, default_value = "*")]
    streams: String,
    /// Streams the client may publish to over WebSocket, same format (none by default).
    #[arg(long)]
    publish: Option<String>,
    /// Upstreams the client may call with `GET /v1/upstreams/<name>/…`: names or prefixes
    /// ending in `*`, comma-separated (none by default: only upstreams set `public = true`).
    #[arg(long)]
    upstreams: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_sec: u64,
    /// Where `secrets.json` is (when `ZERODROP_JWT_SECRET` is not set).
    #[arg(long, env = "ZERODROP_DATA_DIR", default_value = "./zerodrop-data")]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Print one secret to stdout and nothing else (`KEY=$(zerodrop secrets show api-key)`):
    /// its `ZERODROP_*` variable if set, else the data dir's `secrets.json`.
    Show(SecretsShowArgs),
}

#[derive(clap::Args)]
struct SecretsShowArgs {
    /// Which secret.
    name: SecretName,
    /// Where `secrets.json` is (when the secret's variable is not set).
    #[arg(long, env = "ZERODROP_DATA_DIR", default_value = "./zerodrop-data")]
    data_dir: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum SecretName {
    ApiKey,
    AdminToken,
    JwtSecret,
    ResumeKeys,
}

impl SecretName {
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            SecretName::ApiKey => ("api key", "ZERODROP_API_KEY"),
            SecretName::AdminToken => ("admin token", "ZERODROP_ADMIN_TOKEN"),
            SecretName::JwtSecret => ("JWT secret", "ZERODROP_JWT_SECRET"),
            SecretName::ResumeKeys => ("resume keys", "ZERODROP_RESUME_KEYS"),
        }
    }
}

#[derive(clap::Args)]
struct HealthcheckArgs {
    /// The server's address; an unspecified one (`0.0.0.0`, `[::]`) means this host's
    /// loopback, so the default follows the server's own `ZERODROP_LISTEN`.
    #[arg(long, env = "ZERODROP_LISTEN", default_value = "127.0.0.1:7700")]
    addr: SocketAddr,
    /// Ask `/health/ready` (store reachable, not draining) instead of `/health/live`.
    #[arg(long)]
    ready: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3)]
    timeout_sec: u64,
}

fn main() -> ExitCode {
    let matches = Cli::command()
        .try_get_matches()
        .unwrap_or_else(|e| with_profile_tip(e).exit());
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Serve(args) => {
            let sub = matches
                .subcommand_matches("serve")
                .cloned()
                .unwrap_or_default();
            serve(args, &sub)
        }
        Command::CheckConfig(args) => {
            let sub = matches
                .subcommand_matches("check-config")
                .cloned()
                .unwrap_or_default();
            check_config::run(args, &sub)
        }
        Command::Token(args) => token(args),
        Command::Secrets(SecretsCommand::Show(args)) => secrets_show(args),
        Command::Healthcheck(args) => healthcheck(args),
        Command::Ops(cmd) => ops(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("zerodrop: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `drill --quick` and its kin: a load profile is a value of `--profile`, not a flag of its own;
/// say so in clap's error.
fn with_profile_tip(mut e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let profile = match (e.kind(), e.get(ContextKind::InvalidArg)) {
        (ErrorKind::UnknownArgument, Some(ContextValue::String(arg))) => arg
            .strip_prefix("--")
            .filter(|p| zerodrop_ops::drill::Profile::from_str(p, false).is_ok())
            .map(str::to_string),
        _ => None,
    };
    if let Some(p) = profile {
        e.insert(
            ContextKind::Suggested,
            ContextValue::StyledStrs(vec![
                format!("a load profile is chosen with `--profile {p}`").into(),
            ]),
        );
    }
    e
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZERODROP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a file or journald gets plain text (and writing the escape
    // codes cost a tenth of a connect's instructions).
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => b.init(),
    }
}

fn serve(args: ServeArgs, matches: &clap::ArgMatches) -> anyhow::Result<ExitCode> {
    let cfg = Config::resolve(args, matches)?;
    init_logs(cfg.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("zerodrop")
        .max_blocking_threads(32)
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let grace = Duration::from_secs(cfg.drain_grace_sec);
        // Listened for before the server accepts anyone: a signal that arrives once clients
        // are connected always drains (without a handler, SIGINT would end the process).
        let mut signals = ShutdownSignals::new();
        let running = zerodrop_server::start(cfg).await?;
        signals.recv().await;
        tracing::warn!(
            grace_sec = grace.as_secs(),
            "shutdown requested: draining (send the signal again to exit at once)"
        );
        tokio::select! {
            r = running.shutdown(grace) => r?,
            _ = signals.recv() => {
                // Every 201 is already durable, so exiting now loses no event; clients resume
                // elsewhere (or here after a restart) from their acks.
                tracing::warn!("second shutdown signal: exiting at once, without finishing the drain");
                std::process::exit(EXIT_INTERRUPTED);
            }
        }
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// The exit status after a second SIGINT/SIGTERM cut a drain short (128 + SIGINT, as shells
/// report an interrupted program).
const EXIT_INTERRUPTED: i32 = 130;

/// SIGTERM and SIGINT, listened for from creation on: one that arrives before [`recv`] is
/// asked is kept for it.
///
/// [`recv`]: ShutdownSignals::recv
struct ShutdownSignals {
    #[cfg(unix)]
    unix: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl ShutdownSignals {
    fn new() -> ShutdownSignals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let unix = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => Some((term, int)),
                _ => None,
            };
            ShutdownSignals { unix }
        }
        #[cfg(not(unix))]
        {
            ShutdownSignals {}
        }
    }

    /// The next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.unix {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The operator tools (probe, drill, gate, …): clients of a server, never a server.
fn ops(cmd: zerodrop_ops::OpsCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("zerodrop-ops")
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(zerodrop_ops::run(cmd))
}

/// One secret as a server started with `data_dir` and this environment would use it: its
/// `ZERODROP_*` variable if set, else `secrets.json`.
fn secret(name: SecretName, data_dir: &Path) -> anyhow::Result<String> {
    let env = SecretOverrides::from_env();
    let from_env = match name {
        SecretName::ApiKey => env.api_key,
        SecretName::AdminToken => env.admin_token,
        SecretName::JwtSecret => env.jwt_secret,
        SecretName::ResumeKeys => env.resume_keys,
    };
    if let Some(s) = from_env {
        return Ok(s);
    }
    let path = zerodrop_server::secrets::path_in(data_dir);
    let (what, var) = name.describe();
    let why = match zerodrop_server::secrets::read_file(data_dir)? {
        None => format!("{} does not exist", path.display()),
        Some(f) => {
            let held = match name {
                SecretName::ApiKey => f.api_key,
                SecretName::AdminToken => f.admin_token,
                SecretName::JwtSecret => f.jwt_secret,
                SecretName::ResumeKeys => f.resume_keys,
            };
            match held.filter(|s| !s.is_empty()) {
                Some(s) => return Ok(s),
                None => format!("{} does not hold it", path.display()),
            }
        }
    };
    bail!(
        "no {what}: {why}; set {var} or run `zerodrop serve` once with --data-dir {}",
        data_dir.display()
    )
}

fn secrets_show(args: SecretsShowArgs) -> anyhow::Result<ExitCode> {
    let s = secret(args.name, &args.data_dir)?;
    println!("{s}");
    Ok(ExitCode::SUCCESS)
}

/// A plain HTTP/1.1 GET over loopback: the runtime image needs no curl or wget.
fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let mut addr = args.addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let path = if args.ready {
        "/health/ready"
    } else {
        "/health/live"
    };
    let limit = Duration::from_secs(args.timeout_sec.max(1));
    let mut conn = TcpStream::connect_timeout(&addr, limit)
        .with_context(|| format!("cannot connect to {addr}"))?;
    conn.set_read_timeout(Some(limit))?;
    conn.set_write_timeout(Some(limit))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("cannot send to {addr}"))?;
    let mut answer = Vec::new();
    conn.take(64 * 1024)
        .read_to_end(&mut answer)
        .with_context(|| format!("no answer from {addr}{path} within {limit:?}"))?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b.trim());
    if status != "200" {
        bail!("{addr}{path} answered {status:?}: {body}");
    }
    println!("{body}");
    Ok(ExitCode::SUCCESS)
}

fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let secret = secret(SecretName::JwtSecret, &args.data_dir)?;
    let list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect()
    };
    let claims = zerodrop_server::auth::ConnectClaims {
        sub: args.sub,
        iat: Some(zerodrop_core::now_ms() / 1000),
        exp: zerodrop_core::now_ms() / 1000 + args.ttl_sec,
        streams: list(&args.streams),
        publish: args.publish.as_deref().map(list),
        upstreams: args.upstreams.as_deref().map(list).unwrap_or_default(),
        info: None,
    };
    println!(
        "{}",
        zerodrop_server::auth::mint_connect_token(&secret, &claims)
    );
    Ok(ExitCode::SUCCESS)
}
