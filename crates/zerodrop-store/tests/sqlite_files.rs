//! The SQLite store's files: quarantine of a corrupt file, durability across reopen.

use std::sync::Arc;

use zerodrop_core::{Seq, StreamId};
use zerodrop_store::{AppendRequest, NoSink, SqliteOptions, SqliteStore, Store};

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
