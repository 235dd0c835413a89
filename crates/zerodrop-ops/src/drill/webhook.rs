//! The `webhook` scenario: the drill as a webhook provider. Senders post message ids to
//! `POST /v1/webhooks/{source}` (the id in the `Idempotency-Key` header and at `/id` of the
//! body), send some of them again — after the first answer, or at the same moment as the
//! first — and retry 429, 503, 409, 5xx and network failures with the same id and body,
//! honouring `Retry-After`, as a provider does. Afterwards the source's stream is read back:
//! every accepted id must be there exactly once, where its answer said (nothing dropped,
//! nothing run twice), and every second copy must have been answered as a counted duplicate
//! of the first.
//!
//! The stream is the source's (configured on the server, shared by every run), so the run
//! first sends one webhook alone: its answer names the stream and the seq from which the
//! run's ids can appear, and a 404 says the source is not configured (the scenario is then
//! reported as not run).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;
use zerodrop_client::{ClientError, HttpClient, WebhookAccepted};

use super::engine::{Ctx, Pacer, TaskStats};
use crate::report::{LogCheck, NotRun, WebhookStats};

/// Attempts per copy of a webhook before the sender gives up on it (as a provider would).
const MAX_TRIES: u32 = 20;
/// The longest `Retry-After` honoured as given; longer ones are cut to this, so one answer
/// cannot stall a drill.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Preflight attempts (each with a fresh id) while the server answers 429, 503 or nothing.
const PREFLIGHT_TRIES: u32 = 10;

/// One message id the drill sent, and every 202 it got for it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sent {
    pub id: String,
    /// Copies sent: 1, or 2 when a duplicate was sent too.
    pub copies: u32,
    pub dup: Option<DupKind>,
    pub answers: Vec<Answered>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DupKind {
    /// Sent again after the first copy's answer.
    Sequential,
    /// Sent at the same moment as the first copy.
    Concurrent,
}

/// What one 202 said.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Answered {
    pub duplicate: bool,
    pub hit_count: u64,
    pub stream: Option<String>,
    pub seq: Option<u64>,
}

impl From<&WebhookAccepted> for Answered {
    fn from(a: &WebhookAccepted) -> Answered {
        Answered {
            duplicate: a.duplicate,
            hit_count: a.hit_count,
            stream: a.stream.clone(),
            seq: a.seq,
        }
    }
}

/// Which copies of the `c`-th webhook a sender duplicates, and how: 3 in 10, two of them
/// after the answer, one at the same time (the first duplicate comes with the second
/// webhook, so even a short run measures the dedupe).
fn dup_kind(c: u64) -> Option<DupKind> {
    match c % 10 {
        2 | 8 => Some(DupKind::Sequential),
        5 => Some(DupKind::Concurrent),
        _ => None,
    }
}

/// The ids of one run: `drill-<run>-…`, so runs sharing a stream never mix.
pub fn id_prefix(run: &str) -> String {
    format!("drill-{run}-")
}

fn body(id: &str, w: u32, c: u64, t: u64, pad: &str) -> String {
    // The id is made of the run id and numbers: no JSON escaping needed.
    format!("{{\"id\":\"{id}\",\"w\":{w},\"c\":{c},\"t\":{t},\"p\":\"{pad}\"}}")
}

/// The attempts of one copy: each answer's status (with its latency when it was a 202) or a
/// network failure, and the 202 it ended with, if any.
#[derive(Default)]
struct Delivery {
    attempts: Vec<Result<(u16, Option<u64>), ()>>,
    accepted: Option<WebhookAccepted>,
    /// The last refusal, when it was not retried (or retries ran out).
    error: Option<ClientError>,
}

impl Delivery {
    fn merge_into(&self, st: &mut TaskStats) {
        for a in &self.attempts {
            st.attempts += 1;
            match a {
                Ok((status, latency)) => {
                    *st.statuses.entry(*status).or_default() += 1;
                    if let Some(us) = latency {
                        let _ = st.publish_latency_us.record((*us).max(1));
                    }
                }
                Err(()) => st.network_errors += 1,
            }
        }
    }
}

fn retryable(e: &ClientError) -> bool {
    e.is_network() || matches!(e.status(), Some(409 | 429 | 500 | 502 | 503 | 504))
}

/// Sends one copy until it is answered 202, refused for good, out of tries or past
/// `deadline`.
async fn deliver(
    http: &HttpClient,
    source: &str,
    id: &str,
    body: &str,
    tries: u32,
    deadline: Instant,
) -> Delivery {
    let mut d = Delivery::default();
    for n in 1..=tries {
        let sent = Instant::now();
        match http.webhook(source, body, Some(id)).await {
            Ok(a) => {
                d.attempts
                    .push(Ok((202, Some(sent.elapsed().as_micros() as u64))));
                d.accepted = Some(a);
                return d;
            }
            Err(e) => {
                d.attempts.push(e.status().map(|s| (s, None)).ok_or(()));
                let again = retryable(&e) && n < tries && Instant::now() < deadline;
                let wait = match &e {
                    ClientError::Http {
                        retry_after: Some(ra),
                        ..
                    } => (*ra).min(MAX_RETRY_AFTER),
                    _ => Duration::from_millis((50 * n as u64).min(500)),
                };
                d.error = Some(e);
                if !again {
                    break;
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
    d
}

/// Where the run's webhooks go, or why the scenario cannot run.
pub struct Prepared {
    /// The preflight's attempts and its one message id.
    pub stats: TaskStats,
    pub outcome: Result<Target, NotRun>,
}

pub struct Target {
    pub stream: String,
    /// The preflight webhook's seq: no id of this run can be appended before it.
    pub from_seq: u64,
    pub scope: String,
}

/// Sends the run's first webhook alone (a fresh id per attempt, so an attempt whose answer
/// was lost cannot have appended after the seq the accepted one names).
pub async fn preflight(http: &HttpClient, source: &str, run: &str, requested: bool) -> Prepared {
    let mut stats = TaskStats::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    let config = format!(
        "[webhooks.{source}] with stream = \"drill:webhooks\" to its config file (or set ZERODROP_WEBHOOK_{}_STREAM=drill:webhooks)",
        source.to_ascii_uppercase().replace('-', "_")
    );
    let mut last = String::new();
    for k in 0..PREFLIGHT_TRIES {
        let id = format!("{}preflight-{k}", id_prefix(run));
        let d = deliver(
            http,
            source,
            &id,
            &body(&id, u32::MAX, k as u64, 0, ""),
            1,
            deadline,
        )
        .await;
        d.merge_into(&mut stats);
        if let Some(a) = &d.accepted {
            stats.webhooks.push(Sent {
                id,
                copies: 1,
                dup: None,
                answers: vec![Answered::from(a)],
            });
            let outcome = match (&a.stream, a.seq) {
                (Some(s), Some(seq)) => Ok(Target {
                    stream: s.clone(),
                    from_seq: seq,
                    scope: a.scope.clone(),
                }),
                _ => Err(NotRun {
                    reason: format!(
                        "webhook source `{source}` appends to no stream, so what it accepts cannot be read back: add stream = \"drill:webhooks\" to [webhooks.{source}] in the server's config file"
                    ),
                    required: requested,
                }),
            };
            return Prepared { stats, outcome };
        }
        let Some(e) = d.error else { break };
        if e.status() == Some(404) {
            return Prepared {
                stats,
                outcome: Err(NotRun {
                    reason: format!(
                        "the server has no webhook source `{source}` (POST /v1/webhooks/{source} answered 404 {}): add {config}, or name another source with --webhook-source",
                        e.code().filter(|c| !c.is_empty()).unwrap_or("NOT_FOUND")
                    ),
                    required: requested,
                }),
            };
        }
        last = e.to_string();
        if !retryable(&e) || Instant::now() >= deadline {
            break;
        }
        let wait = match &e {
            ClientError::Http {
                retry_after: Some(ra),
                ..
            } => (*ra).min(MAX_RETRY_AFTER),
            _ => Duration::from_millis(200 * (k as u64 + 1)),
        };
        tokio::time::sleep(wait).await;
    }
    // The source may exist and fail: that is no unconfigured feature but a breach.
    Prepared {
        stats,
        outcome: Err(NotRun {
            reason: format!("the first webhook to source `{source}` was never accepted: {last}"),
            required: true,
        }),
    }
}

/// Webhooks one paced sender keeps in flight at most (a provider delivers concurrently; a
/// concurrent duplicate answered 409 waits out its `Retry-After` without stalling the pace).
/// Unpaced (`--rate max`), one at a time.
const IN_FLIGHT: usize = 8;

/// One webhook sender: paced at `rate` webhooks/s, each a new message id, some sent twice.
pub async fn sender(ctx: Arc<Ctx>, w: u32, source: Arc<str>, rate: Option<f64>) -> TaskStats {
    let mut st = TaskStats::default();
    let mut pacer = Pacer::new(rate);
    let cap = if rate.is_some() { IN_FLIGHT } else { 1 };
    let mut in_flight = tokio::task::JoinSet::new();
    let mut c: u64 = 0;
    let prefix = id_prefix(&ctx.run);
    let collect = |st: &mut TaskStats, done: Result<(Sent, Vec<Delivery>), _>| {
        if let Ok((mut sent, deliveries)) = done {
            for d in &deliveries {
                d.merge_into(st);
                sent.answers.extend(d.accepted.as_ref().map(Answered::from));
            }
            if !sent.answers.is_empty() {
                ctx.published.fetch_add(1, Ordering::Relaxed);
            }
            st.webhooks.push(sent);
        }
    };
    while pacer.ready(&ctx).await {
        while in_flight.len() >= cap {
            match in_flight.join_next().await {
                Some(done) => collect(&mut st, done),
                None => break,
            }
        }
        c += 1;
        let id = format!("{prefix}{w}-{c}");
        let b = body(&id, w, c, ctx.now_ns(), &ctx.pad);
        let (ctx, source) = (ctx.clone(), source.clone());
        in_flight.spawn(async move {
            let dup = dup_kind(c);
            let go = |tries| deliver(&ctx.http, &source, &id, &b, tries, ctx.hard_deadline);
            let mut copies = 1;
            let mut deliveries = Vec::new();
            match dup {
                Some(DupKind::Concurrent) => {
                    copies = 2;
                    let (x, y) = tokio::join!(go(MAX_TRIES), go(MAX_TRIES));
                    deliveries.extend([x, y]);
                }
                Some(DupKind::Sequential) => {
                    let first = go(MAX_TRIES).await;
                    // A provider re-sends what it already got an answer for (a redelivery).
                    let again = first.accepted.is_some();
                    deliveries.push(first);
                    if again {
                        copies = 2;
                        deliveries.push(go(MAX_TRIES).await);
                    }
                }
                None => deliveries.push(go(MAX_TRIES).await),
            }
            let sent = Sent {
                id: id.clone(),
                copies,
                dup,
                answers: Vec::new(),
            };
            (sent, deliveries)
        });
    }
    while let Some(done) = in_flight.join_next().await {
        collect(&mut st, done);
    }
    st
}

/// The run's part of the stream as read back: `(seq, message id)` of every event after the
/// preflight's seq − 1 (an event whose body has no string `/id` has `None`).
#[derive(Debug, Default)]
pub struct Readback {
    pub events: Vec<(u64, Option<String>)>,
    /// Events below this seq were trimmed by retention before they could be read.
    pub trimmed_below: u64,
    /// Seqs not contiguous in what was read.
    pub holes: u64,
    pub error: Option<String>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: Option<serde_json::Value>,
}

fn message_id(data: &str) -> Option<String> {
    serde_json::from_str::<IdOnly>(data)
        .ok()?
        .id?
        .as_str()
        .map(str::to_string)
}

/// Reads `stream` from `from_seq` to its head (pages of 1,000).
pub async fn read_back(http: &HttpClient, stream: &str, from_seq: u64) -> Readback {
    let mut rb = Readback::default();
    let head = {
        let mut got = None;
        for _ in 0..10 {
            match http.stream_info(stream).await {
                Ok(i) => {
                    got = Some(i.head_seq);
                    break;
                }
                Err(e) => {
                    rb.error = Some(format!("GET /v1/streams/{stream}: {e}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        match got {
            Some(h) => h,
            None => return rb,
        }
    };
    rb.error = None;
    let mut after = from_seq.saturating_sub(1);
    let mut expect = from_seq.max(1);
    let mut failures = 0;
    for _ in 0..100_000 {
        if after >= head {
            break;
        }
        let page = match http.read_events(stream, after, 1000, None).await {
            Ok(p) => p,
            Err(e) if e.code() == Some("REPLAY_WINDOW_TRIMMED") => {
                let first = match &e {
                    ClientError::Http { error, .. } => error.first_available_seq,
                    _ => None,
                };
                match first {
                    Some(f) if f > after + 1 => {
                        rb.trimmed_below = f;
                        after = f - 1;
                        expect = f;
                        continue;
                    }
                    _ => {
                        rb.error = Some(format!("reading {stream} after {after}: {e}"));
                        break;
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if failures > 20 {
                    rb.error = Some(format!("reading {stream} after {after}: {e}"));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if page.events.is_empty() {
            break;
        }
        for e in &page.events {
            if e.seq != expect {
                rb.holes += 1;
            }
            expect = e.seq + 1;
            after = e.seq;
            rb.events.push((e.seq, message_id(e.data.get())));
        }
    }
    rb
}

/// Holds what was sent and answered against what the stream holds. `prefix` picks this
/// run's ids out of a stream other runs share.
pub fn verify(prefix: &str, sent: &[Sent], rb: &Readback) -> (WebhookStats, LogCheck) {
    let mut w = WebhookStats::default();
    let mut in_stream: HashMap<&str, Vec<u64>> = HashMap::new();
    for (seq, id) in &rb.events {
        if let Some(id) = id.as_deref().filter(|i| i.starts_with(prefix)) {
            in_stream.entry(id).or_default().push(*seq);
        }
    }
    let mut answered: HashSet<&str> = HashSet::new();
    for s in sent {
        w.sent += 1;
        w.duplicates_sent += u64::from(s.copies.saturating_sub(1));
        if s.copies > 1 {
            match s.dup {
                Some(DupKind::Sequential) => w.duplicates_sequential += 1,
                Some(DupKind::Concurrent) => w.duplicates_concurrent += 1,
                None => {}
            }
        }
        let Some(first) = s.answers.first() else {
            w.failed += 1;
            continue;
        };
        w.accepted += 1;
        answered.insert(&s.id);
        let new = s.answers.iter().filter(|a| !a.duplicate).count() as u64;
        w.answered_as_new += new.saturating_sub(1);
        for a in &s.answers {
            if a.duplicate {
                w.duplicate_answers += 1;
                if a.hit_count == 0 {
                    w.uncounted_duplicates += 1;
                }
            }
            w.max_hit_count = w.max_hit_count.max(a.hit_count);
            if a.seq != first.seq || a.stream != first.stream {
                w.seq_mismatches += 1;
            }
        }
        match (in_stream.get(s.id.as_str()), first.seq) {
            (None, Some(seq)) if seq < rb.trimmed_below => w.trimmed += 1,
            (None, _) => w.drops += 1,
            (Some(seqs), seq) => {
                if seq.is_none_or(|q| !seqs.contains(&q)) {
                    w.seq_mismatches += 1;
                }
            }
        }
    }
    for (id, seqs) in &in_stream {
        w.doubles += seqs.len() as u64 - 1;
        if !answered.contains(id) {
            w.appended_unacknowledged += 1;
        }
    }
    let log = LogCheck {
        streams: 1,
        events: in_stream.values().map(|v| v.len() as u64).sum(),
        missing: w.drops,
        duplicated: w.doubles,
        seq_holes: rb.holes,
        trimmed: w.trimmed,
    };
    (w, log)
}

/// Reads the target's stream back and verifies the run's webhooks against it.
pub async fn check(
    http: &HttpClient,
    source: &str,
    run: &str,
    target: &Target,
    stats: &[TaskStats],
) -> (WebhookStats, LogCheck) {
    let sent: Vec<Sent> = stats.iter().flat_map(|s| s.webhooks.clone()).collect();
    let rb = read_back(http, &target.stream, target.from_seq).await;
    let (mut w, log) = verify(&id_prefix(run), &sent, &rb);
    w.source = source.to_string();
    w.scope = target.scope.clone();
    w.stream = Some(target.stream.clone());
    w.from_seq = target.from_seq;
    w.retries = stats
        .iter()
        .map(|s| s.attempts)
        .sum::<u64>()
        .saturating_sub(sent.iter().map(|s| u64::from(s.copies)).sum::<u64>());
    w.read_error = rb.error;
    (w, log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(seq: u64, duplicate: bool, hit_count: u64) -> Answered {
        Answered {
            duplicate,
            hit_count,
            stream: Some("drill:webhooks".into()),
            seq: Some(seq),
        }
    }

    fn sent(id: &str, dup: Option<DupKind>, answers: Vec<Answered>) -> Sent {
        Sent {
            id: id.into(),
            copies: if dup.is_some() { 2 } else { 1 },
            dup,
            answers,
        }
    }

    fn stream(events: &[(u64, &str)]) -> Readback {
        Readback {
            events: events
                .iter()
                .map(|(s, id)| (*s, Some(id.to_string())))
                .collect(),
            ..Readback::default()
        }
    }

    /// A clean run: three ids, two of them duplicated, each once in the stream where its
    /// answers say; another run's id and a foreign event in between are ignored.
    fn clean() -> (Vec<Sent>, Readback) {
        let sent = vec![
            sent("drill-r-0-1", None, vec![ok(10, false, 0)]),
            sent(
                "drill-r-0-2",
                Some(DupKind::Sequential),
                vec![ok(11, false, 0), ok(11, true, 1)],
            ),
            sent(
                "drill-r-0-5",
                Some(DupKind::Concurrent),
                vec![ok(13, true, 1), ok(13, false, 0)],
            ),
        ];
        let rb = stream(&[
            (10, "drill-r-0-1"),
            (11, "drill-r-0-2"),
            (12, "drill-other-0-1"),
            (13, "drill-r-0-5"),
        ]);
        (sent, rb)
    }

    #[test]
    fn a_clean_run_has_no_drop_no_double_and_counts_its_duplicates() {
        let (sent, rb) = clean();
        let (w, log) = verify("drill-r-", &sent, &rb);
        assert_eq!((w.sent, w.accepted, w.failed), (3, 3, 0));
        assert_eq!(
            (
                w.duplicates_sent,
                w.duplicates_sequential,
                w.duplicates_concurrent
            ),
            (2, 1, 1)
        );
        assert_eq!((w.duplicate_answers, w.answered_as_new), (2, 0));
        assert_eq!((w.seq_mismatches, w.uncounted_duplicates), (0, 0));
        assert_eq!((w.drops, w.doubles, w.appended_unacknowledged), (0, 0, 0));
        assert_eq!((log.events, log.missing, log.duplicated), (3, 0, 0));
    }

    #[test]
    fn an_id_appended_twice_is_a_double() {
        let (sent, mut rb) = clean();
        rb.events.push((14, Some("drill-r-0-2".into())));
        let (w, log) = verify("drill-r-", &sent, &rb);
        assert_eq!(w.doubles, 1);
        assert_eq!(log.duplicated, 1);
        assert_eq!(w.drops, 0);
        // Even an id whose every answer was lost may run only once.
        let (sent, mut rb) = clean();
        rb.events.push((14, Some("drill-r-1-9".into())));
        rb.events.push((15, Some("drill-r-1-9".into())));
        let (w, _) = verify("drill-r-", &sent, &rb);
        assert_eq!((w.doubles, w.appended_unacknowledged), (1, 1));
    }

    #[test]
    fn an_accepted_id_missing_from_the_stream_is_a_drop_unless_trimmed() {
        let (sent, mut rb) = clean();
        rb.events.remove(0);
        let (w, log) = verify("drill-r-", &sent, &rb);
        assert_eq!((w.drops, log.missing, w.trimmed), (1, 1, 0));
        rb.trimmed_below = 11;
        let (w, log) = verify("drill-r-", &sent, &rb);
        assert_eq!((w.drops, log.missing, w.trimmed, log.trimmed), (0, 0, 1, 1));
        // An id never accepted is no drop.
        let mut sent = sent;
        sent.push(super::tests::sent("drill-r-0-3", None, Vec::new()));
        let (w, _) = verify("drill-r-", &sent, &rb);
        assert_eq!((w.failed, w.drops), (1, 0));
    }

    #[test]
    fn a_duplicate_answered_as_new_or_elsewhere_is_named() {
        let (mut sent, rb) = clean();
        sent[1].answers[1] = ok(11, false, 0);
        sent[2].answers[0] = ok(14, true, 0);
        let (w, _) = verify("drill-r-", &sent, &rb);
        assert_eq!(w.answered_as_new, 1);
        assert_eq!(w.uncounted_duplicates, 1);
        // The second answer of 0-5 names seq 14; the stream holds it at 13 — and its first
        // answer (14) is not where the stream holds it either.
        assert_eq!(w.seq_mismatches, 2);
    }

    #[test]
    fn retries_after_a_lost_answer_are_duplicates_not_errors() {
        // The first copy was appended but its answer was lost; the retry is answered as a
        // duplicate: no new answer at all, still exactly once in the stream.
        let sent = vec![sent("drill-r-0-1", None, vec![ok(10, true, 1)])];
        let (w, _) = verify("drill-r-", &sent, &stream(&[(10, "drill-r-0-1")]));
        assert_eq!((w.answered_as_new, w.drops, w.doubles), (0, 0, 0));
        assert_eq!(w.duplicate_answers, 1);
    }

    #[test]
    fn duplicates_start_early_and_are_three_in_ten() {
        let kinds: Vec<_> = (1..=10).map(dup_kind).collect();
        assert_eq!(kinds[1], Some(DupKind::Sequential));
        assert_eq!(kinds.iter().filter(|k| k.is_some()).count(), 3);
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == Some(DupKind::Concurrent))
                .count(),
            1
        );
    }

    #[test]
    fn message_ids_come_from_the_body() {
        assert_eq!(
            message_id(&body("drill-r-0-1", 0, 1, 5, "xx")).as_deref(),
            Some("drill-r-0-1")
        );
        assert_eq!(message_id(r#"{"id":7}"#), None);
        assert_eq!(message_id("[1]"), None);
    }
}
