//! Damage done to a data file the way a bad disk does it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Overwrites the middle fifth of an SQLite file's pages (never page 1, the header) with a
/// byte pattern no b-tree page can start with, so the file still opens but
/// `PRAGMA quick_check` finds the damage. Returns how many pages were overwritten; fails on a
/// file of fewer than 10 pages (too small for its middle to be only b-tree pages).
pub fn damage_middle_pages(path: &Path) -> std::io::Result<u64> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut header = [0u8; 100];
    f.read_exact(&mut header)?;
    if &header[..16] != b"SQLite format 3\0" {
        return Err(std::io::Error::other("not an SQLite file"));
    }
    let page = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    let pages = f.metadata()?.len() / page;
    if pages < 10 {
        return Err(std::io::Error::other(format!(
            "{} has {pages} pages; build a larger file",
            path.display()
        )));
    }
    let (from, to) = (pages * 2 / 5, pages * 3 / 5);
    let garbage = vec![0xAB; page as usize];
    for p in from..to {
        f.seek(SeekFrom::Start(p * page))?;
        f.write_all(&garbage)?;
    }
    f.sync_all()?;
    Ok(to - from)
}
