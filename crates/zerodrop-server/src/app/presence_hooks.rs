//! Occupancy webhooks (SPEC §10): every transition of a stream's presence — `stream.occupied`
//! (a join to one member), `member.joined`, `member.left`, `stream.vacated` (a leave to none)
//! — delivered once, in order per stream, to the upstream whose `presence` patterns name the
//! stream, through the durable job queue (§7).
//!
//! The presence log is the outbox. Each stream has a webhook cursor in the store (the last
//! presence seq whose transitions are delivered). Every instance pumps: for a stream with
//! entries after its cursor, it enqueues the next transition with the idempotency key
//! `presence:<stream>:<epoch>:<seq>:<type>` as the job's dedupe key (and the delivery's
//! `Idempotency-Key`), and goes on to the following one only once that job is done (or a
//! dead letter), moving the cursor past an entry when all its transitions are. So a stream
//! has at most one transition in the queue at a time (in order), two instances pumping the
//! same stream enqueue the same job (the dedupe key), and an instance killed after enqueuing
//! leaves a durable job that any worker delivers and a cursor that any instance moves on.
//!
//! Must not: deliver anything itself (the job worker does), or hold a lock across a call.

use serde_json::json;
use zerodrop_core::{Epoch, StreamId};
use zerodrop_store::{JobStatus, PresenceAction, PresenceEntry, QosClass};

use super::App;
use super::presence::presence_frame;
use crate::error::ApiError;

/// Presence entries read per stream and round.
const READ: usize = 32;

/// The webhooks one entry stands for, in delivery order.
fn transitions(e: &PresenceEntry) -> Vec<&'static str> {
    match e.action {
        PresenceAction::Join if e.occupancy == 1 => vec!["stream.occupied", "member.joined"],
        PresenceAction::Join => vec!["member.joined"],
        PresenceAction::Leave if e.occupancy == 0 => vec!["member.left", "stream.vacated"],
        PresenceAction::Leave => vec!["member.left"],
    }
}

impl App {
    /// Whether any upstream takes occupancy webhooks.
    pub fn presence_hooks_on(&self) -> bool {
        self.guard
            .upstreams
            .values()
            .any(|u| !u.cfg.presence.is_empty())
    }

    /// The upstream for `stream`'s occupancy webhooks (the first by name whose patterns match)
    /// and the class of its deliveries.
    fn presence_upstream(&self, stream: &StreamId) -> Option<(String, QosClass)> {
        self.guard.upstreams.iter().find_map(|(name, u)| {
            u.cfg
                .presence
                .iter()
                .any(|p| zerodrop_core::grant::pattern_matches(p, stream.as_str()))
                .then(|| (name.clone(), u.cfg.class.0))
        })
    }

    /// One round over every stream with transitions not yet delivered.
    pub async fn presence_pump(&self) {
        let pending = match self.store.presence().presence_unhooked().await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "presence webhooks: pending streams not read");
                return;
            }
        };
        for (stream, epoch, cursor) in pending {
            if let Err(e) = self.pump_stream(&stream, &epoch, cursor).await {
                tracing::debug!(error = %e.message, stream = %stream, "presence webhooks: will go on next round");
            }
        }
    }

    async fn pump_stream(
        &self,
        stream: &StreamId,
        epoch: &Epoch,
        cursor: u64,
    ) -> Result<(), ApiError> {
        let presence = self.store.presence();
        let log = self.presence_read(stream, cursor, READ).await?;
        if log.epoch != *epoch {
            return Ok(());
        }
        let Some((upstream, class)) = self.presence_upstream(stream) else {
            // No upstream wants this stream's transitions: nothing to deliver.
            return Ok(presence.presence_hooked(stream, epoch, log.head).await?);
        };
        if log.first > cursor + 1 {
            tracing::warn!(
                stream = %stream,
                from = cursor + 1,
                to = log.first - 1,
                "presence webhooks: entries trimmed before their webhooks were queued; skipped"
            );
        }
        for e in &log.entries {
            for t in transitions(e) {
                let key = format!("presence:{stream}:{epoch}:{}:{t}", e.seq);
                let payload = json!({
                    "type": t,
                    "stream": stream.as_str(),
                    "epoch": epoch.as_str(),
                    "seq": e.seq,
                    "member": presence_frame(e).member,
                    "occupancy": e.occupancy,
                    "idempotencyKey": key,
                });
                let job = self
                    .enqueue_job(
                        "presence".into(),
                        class,
                        &upstream,
                        payload.to_string(),
                        Some(key),
                    )
                    .await?;
                let status = self
                    .guard_store()
                    .job_get(job.id())
                    .await?
                    .map(|j| j.status);
                if !matches!(status, Some(JobStatus::Done | JobStatus::Dead)) {
                    // In order: the next transition waits for this one.
                    return Ok(());
                }
            }
            presence.presence_hooked(stream, epoch, e.seq).await?;
        }
        Ok(())
    }
}
