//! `zerodrop snapshot`: `GET /admin/snapshot`, printed as one readable section per key.

use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use serde_json::Value;
use zerodrop_client::HttpClient;

use crate::common::{OutArgs, TargetArgs, write_report};

#[derive(Args, Clone, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Print the raw JSON instead of the readable view.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub out: OutArgs,
}

const ORDER: [&str; 10] = [
    "config",
    "drain",
    "store",
    "rateLimit",
    "circuits",
    "bulkheads",
    "idempotency",
    "jobs",
    "cache",
    "metrics",
];

/// The readable view: sections in a fixed order (then any others), nested keys flattened to
/// `a.b.c: value`, long lists cut with a count.
pub fn render(snapshot: &Value) -> String {
    let mut out = String::new();
    let Some(obj) = snapshot.as_object() else {
        return format!("{snapshot}\n");
    };
    let mut keys: Vec<&String> = ORDER
        .iter()
        .filter_map(|k| obj.get_key_value(*k).map(|(k, _)| k))
        .collect();
    keys.extend(obj.keys().filter(|k| !ORDER.contains(&k.as_str())));
    for k in keys {
        out.push_str(&format!("== {k}\n"));
        let mut lines = Vec::new();
        flatten("", &obj[k], &mut lines);
        if lines.is_empty() {
            out.push_str("   (empty)\n");
        }
        for l in lines {
            out.push_str("   ");
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            let items: Vec<String> = a.iter().take(10).map(scalar).collect();
            let more = if a.len() > 10 {
                format!(" … ({} in all)", a.len())
            } else {
                String::new()
            };
            out.push(format!("{prefix}: [{}]{more}", items.join(", ")));
        }
        Value::Array(a) => {
            if a.is_empty() {
                out.push(format!("{prefix}: []"));
            }
            for (i, x) in a.iter().enumerate().take(20) {
                flatten(&format!("{prefix}[{i}]"), x, out);
            }
            if a.len() > 20 {
                out.push(format!("{prefix}: … {} more", a.len() - 20));
            }
        }
        s => out.push(format!("{prefix}: {}", scalar(s))),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub async fn run(args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    let creds = args.target.creds.resolve()?;
    let http = HttpClient::new(&args.target.url, creds.api_key.clone())?;
    let a = http
        .get_answer("/admin/snapshot", Some(creds.admin_token()?))
        .await?;
    if a.status != 200 {
        bail!("GET /admin/snapshot answered {}: {}", a.status, a.body);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&a.body)?);
    } else {
        print!("{}", render(&a.body));
    }
    let report =
        serde_json::json!({"tool": "snapshot", "url": args.target.url, "snapshot": a.body});
    let path = write_report(&args.out.dir(), "snapshot", None, &report)?;
    eprintln!("report: {}", path.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sections_in_order_and_flattens() {
        let s = serde_json::json!({
            "cache": {"byNamespace": {}},
            "drain": {"state": "active", "sessionsRemaining": 0},
            "config": {"regionTopology": {"region": "local", "instances": ["a", "b"]}},
            "jobs": {"byStatus": {"queued": 2}, "recentDeadLetters": [{"id": "j1"}]}
        });
        let r = render(&s);
        let config = r.find("== config").unwrap();
        let drain = r.find("== drain").unwrap();
        assert!(config < drain);
        assert!(r.contains("regionTopology.instances: [a, b]"), "{r}");
        assert!(r.contains("state: active"), "{r}");
        assert!(r.contains("recentDeadLetters[0].id: j1"), "{r}");
        assert!(r.contains("== cache\n   (empty)"), "{r}");
    }
}
