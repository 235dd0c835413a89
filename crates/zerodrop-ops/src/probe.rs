//! `zerodrop probe`: one synthetic session end to end. Each step depends on the one before,
//! so the probe stops at the first failure and names it.
//!
//! Steps: health → WebSocket session and subscription → SSE subscription → publish (and an
//! idempotent retry) → both receive it → ack → forced disconnect → two more publishes →
//! WebSocket resume replays exactly those, in order → SSE reconnect with `Last-Event-ID`
//! does the same → HTTP checkpoint `applied` → a stale checkpoint `ignored` → HTTP reconnect
//! → the log reads back contiguous.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde::Serialize;
use zerodrop_client::{
    HttpClient, ServerFrame, SseAuth, SseConnection, SseMessage, SseOptions, WsAuth, WsConnection,
};

use crate::common::{OutArgs, TargetArgs, now_ms, run_id, write_report};

#[derive(Args, Clone, Debug)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Longest wait for any one answer or delivery, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub step_timeout: f64,
    #[command(flatten)]
    pub out: OutArgs,
}

#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub name: String,
    pub ok: bool,
    pub ms: f64,
    pub detail: String,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ProbeReport {
    pub tool: &'static str,
    pub url: String,
    pub started_at_ms: u64,
    pub ok: bool,
    pub failed_step: Option<String>,
    pub steps: Vec<Step>,
}

struct Probe {
    steps: Vec<Step>,
    timeout: Duration,
}

impl Probe {
    async fn step<T>(
        &mut self,
        name: &str,
        f: impl std::future::Future<Output = anyhow::Result<(T, String)>>,
    ) -> anyhow::Result<T> {
        let t = Instant::now();
        let r = match tokio::time::timeout(self.timeout * 2, f).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("timed out after {:?}", self.timeout * 2)),
        };
        let ms = (t.elapsed().as_secs_f64() * 1e5).round() / 100.0;
        match r {
            Ok((v, detail)) => {
                println!("  ok    {name:<28} {ms:>8.2} ms  {detail}");
                self.steps.push(Step {
                    name: name.into(),
                    ok: true,
                    ms,
                    detail,
                });
                Ok(v)
            }
            Err(e) => {
                let detail = format!("{e:#}");
                println!("  FAIL  {name:<28} {ms:>8.2} ms  {detail}");
                self.steps.push(Step {
                    name: name.into(),
                    ok: false,
                    ms,
                    detail,
                });
                Err(e)
            }
        }
    }
}

/// Next event from the WebSocket, skipping other frames; fails on an error frame.
async fn ws_event(
    c: &mut WsConnection,
    timeout: Duration,
) -> anyhow::Result<zerodrop_client::Event> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let f = tokio::time::timeout_at(deadline, c.recv())
            .await
            .context("no event within the step timeout")??;
        match f {
            ServerFrame::Event(e) => return Ok(e),
            ServerFrame::Error(e) => bail!("error frame {}: {}", e.code, e.message),
            _ => continue,
        }
    }
}

async fn sse_event(
    c: &mut SseConnection,
    timeout: Duration,
) -> anyhow::Result<zerodrop_client::Event> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let m = tokio::time::timeout_at(deadline, c.next())
            .await
            .context("no SSE event within the step timeout")??;
        match m {
            SseMessage::Event { event, .. } => return Ok(event),
            SseMessage::Reset { reset, .. } => bail!("SSE reset {}", reset.code),
            _ => continue,
        }
    }
}

/// Waits `grace` for anything more on the WebSocket; an event is an unwanted duplicate.
async fn ws_quiet(c: &mut WsConnection, grace: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        match tokio::time::timeout_at(deadline, c.recv()).await {
            Err(_) => return Ok(()),
            Ok(Ok(ServerFrame::Event(e))) => {
                bail!("unexpected extra event seq {} (duplicate?)", e.seq)
            }
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => bail!("connection failed while idle: {e}"),
        }
    }
}

pub async fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let url = args.target.url.clone();
    println!("probe {url}");
    let started_at_ms = now_ms();
    let mut p = Probe {
        steps: Vec::new(),
        timeout: Duration::from_secs_f64(args.step_timeout.max(0.1)),
    };
    let result = probe(&args, &mut p).await;
    let failed_step = p.steps.iter().find(|s| !s.ok).map(|s| s.name.clone());
    let failed_step = match (&result, failed_step) {
        (Err(e), None) => {
            println!("  FAIL  setup: {e:#}");
            p.steps.push(Step {
                name: "setup".into(),
                ok: false,
                ms: 0.0,
                detail: format!("{e:#}"),
            });
            Some("setup".to_string())
        }
        (_, f) => f,
    };
    let report = ProbeReport {
        tool: "probe",
        url,
        started_at_ms,
        ok: result.is_ok(),
        failed_step: failed_step.clone(),
        steps: p.steps,
    };
    let path = write_report(&args.out.dir(), "probe", None, &report)?;
    match failed_step {
        None => println!(
            "probe passed ({} steps); report: {}",
            report.steps.len(),
            path.display()
        ),
        Some(s) => println!("probe FAILED at step `{s}`; report: {}", path.display()),
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn probe(args: &ProbeArgs, p: &mut Probe) -> anyhow::Result<()> {
    let creds = args.target.creds.resolve()?;
    let url = args.target.url.as_str();
    let http = HttpClient::with_timeout(url, Some(creds.api_key()?.to_string()), p.timeout)?;
    let secret = creds.jwt_secret()?.to_string();
    let run = run_id();
    let stream = format!("probe:{run}");
    let to = p.timeout;

    p.step("health", async {
        let a = http.get_answer("/health", None).await?;
        ensure!(
            a.status == 200,
            "GET /health answered {}: {}",
            a.status,
            a.body
        );
        Ok((
            (),
            format!(
                "status {}",
                a.body.get("status").and_then(|s| s.as_str()).unwrap_or("?")
            ),
        ))
    })
    .await?;

    let token = zerodrop_client::mint_connect_token(
        &secret,
        &format!("probe-{run}"),
        std::slice::from_ref(&stream),
        None,
        Duration::from_secs(600),
    )?;

    let mut ws = p
        .step("ws connect + subscribe", async {
            let mut c = WsConnection::connect(url, WsAuth::Token(token.clone()), to).await?;
            c.subscribe(&stream, Some(0), None).await?;
            let (epoch, head, _) = tokio::time::timeout(to, c.await_subscribed(&stream, |_| {}))
                .await
                .context("no `subscribed` frame")??;
            ensure!(head == 0, "a fresh stream has head {head}");
            let d = format!("session {} epoch {epoch}", c.session_id());
            Ok((c, d))
        })
        .await?;
    let session_id = ws.session_id().to_string();

    let mut sse = p
        .step("sse connect", async {
            let c = SseConnection::connect(
                &http,
                &stream,
                &SseAuth::Token(token.clone()),
                &SseOptions {
                    after: Some(0),
                    last_event_id: None,
                },
            )
            .await?;
            Ok((c, String::new()))
        })
        .await?;

    let first = p
        .step("publish", async {
            let r = http
                .publish(&stream, r#"{"probe":1}"#, Some(&format!("probe-{run}-1")))
                .await?;
            ensure!(
                r.seq == 1 && !r.duplicate,
                "first publish answered seq {} duplicate {}",
                r.seq,
                r.duplicate
            );
            Ok((r.clone(), format!("seq {} epoch {}", r.seq, r.epoch)))
        })
        .await?;
    let epoch = first.epoch.clone();

    p.step("idempotent retry", async {
        let r = http
            .publish(&stream, r#"{"probe":1}"#, Some(&format!("probe-{run}-1")))
            .await?;
        ensure!(
            r.duplicate && r.seq == 1,
            "a retry with the same Idempotency-Key answered seq {} duplicate {}",
            r.seq,
            r.duplicate
        );
        Ok(((), "duplicate: true, same seq".into()))
    })
    .await?;

    p.step("ws receive", async {
        let e = ws_event(&mut ws, to).await?;
        ensure!(
            e.seq == 1 && e.epoch == epoch,
            "got seq {} epoch {} instead of 1 / {epoch}",
            e.seq,
            e.epoch
        );
        ensure!(
            e.data.get().replace(' ', "") == r#"{"probe":1}"#,
            "payload changed: {}",
            e.data.get()
        );
        ws.ack(&stream, 1).await?;
        ws_quiet(&mut ws, Duration::from_millis(200)).await?;
        Ok(((), "seq 1, acked".into()))
    })
    .await?;

    p.step("sse receive", async {
        let e = sse_event(&mut sse, to).await?;
        ensure!(e.seq == 1, "got seq {} instead of 1", e.seq);
        let id = sse.last_event_id().unwrap_or_default().to_string();
        ensure!(
            id == format!("{epoch}:1"),
            "SSE id {id:?} is not <epoch>:<seq>"
        );
        Ok(((), format!("id {id}")))
    })
    .await?;

    // Forced disconnect: both transports drop, two events are published meanwhile.
    let resume_token = ws.resume_token().to_string();
    ws.abort();
    drop(sse);
    p.step("publish while disconnected", async {
        for n in 2..=3u64 {
            let r = http
                .publish(
                    &stream,
                    &format!("{{\"probe\":{n}}}"),
                    Some(&format!("probe-{run}-{n}")),
                )
                .await?;
            ensure!(r.seq == n, "publish {n} got seq {}", r.seq);
        }
        Ok(((), "seq 2, 3".into()))
    })
    .await?;

    let ws = p
        .step("ws resume", async {
            let last_ack = [(stream.clone(), 1u64)].into_iter().collect();
            let mut c = WsConnection::connect(
                url,
                WsAuth::Resume {
                    resume_token: resume_token.clone(),
                    last_ack,
                    token: None,
                    presence: Default::default(),
                },
                to,
            )
            .await?;
            ensure!(
                c.session_id() == session_id,
                "resume opened session {} instead of {session_id}",
                c.session_id()
            );
            let mut early = Vec::new();
            tokio::time::timeout(to, c.await_subscribed(&stream, |f| early.push(f)))
                .await
                .context("no `subscribed` after resume")??;
            let mut got: Vec<u64> = early
                .into_iter()
                .filter_map(|f| match f {
                    ServerFrame::Event(e) => Some(e.seq),
                    _ => None,
                })
                .collect();
            while got.len() < 2 {
                got.push(ws_event(&mut c, to).await?.seq);
            }
            ensure!(got == [2, 3], "replay delivered {got:?} instead of [2, 3]");
            ws_quiet(&mut c, Duration::from_millis(300)).await?;
            Ok((c, "same session, replayed [2, 3]".into()))
        })
        .await?;

    p.step("sse resume (Last-Event-ID)", async {
        let mut c = SseConnection::connect(
            &http,
            &stream,
            &SseAuth::Token(token.clone()),
            &SseOptions {
                last_event_id: Some(format!("{epoch}:1")),
                after: None,
            },
        )
        .await?;
        let a = sse_event(&mut c, to).await?.seq;
        let b = sse_event(&mut c, to).await?.seq;
        ensure!((a, b) == (2, 3), "SSE replayed {a}, {b} instead of 2, 3");
        Ok(((), "replayed 2, 3".into()))
    })
    .await?;

    let token_now = ws.resume_token().to_string();
    p.step("checkpoint", async {
        let c = http.checkpoint(&session_id, &token_now, &stream, 3).await?;
        ensure!(
            c.ack_update == "applied" && c.last_ack_sequence == 3,
            "checkpoint 3 answered {} / {}",
            c.ack_update,
            c.last_ack_sequence
        );
        Ok(((), "applied, lastAckSequence 3".into()))
    })
    .await?;

    p.step("stale checkpoint ignored", async {
        let c = http.checkpoint(&session_id, &token_now, &stream, 2).await?;
        ensure!(
            c.ack_update == "ignored" && c.last_ack_sequence == 3,
            "stale checkpoint 2 answered {} / {} (must be ignored / 3)",
            c.ack_update,
            c.last_ack_sequence
        );
        Ok(((), "ignored, lastAckSequence stays 3".into()))
    })
    .await?;

    p.step("http reconnect", async {
        let r = http.reconnect(&session_id, &token_now, None).await?;
        ensure!(
            r.session_id == session_id,
            "reconnect answered session {}",
            r.session_id
        );
        let w = r
            .replay
            .get(&stream)
            .context("no replay window for the stream")?;
        if let Some(e) = &w.error {
            bail!("replay window error {}: {}", e.code, e.message);
        }
        ensure!(
            w.events.is_empty(),
            "replay after ack 3 holds {} events",
            w.events.len()
        );
        Ok(((), "empty window after ack 3".into()))
    })
    .await?;

    p.step("log read back", async {
        let page = http.read_events(&stream, 0, 100, None).await?;
        let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
        ensure!(
            seqs == [1, 2, 3] && page.head_seq == 3,
            "log holds {seqs:?} head {}",
            page.head_seq
        );
        Ok(((), "[1, 2, 3]".into()))
    })
    .await?;
    ws.close().await;
    Ok(())
}
