//! Settings of the upstream side: named upstreams and webhook sources (config-file tables,
//! overridable one key at a time from the environment) and the job queue (plain `serve`
//! settings in [`crate::Config`]).
//!
//! ```toml
//! [upstreams.app]
//! primary = "http://127.0.0.1:9000"
//! streams = ["orders:*"]
//!
//! [webhooks.github]
//! id_header = "x-github-delivery"
//! upstream = "app"
//! ```
//!
//! The environment names a key as `ZERODROP_UPSTREAM_<NAME>_<KEY>` or
//! `ZERODROP_WEBHOOK_<SOURCE>_<KEY>`: the name upper-cased with `-` as `_`, the key upper-cased
//! with a nested table's key joined by `_` (`ZERODROP_UPSTREAM_APP_CIRCUIT_COOLDOWN_MS`). A
//! variable wins over the file; one naming a new upstream or source declares it.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use zerodrop_guard::bulkhead::BulkheadSettings;
use zerodrop_guard::circuit::CircuitSettings;
use zerodrop_guard::retry::RetryPolicy;
use zerodrop_store::{QosClass, QueuedCaps, RunningCaps};

/// What a client `publish` frame on an upstream-bound stream does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BoundMode {
    /// Appended to the stream (answered with its seq) and delivered to the upstream.
    #[default]
    AppendAndDeliver,
    /// Only delivered to the upstream (answered with the job id); the stream gets nothing.
    Deliver,
}

/// One named upstream: an HTTP base URL (and an optional secondary for failover), its circuit
/// breakers (one per target), bulkhead, delivery and cache settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL, e.g. `http://127.0.0.1:9000`. Required.
    pub primary: String,
    /// Used while the primary's circuit is open. Default: none.
    pub secondary: Option<String>,
    /// A call that has not answered after this long fails (and counts as a failure). Default 5000.
    pub timeout_ms: u64,
    /// Deliveries are `POST <target><deliver_path>`. Default `/`.
    pub deliver_path: String,
    /// Stream ids or prefixes ending in `*` whose client `publish` frames go to this upstream.
    /// Default: none.
    pub streams: Vec<String>,
    /// What such a publish does. Default `append_and_deliver`.
    pub mode: BoundMode,
    /// QoS class of their deliveries. Default `realtime`.
    pub class: QosClassSetting,
    pub circuit: CircuitSettings,
    pub bulkhead: BulkheadSettings,
    /// Cache namespace of this upstream's GET answers. Default: the upstream's name.
    pub cache_namespace: Option<String>,
    /// Version of the namespace; changing it invalidates what was cached. Default 1.
    pub cache_version: u64,
    /// How long a GET answer is reused; 0 caches nothing. Default 30.
    pub cache_ttl_sec: u64,
    /// Whether any valid connect token may `GET /v1/upstreams/<name>/…`. Default false: only
    /// the api key and connect tokens whose `upstreams` claim names this upstream may.
    pub public: bool,
    /// Stream ids or prefixes ending in `*` (streams with presence) whose occupancy webhooks
    /// (`stream.occupied`, `stream.vacated`, `member.joined`, `member.left`) go to this
    /// upstream, through the job queue. Default: none.
    pub presence: Vec<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            primary: String::new(),
            secondary: None,
            timeout_ms: 5000,
            deliver_path: "/".into(),
            streams: Vec::new(),
            mode: BoundMode::default(),
            class: QosClassSetting(QosClass::Realtime),
            circuit: CircuitSettings::default(),
            bulkhead: BulkheadSettings::default(),
            cache_namespace: None,
            cache_version: 1,
            cache_ttl_sec: 30,
            public: false,
            presence: Vec::new(),
        }
    }
}

/// A webhook source: where the provider's message id is, and what an accepted webhook does.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Append the body to this stream. Default: none.
    pub stream: Option<String>,
    /// Deliver the body to this upstream through the job queue. Default: none. At least one
    /// of `stream` and `upstream` is required.
    pub upstream: Option<String>,
    /// Header holding the message id. Default `idempotency-key` (when no `id_pointer`).
    pub id_header: Option<String>,
    /// JSON pointer (RFC 6901) to the message id in the body, e.g. `/id`. Default: none.
    pub id_pointer: Option<String>,
    /// Deduplication scope. Default: the source's name.
    pub scope: Option<String>,
    /// How long a message id is remembered. Default 259200 (72 h).
    pub ttl_sec: u64,
    /// QoS class of the deliveries. Default `interactive`.
    pub class: QosClassSetting,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            stream: None,
            upstream: None,
            id_header: None,
            id_pointer: None,
            scope: None,
            ttl_sec: 72 * 3600,
            class: QosClassSetting(QosClass::Interactive),
        }
    }
}

impl WebhookConfig {
    /// Where the message id is read: a header name (lower case), or a JSON pointer.
    pub fn id_source(&self) -> IdSource {
        match (&self.id_pointer, &self.id_header) {
            (Some(p), None) => IdSource::Pointer(p.clone()),
            (_, Some(h)) => IdSource::Header(h.to_ascii_lowercase()),
            (None, None) => IdSource::Header("idempotency-key".into()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdSource {
    Header(String),
    Pointer(String),
}

/// A QoS class as a setting (`realtime`, `interactive`, `batch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QosClassSetting(pub QosClass);

impl Serialize for QosClassSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for QosClassSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        QosClass::parse(&s).map(QosClassSetting).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown class `{s}`: expected realtime, interactive or batch"
            ))
        })
    }
}

/// The job queue's settings (each a `serve` setting with a default, see `ServeArgs`).
#[derive(Clone, Debug, PartialEq)]
pub struct JobsConfig {
    pub lease_ms: u64,
    pub heartbeat_ms: u64,
    pub retry: RetryPolicy,
    pub running: RunningCaps,
    pub queued: QueuedCaps,
    pub oldest_alert_sec: u64,
    pub done_keep_sec: u64,
}

impl JobsConfig {
    /// Jobs one instance runs at once: the sum of the per-class running caps.
    pub fn concurrency(&self) -> usize {
        self.running.per_class.iter().sum::<u64>().max(1) as usize
    }
}

/// Everything on the upstream side.
#[derive(Clone, Debug, PartialEq)]
pub struct GuardConfig {
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub webhooks: BTreeMap<String, WebhookConfig>,
    pub jobs: JobsConfig,
    pub cache_max_entries: usize,
}

impl GuardConfig {
    /// The upstream whose `streams` patterns cover `stream`, if any (the first by name).
    pub fn bound_upstream(&self, stream: &str) -> Option<(&str, &UpstreamConfig)> {
        self.upstreams
            .iter()
            .find(|(_, u)| u.streams.iter().any(|p| pattern_matches(p, stream)))
            .map(|(n, u)| (n.as_str(), u))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, u) in &self.upstreams {
            check_name("upstream", name)?;
            let at = |k: &str| format!("upstreams.{name}.{k}");
            check_url(&u.primary).with_context(|| at("primary"))?;
            if let Some(s) = &u.secondary {
                check_url(s).with_context(|| at("secondary"))?;
            }
            if u.timeout_ms == 0 {
                bail!("{}: must be at least 1", at("timeout_ms"));
            }
            if !u.deliver_path.starts_with('/') {
                bail!("{}: must start with `/`", at("deliver_path"));
            }
            for p in &u.streams {
                let id = p.strip_suffix('*').unwrap_or(p);
                if !id.is_empty() && zerodrop_core::StreamId::new(id).is_err() {
                    bail!("{}: `{p}` is not a stream id or prefix", at("streams"));
                }
            }
            u.circuit
                .validate()
                .map_err(|e| anyhow::anyhow!("{}: {}", at("circuit"), e))?;
            u.bulkhead
                .validate()
                .map_err(|e| anyhow::anyhow!("{}: {}", at("bulkhead"), e))?;
        }
        for (name, w) in &self.webhooks {
            check_name("webhook source", name)?;
            let at = |k: &str| format!("webhooks.{name}.{k}");
            if w.stream.is_none() && w.upstream.is_none() {
                bail!(
                    "webhooks.{name}: set `stream` (append each webhook) or `upstream` (deliver it), or both"
                );
            }
            if let Some(s) = &w.stream
                && zerodrop_core::StreamId::new(s).is_err()
            {
                bail!("{}: `{s}` is not a valid stream id", at("stream"));
            }
            if let Some(u) = &w.upstream
                && !self.upstreams.contains_key(u)
            {
                bail!("{}: no upstream named `{u}` is configured", at("upstream"));
            }
            if w.id_header.is_some() && w.id_pointer.is_some() {
                bail!("webhooks.{name}: set `id_header` or `id_pointer`, not both");
            }
            if let Some(p) = &w.id_pointer
                && !p.starts_with('/')
            {
                bail!(
                    "{}: a JSON pointer starts with `/`, got `{p}`",
                    at("id_pointer")
                );
            }
            if w.ttl_sec == 0 {
                bail!("{}: must be at least 1", at("ttl_sec"));
            }
        }
        let j = &self.jobs;
        j.retry
            .validate()
            .map_err(|e| anyhow::anyhow!("--{}: {}", e.setting.replace('_', "-"), e.message))?;
        if j.lease_ms < 1000 {
            bail!("--jobs-lease-ms (jobs_lease_ms) must be at least 1000");
        }
        if j.heartbeat_ms == 0 || j.heartbeat_ms * 2 > j.lease_ms {
            bail!(
                "--jobs-heartbeat-ms (jobs_heartbeat_ms) must be at least 1 and at most half of --jobs-lease-ms ({}), so a live worker renews its lease in time",
                j.lease_ms
            );
        }
        if j.running.per_class.contains(&0) {
            bail!(
                "--jobs-running-realtime/-interactive/-batch must each be at least 1 (a class with no runner would never drain)"
            );
        }
        Ok(())
    }
}

/// `room:1` matches `room:1`; `room:*` matches every id starting `room:`; `*` matches all.
pub fn pattern_matches(pattern: &str, stream: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => stream.starts_with(prefix),
        None => pattern == stream,
    }
}

fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        bail!("{what} name `{name}` must be 1-64 characters of a-z 0-9 -");
    }
    Ok(())
}

fn check_url(url: &str) -> anyhow::Result<()> {
    if url.is_empty() {
        bail!("an http:// URL is required");
    }
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("`{url}`: only http:// URLs are supported"))?;
    if rest.is_empty() || rest.starts_with('/') {
        bail!("`{url}` has no host");
    }
    Ok(())
}

/// The keys an environment variable may set, as `table.key` paths (longest first, so that
/// `CIRCUIT_SLOW_CALL_MS` is not read as a name ending in `_CIRCUIT_SLOW`).
fn env_keys<T: serde::Serialize>(table: &T) -> Vec<Vec<String>> {
    let mut keys = Vec::new();
    let value = toml::Value::try_from(table).unwrap_or(toml::Value::Table(Default::default()));
    collect(&value, &mut Vec::new(), &mut keys);
    keys.sort_by_key(|k| std::cmp::Reverse(k.join("_").len()));
    keys
}

fn collect(v: &toml::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let toml::Value::Table(t) = v {
        for (k, v) in t {
            path.push(k.clone());
            collect(v, path, out);
            path.pop();
        }
    } else {
        out.push(path.clone());
    }
}

/// Merges `ZERODROP_<PREFIX>_<NAME>_<KEY>` variables into `tables` (name → TOML table).
fn merge_env(
    prefix: &str,
    keys: &[Vec<String>],
    vars: &[(String, String)],
    tables: &mut toml::Table,
) -> anyhow::Result<()> {
    let lead = format!("ZERODROP_{prefix}_");
    for (var, value) in vars {
        let Some(rest) = var.strip_prefix(&lead) else {
            continue;
        };
        let found = keys.iter().find_map(|path| {
            let suffix = format!("_{}", path.join("_").to_ascii_uppercase());
            rest.strip_suffix(&suffix)
                .filter(|n| !n.is_empty())
                .map(|n| (n.to_ascii_lowercase().replace('_', "-"), path))
        });
        let Some((name, path)) = found else {
            bail!("{var}: no such setting (see docs/guardrails.md for the names)");
        };
        let entry = tables
            .entry(name)
            .or_insert_with(|| toml::Value::Table(Default::default()));
        let mut at = entry;
        for k in &path[..path.len() - 1] {
            let toml::Value::Table(t) = at else {
                bail!("{var}: conflicts with the config file");
            };
            at = t
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
        }
        let toml::Value::Table(t) = at else {
            bail!("{var}: conflicts with the config file");
        };
        let leaf = path.last().expect("a key path is never empty");
        t.insert(leaf.clone(), env_value(leaf, value));
    }
    Ok(())
}

/// A variable's text as the TOML value it stands for: a list for `streams`, a number or a
/// boolean when it reads as one, else a string.
fn env_value(key: &str, text: &str) -> toml::Value {
    if key == "streams" {
        return toml::Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        );
    }
    match toml::from_str::<toml::Table>(&format!("v = {text}")) {
        Ok(mut t) => match t.remove("v") {
            Some(
                v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_)),
            ) => v,
            _ => toml::Value::String(text.into()),
        },
        Err(_) => toml::Value::String(text.into()),
    }
}

/// The `[upstreams.*]` and `[webhooks.*]` tables of the config file, with the environment's
/// keys merged in.
pub fn named_tables(
    file_upstreams: Option<toml::Table>,
    file_webhooks: Option<toml::Table>,
    vars: &[(String, String)],
) -> anyhow::Result<(
    BTreeMap<String, UpstreamConfig>,
    BTreeMap<String, WebhookConfig>,
)> {
    let mut ups = file_upstreams.unwrap_or_default();
    merge_env("UPSTREAM", &upstream_keys(), vars, &mut ups)?;
    let mut hooks = file_webhooks.unwrap_or_default();
    merge_env("WEBHOOK", &webhook_keys(), vars, &mut hooks)?;
    let upstreams = ups
        .into_iter()
        .map(|(name, v)| {
            let u: UpstreamConfig = v
                .try_into()
                .with_context(|| format!("upstreams.{name}: invalid settings"))?;
            Ok((name, u))
        })
        .collect::<anyhow::Result<_>>()?;
    let webhooks = hooks
        .into_iter()
        .map(|(name, v)| {
            let w: WebhookConfig = v
                .try_into()
                .with_context(|| format!("webhooks.{name}: invalid settings"))?;
            Ok((name, w))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((upstreams, webhooks))
}

/// The keys of an upstream table, for reading the environment: the table itself with every
/// optional key present (an exhaustive literal, so a new field cannot be forgotten here).
fn upstream_keys() -> Vec<Vec<String>> {
    let d = UpstreamConfig::default();
    env_keys(&UpstreamConfig {
        primary: d.primary,
        secondary: Some(String::new()),
        timeout_ms: d.timeout_ms,
        deliver_path: d.deliver_path,
        streams: d.streams,
        mode: d.mode,
        class: d.class,
        circuit: d.circuit,
        bulkhead: d.bulkhead,
        cache_namespace: Some(String::new()),
        cache_version: d.cache_version,
        cache_ttl_sec: d.cache_ttl_sec,
        public: d.public,
        presence: d.presence,
    })
}

/// The keys of a webhook table, the same way.
fn webhook_keys() -> Vec<Vec<String>> {
    let d = WebhookConfig::default();
    env_keys(&WebhookConfig {
        stream: Some(String::new()),
        upstream: Some(String::new()),
        id_header: Some(String::new()),
        id_pointer: Some(String::new()),
        scope: Some(String::new()),
        ttl_sec: d.ttl_sec,
        class: d.class,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn environment_keys_override_and_declare() {
        let file: toml::Table = toml::from_str(
            "[app]\nprimary = \"http://127.0.0.1:1\"\ntimeout_ms = 100\n[app.circuit]\nmin_calls = 5\n",
        )
        .unwrap();
        let env = vars(&[
            ("ZERODROP_UPSTREAM_APP_TIMEOUT_MS", "250"),
            ("ZERODROP_UPSTREAM_APP_CIRCUIT_SLOW_CALL_MS", "40"),
            ("ZERODROP_UPSTREAM_APP_STREAMS", "orders:*, chat:1"),
            ("ZERODROP_UPSTREAM_APP_PUBLIC", "true"),
            (
                "ZERODROP_UPSTREAM_BILLING_API_PRIMARY",
                "http://127.0.0.1:2",
            ),
            ("ZERODROP_UPSTREAM_BILLING_API_CLASS", "batch"),
            ("ZERODROP_WEBHOOK_GITHUB_ID_HEADER", "X-GitHub-Delivery"),
            ("ZERODROP_WEBHOOK_GITHUB_UPSTREAM", "app"),
            ("ZERODROP_OTHER", "x"),
        ]);
        let (ups, hooks) = named_tables(Some(file), None, &env).unwrap();
        let app = &ups["app"];
        assert_eq!(app.timeout_ms, 250, "the environment wins over the file");
        assert_eq!(app.circuit.min_calls, 5);
        assert_eq!(app.circuit.slow_call_ms, 40);
        assert_eq!(app.streams, vec!["orders:*", "chat:1"]);
        assert_eq!(app.cache_ttl_sec, 30, "default");
        assert!(app.public);
        assert!(!ups["billing-api"].public, "not public by default");
        let billing = &ups["billing-api"];
        assert_eq!(billing.primary, "http://127.0.0.1:2");
        assert_eq!(billing.class, QosClassSetting(QosClass::Batch));
        let gh = &hooks["github"];
        assert_eq!(gh.id_source(), IdSource::Header("x-github-delivery".into()));
        assert_eq!(gh.ttl_sec, 259_200);
        let err = named_tables(
            None,
            None,
            &vars(&[("ZERODROP_UPSTREAM_APP_COLOUR", "red")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("ZERODROP_UPSTREAM_APP_COLOUR"),
            "{err}"
        );
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("orders:*", "orders:1"));
        assert!(!pattern_matches("orders:*", "order"));
        assert!(pattern_matches("chat:1", "chat:1"));
        assert!(!pattern_matches("chat:1", "chat:10"));
        assert!(pattern_matches("*", "anything"));
    }
}
