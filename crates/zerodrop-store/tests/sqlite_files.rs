//! The SQLite store's files: quarantine of a corrupt file, durability across reopen and
//! crash (the log, the job queue, the idempotency records), files from older versions.

use std::sync::Arc;

use zerodrop_core::{Seq, StreamId};
use zerodrop_store::{
    AppendRequest, Enqueued, Failure, GuardStore, IdemBegin, IdempotencyKey, JobStatus, Lease,
    NewJob, NoSink, QosClass, QueuedCaps, RunningCaps, SqliteOptions, SqliteStore, Store,
};

fn req(stream: &str, i: u64) -> AppendRequest {
    AppendRequest {
        stream: StreamId::new(stream).unwrap(),
        data: i.to_string(),
        idempotency: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_quarantined_even_with_a_leftover_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.db");
    let first = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    first.append(req("s", 1)).await.unwrap();
    let old_epoch = first.epoch().clone();
    // Keep a WAL around by copying it before the store checkpoints on close.
    let wal = std::fs::read(dir.path().join("zerodrop.db-wal")).unwrap();
    first.close();
    std::fs::write(&path, vec![0xAB; 8192]).unwrap();
    std::fs::write(dir.path().join("zerodrop.db-wal"), wal).unwrap();
    let second = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    let moved = second.quarantined().expect("moved aside").to_path_buf();
    assert!(moved.to_string_lossy().contains("zerodrop.db.corrupt-"));
    assert_eq!(std::fs::read(&moved).unwrap(), vec![0xAB; 8192]);
    assert!(std::path::PathBuf::from(format!("{}-wal", moved.display())).exists());
    assert_ne!(second.epoch(), &old_epoch);
    let info = second
        .stream_info(&StreamId::new("s").unwrap())
        .await
        .unwrap();
    assert_eq!((info.head, &info.epoch), (Seq(0), second.epoch()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_pages_behind_a_valid_header_are_quarantined_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.db");
    let first = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    let pad = "x".repeat(200);
    for i in 0..3000u64 {
        first
            .append(AppendRequest {
                stream: StreamId::new("s").unwrap(),
                data: format!("{{\"i\":{i},\"pad\":\"{pad}\"}}"),
                idempotency: None,
            })
            .await
            .unwrap();
    }
    let old_epoch = first.epoch().clone();
    first.close();
    drop(first);
    assert!(zerodrop_testkit::files::damage_middle_pages(&path).unwrap() >= 2);
    let damaged = std::fs::read(&path).unwrap();
    assert_eq!(&damaged[..16], b"SQLite format 3\0", "the header is intact");

    let second = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    let moved = second.quarantined().expect("moved aside").to_path_buf();
    let name = moved.file_name().unwrap().to_string_lossy().to_string();
    assert_eq!(
        name.len(),
        "zerodrop.db.corrupt-20261122T000000Z".len(),
        "{name}"
    );
    assert!(name.starts_with("zerodrop.db.corrupt-"), "{name}");
    assert_eq!(
        std::fs::read(&moved).unwrap(),
        damaged,
        "kept as it was found"
    );
    assert_ne!(second.epoch(), &old_epoch);
    let s = StreamId::new("s").unwrap();
    let info = second.stream_info(&s).await.unwrap();
    assert_eq!((info.head, &info.epoch), (Seq(0), second.epoch()));
    assert_eq!(second.append(req("s", 1)).await.unwrap().seq, Seq(1));
    assert_eq!(second.check().await, Ok(()), "the new file is sound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.db");
    let s = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    for i in 0..50 {
        s.append(req("keep", i)).await.unwrap();
    }
    let epoch = s.epoch().clone();
    s.close();
    drop(s);
    let s = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    assert!(s.quarantined().is_none());
    assert_eq!(s.epoch(), &epoch);
    let r = s
        .read(&StreamId::new("keep").unwrap(), Seq(0), 100)
        .await
        .unwrap();
    assert_eq!(r.events.len(), 50);
    assert_eq!(s.append(req("keep", 50)).await.unwrap().seq, Seq(51));
    assert!(!dir.path().join("zerodrop.db-wal").exists() || s.ping().await.is_ok());
}

/// The log is folded into the file by the checkpointer thread, not in a commit: past the
/// threshold the file grows while appends go on, every event reads back in order, and a
/// close leaves no log behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpointer_folds_the_log_into_the_file_off_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.db");
    let mut opts = SqliteOptions::new(&path);
    opts.checkpoint_pages = 16;
    let s = SqliteStore::open(opts, Arc::new(NoSink)).unwrap();
    let file_at_start = std::fs::metadata(&path).unwrap().len();
    assert_eq!(s.wal_checkpoints().0, 0);
    let big = "x".repeat(2000);
    for i in 0..200u64 {
        let mut r = req("fold", i);
        r.data = format!("{{\"i\":{i},\"pad\":\"{big}\"}}");
        s.append(r).await.unwrap();
    }
    // 200 events of 2 KB are ~100 pages: past 16 the checkpointer was woken (bounded wait).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while s.wal_checkpoints().0 == 0 {
        assert!(std::time::Instant::now() < deadline, "no checkpoint ran");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        std::fs::metadata(&path).unwrap().len() > file_at_start,
        "the file grew: pages moved from the log"
    );
    let r = s
        .read(&StreamId::new("fold").unwrap(), Seq(0), 1000)
        .await
        .unwrap();
    let seqs: Vec<u64> = r.events.iter().map(|e| e.seq().0).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    s.close();
    drop(s);
    assert!(
        !dir.path().join("zerodrop.db-wal").exists(),
        "the last connection folded the log"
    );
    let s = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    let r = s
        .read(&StreamId::new("fold").unwrap(), Seq(0), 1000)
        .await
        .unwrap();
    assert_eq!(r.events.len(), 200);
    assert_eq!(s.append(req("fold", 200)).await.unwrap().seq, Seq(201));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(
            SqliteOptions::new(dir.path().join("zerodrop.db")),
            Arc::new(NoSink),
        )
        .unwrap(),
    );
    let before = store.commits();
    let tasks: Vec<_> = (0..256u64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.append(req(&format!("s{}", i % 8), i)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let commits = store.commits() - before;
    // Group commit: callers waiting at the same time share one transaction (one fsync).
    assert!(
        commits < 128,
        "256 concurrent appends took {commits} commits"
    );
    let mut total = 0;
    for k in 0..8 {
        let info = store
            .stream_info(&StreamId::new(&format!("s{k}")).unwrap())
            .await
            .unwrap();
        total += info.head.0;
    }
    assert_eq!(
        total, 256,
        "every append is there, seqs contiguous per stream"
    );
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_wait_for_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.db");
    let store = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    for i in 1..=3 {
        store.append(req("s", i)).await.unwrap();
    }
    // Another connection holds the write lock (a writer mid-transaction).
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let stream = StreamId::new("s").unwrap();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let r = store.read(&stream, Seq(0), 10).await.unwrap();
        let info = store.stream_info(&stream).await.unwrap();
        (r.events.len(), info.head)
    })
    .await
    .expect("a read waited for the write lock");
    assert_eq!(read, (3, Seq(3)));
    other.execute_batch("ROLLBACK").unwrap();
    store.close();
}

fn job(kind: &str, class: QosClass, available_at_ms: u64) -> NewJob {
    NewJob {
        kind: kind.into(),
        class,
        upstream: "app".into(),
        payload: format!("{{\"kind\":\"{kind}\"}}"),
        dedupe_key: None,
        max_attempts: 3,
        available_at_ms,
    }
}

fn keyed(stream: &str, key: &str) -> AppendRequest {
    AppendRequest {
        stream: StreamId::new(stream).unwrap(),
        data: "{}".into(),
        idempotency: Some(IdempotencyKey {
            key: key.into(),
            fingerprint: [9; 32],
        }),
    }
}

/// What a store holds after the calls below, checked on a reopened file: a dead letter, a
/// running job whose lease is still current, a queued job, a finished webhook record and a
/// publish key that answered one duplicate.
struct Held {
    dead: u64,
    running: Lease,
    queued: u64,
}

const WEBHOOK_TTL: u64 = 72 * 3600 * 1000;

async fn fill(s: &SqliteStore, t: u64) -> Held {
    let caps = QueuedCaps::default();
    let dead = s
        .job_enqueue(job("webhook:gh", QosClass::Realtime, t), &caps, t)
        .await
        .unwrap()
        .id();
    let running = s
        .job_enqueue(job("publish", QosClass::Interactive, t), &caps, t)
        .await
        .unwrap()
        .id();
    let l = s
        .job_claim("w1", 1, &RunningCaps::default(), 60_000, t)
        .await
        .unwrap()[0]
        .lease;
    assert_eq!(l.job, dead);
    let failure = Failure::Dead {
        error: "gave up".into(),
    };
    s.job_fail(l, failure, t + 1).await.unwrap();
    let held = s
        .job_claim("w2", 1, &RunningCaps::default(), 60_000, t + 2)
        .await
        .unwrap();
    assert_eq!(
        held[0].lease,
        Lease {
            job: running,
            attempt: 1
        }
    );
    let queued = s
        .job_enqueue(job("report", QosClass::Batch, t), &caps, t + 3)
        .await
        .unwrap()
        .id();
    assert_eq!(
        s.idem_begin("gh", "m1", [1; 32], WEBHOOK_TTL, 30_000, t)
            .await
            .unwrap(),
        IdemBegin::Fresh
    );
    s.idem_finish("gh", "m1", "{\"status\":202}", t + 4)
        .await
        .unwrap();
    s.append(keyed("orders", "o-1")).await.unwrap();
    assert!(s.append(keyed("orders", "o-1")).await.unwrap().duplicate);
    Held {
        dead,
        running: held[0].lease,
        queued,
    }
}

async fn still_holds(s: &SqliteStore, h: &Held, t: u64) {
    let dead = s.job_list(Some(JobStatus::Dead), 10).await.unwrap();
    assert_eq!(dead.iter().map(|j| j.id).collect::<Vec<_>>(), vec![h.dead]);
    assert_eq!(dead[0].last_error.as_deref(), Some("gave up"));
    // The running job's lease is still the current one: it is not handed out again, and its
    // holder can extend it.
    let got = s
        .job_claim("w3", 10, &RunningCaps::default(), 60_000, t + 10)
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|j| j.job.id).collect::<Vec<_>>(),
        vec![h.queued]
    );
    s.job_heartbeat(h.running, 60_000, t + 11).await.unwrap();
    let running = s.job_get(h.running.job).await.unwrap().unwrap();
    assert_eq!(
        (
            running.status,
            running.worker.as_deref(),
            running.lease_expires_at_ms
        ),
        (JobStatus::Running, Some("w2"), t + 11 + 60_000)
    );
    s.job_complete(h.running, t + 12).await.unwrap();
    assert_eq!(
        s.idem_begin("gh", "m1", [1; 32], WEBHOOK_TTL, 30_000, t + 13)
            .await
            .unwrap(),
        IdemBegin::Done {
            answer: "{\"status\":202}".into(),
            hit_count: 1
        }
    );
    let now = zerodrop_core::now_ms();
    let publish = s.idem_list(Some("publish:orders"), 10, now).await.unwrap();
    assert_eq!(
        publish
            .iter()
            .map(|r| (r.key.as_str(), r.hit_count))
            .collect::<Vec<_>>(),
        vec![("o-1", 1)]
    );
    // Ids keep growing past every id the file ever gave.
    let next = s
        .job_enqueue(
            job("report", QosClass::Batch, t),
            &QueuedCaps::default(),
            t + 14,
        )
        .await
        .unwrap();
    assert!(
        matches!(next, Enqueued::New(id) if id > h.queued),
        "{next:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_idempotency_records_survive_a_crash_and_a_reopen() {
    let t = zerodrop_core::now_ms();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.db");
    let s = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    let held = fill(&s, t).await;
    // What a `kill -9` leaves: the files as they are once the calls answered, the store still
    // open (nothing checkpointed, nothing flushed on close).
    let crashed = tempfile::tempdir().unwrap();
    let copy = crashed.path().join("zerodrop.db");
    std::fs::copy(&path, &copy).unwrap();
    std::fs::copy(
        dir.path().join("zerodrop.db-wal"),
        crashed.path().join("zerodrop.db-wal"),
    )
    .unwrap();
    let after_crash = SqliteStore::open(SqliteOptions::new(&copy), Arc::new(NoSink)).unwrap();
    assert!(after_crash.quarantined().is_none());
    still_holds(&after_crash, &held, t).await;
    after_crash.close();
    // A clean close and reopen of the original.
    s.close();
    drop(s);
    let s = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    still_holds(&s, &held, t).await;
    s.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_from_before_the_job_queue_gains_its_tables_and_keeps_its_keys() {
    let t = zerodrop_core::now_ms();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.db");
    let s = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    let first = s.append(keyed("orders", "o-1")).await.unwrap();
    let epoch = s.epoch().clone();
    s.close();
    drop(s);
    // Take the file back to the schema it had before the job queue.
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "DROP TABLE jobs; DROP TABLE webhook_idempotency; DELETE FROM sqlite_sequence;
             ALTER TABLE idempotency DROP COLUMN hit_count;",
        )
        .unwrap();
        let cols: Vec<String> = c
            .prepare("SELECT name FROM pragma_table_info('idempotency')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!cols.iter().any(|c| c == "hit_count"), "{cols:?}");
    }
    let s = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    assert!(s.quarantined().is_none());
    assert_eq!(s.epoch(), &epoch, "nothing was lost: same epoch");
    let again = s.append(keyed("orders", "o-1")).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.seq, first.seq);
    let listed = s
        .idem_list(Some("publish:orders"), 10, zerodrop_core::now_ms())
        .await
        .unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|r| (r.key.as_str(), r.hit_count))
            .collect::<Vec<_>>(),
        vec![("o-1", 1)],
        "the old key counts from 0"
    );
    let id = s
        .job_enqueue(
            job("publish", QosClass::Realtime, t),
            &QueuedCaps::default(),
            t,
        )
        .await
        .unwrap();
    assert_eq!(id, Enqueued::New(1));
    assert_eq!(
        s.idem_begin("gh", "m1", [1; 32], WEBHOOK_TTL, 30_000, t)
            .await
            .unwrap(),
        IdemBegin::Fresh
    );
    s.close();
    drop(s);
    // Opening the migrated file again changes nothing.
    let s = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    assert_eq!(
        s.job_get(1).await.unwrap().map(|j| j.status),
        Some(JobStatus::Queued)
    );
    s.close();
}

fn batch(stream: &str, from: u64, n: u64) -> Vec<zerodrop_store::StreamBatch> {
    vec![zerodrop_store::StreamBatch {
        stream: StreamId::new(stream).unwrap(),
        items: (from..from + n)
            .map(|i| zerodrop_store::BatchItem {
                data: format!("{{\"n\":{i}}}"),
                idempotency: None,
            })
            .collect(),
    }]
}

/// A file from before chunks (one `events` row per event) is read as it was: the same events,
/// bounds and digest, and the log goes on from its head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_one_row_per_event_is_migrated_to_chunks_and_keeps_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.db");
    let s = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    for i in 0..5 {
        s.append(req("a", i)).await.unwrap();
    }
    s.append_batch(batch("b", 0, 7)).await.unwrap();
    let (a, b) = (StreamId::new("a").unwrap(), StreamId::new("b").unwrap());
    let before = (s.digest(&a).await.unwrap(), s.digest(&b).await.unwrap());
    let epoch = s.epoch().clone();
    s.close();
    drop(s);
    // Rewrite the file in the layout it had before chunks.
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, stream TEXT NOT NULL,
               seq INTEGER NOT NULL, ts INTEGER NOT NULL, json BLOB NOT NULL,
               UNIQUE (stream, seq));",
        )
        .unwrap();
        let chunks: Vec<(String, i64, Vec<u8>)> = c
            .prepare("SELECT stream, seq, body FROM chunks ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (stream, first, body) in chunks {
            let (mut at, mut seq) = (0, first);
            while at < body.len() {
                let ts = u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
                let len = u32::from_le_bytes(body[at + 8..at + 12].try_into().unwrap()) as usize;
                let data = std::str::from_utf8(&body[at + 12..at + 12 + len]).unwrap();
                let event = zerodrop_core::Event::encode(
                    StreamId::new(&stream).unwrap(),
                    Seq(seq as u64),
                    epoch.clone(),
                    ts,
                    data,
                );
                c.execute(
                    "INSERT INTO events (stream, seq, ts, json) VALUES (?1, ?2, ?3, ?4)",
                    rusqlite::params![stream, seq, ts as i64, &event.json()[..]],
                )
                .unwrap();
                at += 12 + len;
                seq += 1;
            }
        }
        c.execute_batch("DROP TABLE chunks").unwrap();
        let rows: i64 = c
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 12);
    }
    let s = SqliteStore::open(SqliteOptions::new(&path), Arc::new(NoSink)).unwrap();
    assert!(s.quarantined().is_none());
    assert_eq!(
        (s.digest(&a).await.unwrap(), s.digest(&b).await.unwrap()),
        before,
        "same bounds and digest"
    );
    let r = s.read(&b, Seq(2), 100).await.unwrap();
    let got: Vec<(u64, String)> = r
        .events
        .iter()
        .map(|e| (e.seq().0, e.data().to_string()))
        .collect();
    let want: Vec<(u64, String)> = (3..=7)
        .map(|i| (i, format!("{{\"n\":{}}}", i - 1)))
        .collect();
    assert_eq!(got, want);
    assert_eq!(s.append(req("a", 5)).await.unwrap().seq, Seq(6));
    s.close();
    drop(s);
    let c = rusqlite::Connection::open(&path).unwrap();
    let tables: Vec<String> = c
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('events', 'chunks')",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tables, vec!["chunks".to_string()], "the old table is gone");
}

/// Retention that reaches into a batch's chunk hides the trimmed events from every read (after,
/// before, since, the digest) and from the bounds' count and bytes, until the whole chunk goes;
/// erasing the stream removes every chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_inside_a_chunk_hides_the_trimmed_events_from_every_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerodrop.db");
    let mut opts = SqliteOptions::new(&path);
    opts.retention.max_events = 4;
    let s = SqliteStore::open(opts, Arc::new(NoSink)).unwrap();
    let b = StreamId::new("b").unwrap();
    s.append_batch(batch("b", 1, 10)).await.unwrap();
    let chunk_rows = |c: &rusqlite::Connection| -> i64 {
        c.query_row("SELECT count(*) FROM chunks WHERE stream = 'b'", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    let file = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(chunk_rows(&file), 1, "one batch, one chunk");
    let seqs = |r: &zerodrop_store::ReadResult| -> Vec<u64> {
        r.events.iter().map(|e| e.seq().0).collect()
    };
    let r = s.read(&b, Seq(0), 100).await.unwrap();
    assert_eq!((r.info.first_seq, r.info.head), (Seq(7), Seq(10)));
    assert_eq!(seqs(&r), vec![7, 8, 9, 10]);
    let size: u64 = r.events.iter().map(|e| e.json().len() as u64).sum();
    assert_eq!(
        (r.info.count, r.info.bytes),
        (4, size),
        "hidden events are not counted"
    );
    let back = s
        .read_range(&b, zerodrop_store::ReadRange::Before(Seq(9)), 100)
        .await
        .unwrap();
    assert_eq!(seqs(&back), vec![8, 7]);
    let since = s
        .read_range(&b, zerodrop_store::ReadRange::Since(0), 100)
        .await
        .unwrap();
    assert_eq!(seqs(&since), vec![7, 8, 9, 10]);
    let mut h = zerodrop_core::hash::ChainHash::default();
    for e in &r.events {
        h.push(&e.json()[..]);
    }
    assert_eq!(
        s.digest(&b).await.unwrap().1,
        h.hex(),
        "the digest covers only 7..=10"
    );
    // The next appends trim the rest of the first chunk: it goes as a whole.
    for i in 11..=17 {
        s.append(req("b", i)).await.unwrap();
    }
    let r = s.read(&b, Seq(0), 100).await.unwrap();
    assert_eq!(seqs(&r), vec![14, 15, 16, 17]);
    let oldest: i64 = file
        .query_row("SELECT min(seq) FROM chunks WHERE stream = 'b'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(
        oldest >= 11,
        "the first chunk is gone once all of it is trimmed"
    );
    s.delete_stream(&b).await.unwrap();
    assert_eq!(chunk_rows(&file), 0, "erasure removes every chunk");
    s.close();
}
