//! `zerodrop check-config`: resolves the settings exactly as `serve` does (the same
//! `Config::resolve`, flag > `ZERODROP_*` > file > default), checks the secrets set in the
//! environment by the rules a start applies, and prints the result as TOML (a valid config
//! file), each line saying where its value came from. It starts nothing and never reads or
//! writes the data dir; secret values are never printed, and neither is a password in
//! `redis_url`.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use clap::ArgMatches;
use clap::ValueEnum;
use clap::parser::ValueSource;
use toml::Value;
use zerodrop_server::config::SecretOverrides;
use zerodrop_server::{Config, ServeArgs};

pub fn run(args: ServeArgs, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    let file_keys: Vec<String> = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            // Only the key names, to say which values came from the file; `resolve` below
            // reads the file again with the typed rules and refuses unknown keys.
            text.parse::<toml::Table>()
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default()
        }
        None => Vec::new(),
    };
    let config_path = args.config.clone();
    let cfg = Config::resolve(args, matches)?;
    zerodrop_server::secrets::check_overrides(&cfg.secrets)?;
    print!(
        "{}",
        render(&cfg, matches, &file_keys, config_path.as_deref())
    );
    Ok(ExitCode::SUCCESS)
}

fn enum_name(v: impl ValueEnum) -> Value {
    let name = v
        .to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default();
    Value::String(name)
}

fn int<T: TryInto<i64>>(v: T) -> Value {
    Value::Integer(v.try_into().unwrap_or(i64::MAX))
}

/// Every `serve` setting with its effective value, in the order of `serve --help`.
pub fn settings(c: &Config) -> Vec<(&'static str, Option<Value>)> {
    let s = |v: String| Some(Value::String(v));
    vec![
        ("listen", s(c.listen.to_string())),
        ("data_dir", s(c.data_dir.display().to_string())),
        ("store", Some(enum_name(c.store))),
        ("redis_url", s(redact_urls(&c.redis_url))),
        ("redis_wait_replicas", Some(int(c.redis_wait_replicas))),
        ("reconnect_window_sec", Some(int(c.reconnect_window_sec))),
        ("retention_max_events", Some(int(c.retention.max_events))),
        ("retention_max_bytes", Some(int(c.retention.max_bytes))),
        (
            "retention_max_age_sec",
            Some(int(c.retention.max_age_ms / 1000)),
        ),
        ("drain_grace_sec", Some(int(c.drain_grace_sec))),
        ("max_frame_bytes", Some(int(c.max_frame_bytes))),
        ("ws_deflate", Some(Value::Boolean(c.ws_deflate))),
        ("sse_gzip", Some(Value::Boolean(c.sse_gzip))),
        ("max_payload_bytes", Some(int(c.max_payload_bytes))),
        ("max_batch_bytes", Some(int(c.max_batch_bytes))),
        ("ping_interval_sec", Some(int(c.ping_interval_sec))),
        ("token_grace_sec", Some(int(c.token_grace_sec))),
        ("max_session_age_sec", Some(int(c.max_session_age_sec))),
        ("cors_origins", s(c.cors_origins.clone())),
        (
            "presence",
            Some(Value::Array(
                c.presence
                    .patterns
                    .iter()
                    .cloned()
                    .map(Value::String)
                    .collect(),
            )),
        ),
        (
            "presence_leave_grace_sec",
            Some(int(c.presence.leave_grace_sec)),
        ),
        (
            "presence_heartbeat_sec",
            Some(int(c.presence.heartbeat_sec)),
        ),
        ("presence_max_members", Some(int(c.presence.max_members))),
        ("max_connections", Some(int(c.max_connections))),
        (
            "max_streams_per_session",
            Some(int(c.max_streams_per_session)),
        ),
        (
            "max_sessions_per_subject",
            Some(int(c.max_sessions_per_subject)),
        ),
        (
            "max_new_streams_per_minute",
            Some(int(c.max_new_streams_per_minute)),
        ),
        ("ws_frames_per_sec", Some(int(c.ws_frames_per_sec))),
        ("http_requests_per_sec", Some(int(c.http_requests_per_sec))),
        (
            "http_header_timeout_sec",
            Some(int(c.http_header_timeout_sec)),
        ),
        ("http_idle_timeout_sec", Some(int(c.http_idle_timeout_sec))),
        (
            "max_pending_connections",
            Some(int(c.max_pending_connections)),
        ),
        ("idempotency_ttl_sec", Some(int(c.idempotency_ttl_sec))),
        ("sqlite_synchronous", Some(enum_name(c.sqlite_synchronous))),
        ("require_durability", Some(enum_name(c.require_durability))),
        (
            "sqlite_check_interval_sec",
            Some(int(c.sqlite_check_interval_sec)),
        ),
        ("ds_access", Some(enum_name(c.ds_access))),
        ("live_ring_events", Some(int(c.live_ring_events))),
        ("instance_id", c.instance_id.clone().map(Value::String)),
        ("jwks_url", c.jwks_url.clone().map(Value::String)),
        ("jwks_refresh_min_sec", Some(int(c.jwks_refresh_min_sec))),
        ("jwt_issuer", c.jwt_issuer.clone().map(Value::String)),
        ("jwt_audience", c.jwt_audience.clone().map(Value::String)),
        (
            "authz_upstream",
            c.authz_upstream.clone().map(Value::String),
        ),
        ("authz_path", s(c.authz_path.clone())),
        ("authz_actions", s(c.authz_actions.clone())),
        ("log_format", Some(enum_name(c.log_format))),
        ("jobs_lease_ms", Some(int(c.guard.jobs.lease_ms))),
        ("jobs_heartbeat_ms", Some(int(c.guard.jobs.heartbeat_ms))),
        (
            "jobs_max_attempts",
            Some(int(c.guard.jobs.retry.max_attempts)),
        ),
        (
            "jobs_backoff_base_ms",
            Some(int(c.guard.jobs.retry.base_ms)),
        ),
        ("jobs_backoff_cap_ms", Some(int(c.guard.jobs.retry.cap_ms))),
        (
            "jobs_running_realtime",
            Some(int(c.guard.jobs.running.per_class[0])),
        ),
        (
            "jobs_running_interactive",
            Some(int(c.guard.jobs.running.per_class[1])),
        ),
        (
            "jobs_running_batch",
            Some(int(c.guard.jobs.running.per_class[2])),
        ),
        (
            "jobs_running_per_kind",
            Some(int(c.guard.jobs.running.default_per_kind)),
        ),
        (
            "jobs_running_kinds",
            s(c.guard
                .jobs
                .running
                .per_kind
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
                .join(",")),
        ),
        (
            "jobs_queued_realtime",
            Some(int(c.guard.jobs.queued.per_class[0])),
        ),
        (
            "jobs_queued_interactive",
            Some(int(c.guard.jobs.queued.per_class[1])),
        ),
        (
            "jobs_queued_batch",
            Some(int(c.guard.jobs.queued.per_class[2])),
        ),
        (
            "jobs_oldest_alert_sec",
            Some(int(c.guard.jobs.oldest_alert_sec)),
        ),
        ("jobs_done_keep_sec", Some(int(c.guard.jobs.done_keep_sec))),
        ("cache_max_entries", Some(int(c.guard.cache_max_entries))),
    ]
}

/// The named upstreams and webhook sources, as comment lines (their keys are listed in
/// docs/guardrails.md; an URL is printed without anything after its host).
fn render_named(c: &Config, out: &mut String) {
    if c.guard.upstreams.is_empty() && c.guard.webhooks.is_empty() {
        let _ = writeln!(out, "# upstreams: none; webhook sources: none");
        return;
    }
    for (name, u) in &c.guard.upstreams {
        let _ = writeln!(
            out,
            "# [upstreams.{name}] primary {}, secondary {}, timeout_ms {}, streams {:?}, circuit min_calls {} of {} ({:?} window), bulkhead max_in_flight {}, cache ttl {} s, public {}",
            redact_urls(&u.primary),
            u.secondary
                .as_deref()
                .map(redact_urls)
                .unwrap_or_else(|| "none".into()),
            u.timeout_ms,
            u.streams,
            u.circuit.min_calls,
            u.circuit.window_size,
            u.circuit.window_kind,
            u.bulkhead.max_in_flight,
            u.cache_ttl_sec,
            u.public,
        );
    }
    for (name, w) in &c.guard.webhooks {
        let _ = writeln!(
            out,
            "# [webhooks.{name}] id from {:?}, stream {}, upstream {}, ttl_sec {}",
            w.id_source(),
            w.stream.as_deref().unwrap_or("none"),
            w.upstream.as_deref().unwrap_or("none"),
            w.ttl_sec,
        );
    }
}

/// The `[streams."<pattern>"]` tables (per-stream policy), as comment lines: each pattern with
/// what its streams get, `(global)` marking a key the table leaves to the global setting.
fn render_streams(c: &Config, out: &mut String) {
    if c.streams.is_empty() {
        let _ = writeln!(out, "# streams: no per-stream policy");
        return;
    }
    fn or_global<T: std::fmt::Display>(set: Option<T>, global: T) -> String {
        match set {
            Some(v) => v.to_string(),
            None => format!("{global} (global)"),
        }
    }
    for (pattern, s) in c.streams.iter() {
        let _ = writeln!(
            out,
            "# [streams.\"{pattern}\"] retention_max_events {}, retention_max_bytes {}, retention_max_age_sec {}, max_payload_bytes {}, presence {}, publish {}",
            or_global(s.retention_max_events, c.retention.max_events),
            or_global(s.retention_max_bytes, c.retention.max_bytes),
            or_global(s.retention_max_age_sec, c.retention.max_age_ms / 1000),
            or_global(s.max_payload_bytes, c.max_payload_bytes),
            s.presence.map_or_else(
                || "as --presence lists (global)".to_string(),
                |p| p.to_string()
            ),
            or_global(s.publish.map(|p| p.as_str()), "any"),
        );
    }
}

fn render(
    c: &Config,
    matches: &ArgMatches,
    file_keys: &[String],
    config: Option<&std::path::Path>,
) -> String {
    let mut out = String::new();
    let file = match config {
        Some(p) => p.display().to_string(),
        None => "none".to_string(),
    };
    let _ = writeln!(
        out,
        "# zerodrop check-config: the settings `zerodrop serve` would run with (valid)\n\
         # config file: {file}"
    );
    for (key, value) in settings(c) {
        let env = format!("ZERODROP_{}", key.to_ascii_uppercase());
        let source = match matches.value_source(key) {
            Some(ValueSource::CommandLine) => "flag".to_string(),
            Some(ValueSource::EnvVariable) => format!("env {env}"),
            _ if file_keys.iter().any(|k| k == key) => "file".to_string(),
            _ => "default".to_string(),
        };
        match value {
            Some(v) => {
                let _ = writeln!(out, "{key} = {v}  # {source}");
            }
            None if key == "instance_id" => {
                let _ = writeln!(out, "# {key}: not set (generated at start)");
            }
            None => {
                let _ = writeln!(out, "# {key}: not set");
            }
        }
    }
    render_named(c, &mut out);
    render_streams(c, &mut out);
    let _ = writeln!(out, "# secrets (values are never printed):");
    let secrets_file = zerodrop_server::secrets::path_in(&c.data_dir);
    for (name, env, set) in secret_sources(&c.secrets) {
        if set {
            let _ = writeln!(out, "#   {name}: from {env}");
        } else {
            let _ = writeln!(
                out,
                "#   {name}: from {} (generated there on first start if missing)",
                secrets_file.display()
            );
        }
    }
    out
}

fn secret_sources(s: &SecretOverrides) -> [(&'static str, &'static str, bool); 4] {
    [
        ("api_key", "ZERODROP_API_KEY", s.api_key.is_some()),
        (
            "admin_token",
            "ZERODROP_ADMIN_TOKEN",
            s.admin_token.is_some(),
        ),
        ("jwt_secret", "ZERODROP_JWT_SECRET", s.jwt_secret.is_some()),
        (
            "resume_keys",
            "ZERODROP_RESUME_KEYS",
            s.resume_keys.is_some(),
        ),
    ]
}

/// `redis://user:password@host` → `redis://user:<redacted>@host`, for each comma-separated URL.
fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|u| {
            let Some((scheme, rest)) = u.split_once("://") else {
                return u.to_string();
            };
            let Some((userinfo, host)) = rest.rsplit_once('@') else {
                return u.to_string();
            };
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
                // `redis://secret@host`: some clients take a lone userinfo as the password.
                None => format!("{scheme}://<redacted>@{host}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_redis_urls_are_redacted() {
        assert_eq!(
            redact_urls("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_urls("redis://:hunter2@10.0.0.1:6379/0,rediss://app:pw@h:1"),
            "redis://:<redacted>@10.0.0.1:6379/0,rediss://app:<redacted>@h:1"
        );
        assert_eq!(redact_urls("redis://tok@h"), "redis://<redacted>@h");
        assert_eq!(
            redact_urls("redis+sentinel://app:pw@10.0.0.1:26379,10.0.0.2:26379/zd"),
            "redis+sentinel://app:<redacted>@10.0.0.1:26379,10.0.0.2:26379/zd"
        );
    }
}
