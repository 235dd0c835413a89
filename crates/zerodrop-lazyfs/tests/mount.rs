//! The volume through the kernel: what `write`, `fsync`, `rename` and a directory `fsync`
//! leave after a cut, read back with plain `std::fs` calls on the remounted volume.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use zerodrop_lazyfs::LazyFs;

fn read(path: &Path) -> Option<Vec<u8>> {
    let mut f = File::open(path).ok()?;
    let mut out = Vec::new();
    f.read_to_end(&mut out).ok()?;
    Some(out)
}

fn sync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

#[test]
fn a_cut_keeps_what_was_synced_and_nothing_else() {
    if let Some(why) = zerodrop_lazyfs::unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let mnt = root.path().join("v");
    std::fs::create_dir(&mnt).unwrap();
    let mut fs = LazyFs::mount(&mnt).expect("mounts (root and /dev/fuse)");
    let (a, b, c) = (mnt.join("a"), mnt.join("b"), mnt.join("c"));
    {
        let mut f = File::create(&a).unwrap();
        f.write_all(b"synced").unwrap();
        f.sync_all().unwrap();
        sync_dir(&mnt);
        f.write_all(b" and not").unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"S").unwrap();
    }
    assert_eq!(read(&a).unwrap(), b"Synced and not");
    // A name made durable before its bytes were.
    let mut f = File::create(&c).unwrap();
    sync_dir(&mnt);
    f.write_all(b"never synced").unwrap();
    drop(f);
    // A synced file whose name never was.
    let mut f = File::create(&b).unwrap();
    f.write_all(b"orphan").unwrap();
    f.sync_data().unwrap();
    drop(f);
    let r = fs.power_cut().unwrap();
    assert_eq!(read(&a).unwrap(), b"synced");
    assert_eq!(read(&b), None);
    assert_eq!(read(&c).unwrap(), b"");
    assert_eq!(r.names_lost, 1, "{r:?}");
    assert!(r.files_rolled_back >= 2, "{r:?}");
    // The remounted volume is writable and cuts again.
    std::fs::write(&b, b"second").unwrap();
    std::fs::rename(&b, &a).unwrap();
    fs.power_cut().unwrap();
    assert_eq!(read(&a).unwrap(), b"synced");
    drop(fs);
    assert_eq!(read(&a), None, "unmounted on drop");
}
