//! `zerodrop verify`: do several instances serve the same log of one stream?
//!
//! Each instance's `GET /v1/streams/{stream}` is compared with the first's (`--url`):
//! `epoch`, `firstSeq`, `headSeq`, `count` and `hash` must all agree. Instances on one Redis
//! serve one log and agree; separate logs differ at least in `epoch` and `hash` (events carry
//! the server's `ts` and `epoch`). `--recompute` also reads every retained event of every
//! instance and checks its `hash` against the chain computed here, which catches an instance
//! whose digest does not describe what it serves.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use zerodrop_client::consistency::{StreamCheck, Verdict, check_stream};
use zerodrop_client::{HttpClient, StreamInfo};

use crate::common::{OutArgs, TargetArgs, say, write_report};

/// Reads of a moving stream before `--recompute` gives up on it.
const ATTEMPTS: u32 = 5;

#[derive(Args, Clone, Debug)]
pub struct VerifyArgs {
    /// The reference instance is `--url`; `--peer` adds one more to compare with it
    /// (repeatable). All use the same API key.
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(long = "peer", value_name = "URL")]
    pub peers: Vec<String>,
    /// The stream to compare.
    #[arg(long)]
    pub stream: String,
    /// Also check each instance's hash against the chain over the events it serves.
    #[arg(long)]
    pub recompute: bool,
    #[command(flatten)]
    pub out: OutArgs,
}

/// One instance's view of the stream.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceView {
    pub url: String,
    pub epoch: String,
    pub first_seq: u64,
    pub head_seq: u64,
    pub count: u64,
    pub hash: String,
    /// With `--recompute`: the chain over the served events, and whether it matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub computed_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub computed_count: Option<u64>,
    /// What differs from the reference instance (or from its own events); empty when
    /// consistent.
    pub differences: Vec<String>,
}

impl InstanceView {
    fn of(url: &str, info: &StreamInfo) -> InstanceView {
        InstanceView {
            url: url.to_string(),
            epoch: info.epoch.clone(),
            first_seq: info.first_seq,
            head_seq: info.head_seq,
            count: info.count,
            hash: info.hash.clone(),
            computed_hash: None,
            computed_count: None,
            differences: Vec::new(),
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    pub tool: &'static str,
    pub stream: String,
    pub recompute: bool,
    pub consistent: bool,
    pub instances: Vec<InstanceView>,
}

/// Fills in each view's `differences` against the first (the reference) and returns whether
/// every instance is consistent.
pub fn compare(views: &mut [InstanceView]) -> bool {
    let Some(reference) = views.first().cloned() else {
        return true;
    };
    for v in views.iter_mut().skip(1) {
        let mut d = Vec::new();
        if v.epoch != reference.epoch {
            d.push(format!("epoch {} ≠ {}", v.epoch, reference.epoch));
        }
        if v.first_seq != reference.first_seq {
            d.push(format!(
                "firstSeq {} ≠ {}",
                v.first_seq, reference.first_seq
            ));
        }
        if v.head_seq != reference.head_seq {
            d.push(format!("headSeq {} ≠ {}", v.head_seq, reference.head_seq));
        }
        if v.count != reference.count {
            d.push(format!("count {} ≠ {}", v.count, reference.count));
        }
        if v.hash != reference.hash {
            d.push(format!("hash {} ≠ {}", v.hash, reference.hash));
        }
        v.differences
            .extend(d.into_iter().map(|x| format!("{x} (of {})", reference.url)));
    }
    views.iter().all(|v| v.differences.is_empty())
}

fn recomputed(view: &mut InstanceView, check: &StreamCheck) {
    match &check.verdict {
        Verdict::Consistent { count, hash } => {
            view.computed_hash = Some(hash.clone());
            view.computed_count = Some(*count);
        }
        Verdict::Diverged {
            server_hash,
            computed_hash,
            server_count,
            computed_count,
        } => {
            view.computed_hash = Some(computed_hash.clone());
            view.computed_count = Some(*computed_count);
            view.differences.push(format!(
                "served hash {server_hash} (count {server_count}) ≠ chain over its events \
                 {computed_hash} (count {computed_count})"
            ));
        }
    }
}

pub async fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let creds = args.target.creds.resolve()?;
    let api_key = creds.api_key()?.to_string();
    let urls: Vec<&str> = std::iter::once(args.target.url.as_str())
        .chain(args.peers.iter().map(String::as_str))
        .collect();
    let mut views = Vec::with_capacity(urls.len());
    for url in &urls {
        let http = HttpClient::new(url, Some(api_key.clone()))?;
        let view = if args.recompute {
            // The check's info is the one its events were read against.
            let check = check_stream(&http, &args.stream, ATTEMPTS)
                .await
                .with_context(|| format!("checking {} on {url}", args.stream))?;
            let mut v = InstanceView::of(url, &check.info);
            recomputed(&mut v, &check);
            v
        } else {
            let info = http
                .stream_info(&args.stream)
                .await
                .with_context(|| format!("reading {} on {url}", args.stream))?;
            InstanceView::of(url, &info)
        };
        views.push(view);
    }
    let consistent = compare(&mut views);
    for v in &views {
        let state = if v.differences.is_empty() {
            "consistent"
        } else {
            "DIVERGED"
        };
        let chain = match (&v.computed_hash, v.computed_count) {
            (Some(h), Some(n)) if *h == v.hash && n == v.count => " recomputed=match",
            (Some(_), _) => " recomputed=MISMATCH",
            _ => "",
        };
        say(format!(
            "{} epoch={} firstSeq={} headSeq={} count={} hash={}{chain} {state}",
            v.url, v.epoch, v.first_seq, v.head_seq, v.count, v.hash
        ));
        for d in &v.differences {
            say(format!("    {d}"));
        }
    }
    let report = VerifyReport {
        tool: "verify",
        stream: args.stream.clone(),
        recompute: args.recompute,
        consistent,
        instances: views,
    };
    let path = write_report(&args.out.dir(), "verify", None, &report)?;
    if consistent {
        say(format!(
            "verify: {} consistent on {} instance(s); report {}",
            args.stream,
            urls.len(),
            path.display()
        ));
        Ok(ExitCode::SUCCESS)
    } else {
        say(format!(
            "verify: {} DIVERGED; report {}",
            args.stream,
            path.display()
        ));
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(url: &str, epoch: &str, head: u64, hash: &str) -> InstanceView {
        InstanceView {
            url: url.into(),
            epoch: epoch.into(),
            first_seq: 1,
            head_seq: head,
            count: head,
            hash: hash.into(),
            computed_hash: None,
            computed_count: None,
            differences: Vec::new(),
        }
    }

    #[test]
    fn instances_are_compared_with_the_first_field_by_field() {
        let mut same = vec![view("a", "e1", 3, "h"), view("b", "e1", 3, "h")];
        assert!(compare(&mut same));
        assert!(same.iter().all(|v| v.differences.is_empty()));

        let mut differ = vec![
            view("a", "e1", 3, "h"),
            view("b", "e1", 3, "h"),
            view("c", "e2", 4, "x"),
        ];
        assert!(!compare(&mut differ));
        assert!(differ[0].differences.is_empty() && differ[1].differences.is_empty());
        assert_eq!(
            differ[2].differences,
            [
                "epoch e2 ≠ e1 (of a)",
                "headSeq 4 ≠ 3 (of a)",
                "count 4 ≠ 3 (of a)",
                "hash x ≠ h (of a)"
            ]
        );
        assert!(compare(&mut []));
    }

    #[test]
    fn a_recomputed_divergence_is_named() {
        let mut v = view("a", "e1", 2, "h");
        let info = StreamInfo {
            stream: "s".into(),
            epoch: "e1".into(),
            head_seq: 2,
            first_seq: 1,
            count: 2,
            bytes: 0,
            hash: "h".into(),
        };
        let check = StreamCheck {
            info,
            verdict: Verdict::Diverged {
                server_hash: "h".into(),
                computed_hash: "c".into(),
                server_count: 2,
                computed_count: 1,
            },
        };
        recomputed(&mut v, &check);
        assert_eq!(v.computed_hash.as_deref(), Some("c"));
        assert_eq!(
            v.differences,
            ["served hash h (count 2) ≠ chain over its events c (count 1)"]
        );
        let mut views = vec![v];
        assert!(
            !compare(&mut views),
            "a lone instance can diverge from itself"
        );
    }
}
