//! `zerodrop`: the one binary. `serve` runs the gateway; `token` mints a connect token for
//! development.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use zerodrop_server::config::LogFormat;
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
    /// Print a connect token (JWT HS256) for development.
    Token(TokenArgs),
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
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_sec: u64,
    /// Where `secrets.json` is (when `ZERODROP_JWT_SECRET` is not set).
    #[arg(long, env = "ZERODROP_DATA_DIR", default_value = "./zerodrop-data")]
    data_dir: PathBuf,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
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
        Command::Token(args) => token(args),
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

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZERODROP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        let running = zerodrop_server::start(cfg).await?;
        shutdown_signal().await;
        tracing::warn!(grace_sec = grace.as_secs(), "shutdown requested: draining");
        running.shutdown(grace).await?;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
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

fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let secret = match std::env::var("ZERODROP_JWT_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
    {
        Some(s) => s,
        None => zerodrop_server::secrets::read_file(&args.data_dir)?
            .and_then(|f| f.jwt_secret)
            .with_context(|| {
                format!(
                    "no JWT secret: set ZERODROP_JWT_SECRET or run `zerodrop serve` once with \
                     --data-dir {}",
                    args.data_dir.display()
                )
            })?,
    };
    let list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect()
    };
    let claims = zerodrop_server::auth::ConnectClaims {
        sub: args.sub,
        exp: zerodrop_core::now_ms() / 1000 + args.ttl_sec,
        streams: list(&args.streams),
        publish: args.publish.as_deref().map(list),
    };
    println!(
        "{}",
        zerodrop_server::auth::mint_connect_token(&secret, &claims)
    );
    Ok(ExitCode::SUCCESS)
}
