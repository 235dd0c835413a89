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
