//! The volume's state: every file's and directory's volatile contents beside the contents
//! the last `fsync` made durable, and the power cut that throws the volatile layer away.
//!
//! What it models (LazyFS's "lose everything not synced", with POSIX's directory rule):
//!
//! - A file's bytes and its size (writes, truncates) live in the volatile layer until an
//!   `fsync`/`fdatasync` of that file copies them to its durable layer. Only the pages
//!   written since the last sync are copied, so a sync costs what changed, not the file.
//! - A directory's names (create, mkdir, rename, unlink, rmdir) are volatile until an
//!   `fsync` of that directory. An `fsync` of a file does not make its own name durable:
//!   POSIX does not promise it and neither does `fsync(2)` on Linux ("an explicit fsync()
//!   on a file descriptor for the directory is also needed").
//! - A cut keeps, from the root down, each directory's durable names; each file reached
//!   gets its durable bytes back (empty if it was never synced); everything else is gone.
//!
//! What it does not model: torn or partial writes (a write is wholly lost or, once synced,
//! wholly kept; no sector is half-written), unsynced writes that happen to survive (a real
//! disk may keep any subset of them; this volume always keeps none, the harshest single
//! outcome), reordering between synced files (there is none to see), metadata other than
//! names and sizes (modes and owners apply at once and survive; times are not kept), hard
//! links, symlinks, special files and extended attributes (refused).
//!
//! Must not: know about FUSE or the kernel; `crate::fuse` translates requests into these
//! calls.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};

/// The root directory's inode number (FUSE's).
pub const ROOT: u64 = 1;

/// Unsynced bytes are tracked in pages of this size.
const PAGE: usize = 4096;

/// Why an operation failed, as the errno the kernel passes on.
pub type Errno = i32;

#[derive(Debug)]
pub enum Kind {
    File(FileData),
    Dir(DirData),
}

#[derive(Debug)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Default)]
pub struct FileData {
    /// What reads see.
    data: Vec<u8>,
    /// What a cut leaves.
    synced: Vec<u8>,
    /// Pages of `data` written (or resized) since the last sync.
    dirty: BTreeSet<usize>,
}

#[derive(Debug, Default)]
pub struct DirData {
    entries: BTreeMap<OsString, u64>,
    synced: BTreeMap<OsString, u64>,
    parent: u64,
}

impl FileData {
    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn mark(&mut self, from: usize, to: usize) {
        if to > from {
            self.dirty.extend(from / PAGE..to.div_ceil(PAGE));
        }
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) {
        let end = offset + bytes.len();
        if end > self.data.len() {
            let old = self.data.len();
            self.data.resize(end, 0);
            self.mark(old, end);
        }
        self.data[offset..end].copy_from_slice(bytes);
        self.mark(offset, end);
    }

    fn truncate(&mut self, len: usize) {
        let old = self.data.len();
        self.data.resize(len, 0);
        self.mark(old.min(len), old.max(len));
    }

    fn sync(&mut self) -> u64 {
        let len = self.data.len();
        self.synced.resize(len, 0);
        let mut copied = 0;
        for p in std::mem::take(&mut self.dirty) {
            let (from, to) = (p * PAGE, ((p + 1) * PAGE).min(len));
            if from < to {
                self.synced[from..to].copy_from_slice(&self.data[from..to]);
                copied += (to - from) as u64;
            }
        }
        copied
    }

    /// Back to the last synced bytes; how many unsynced bytes that threw away.
    fn cut(&mut self) -> u64 {
        let lost = self.dirty.len() as u64 * PAGE as u64;
        self.data = self.synced.clone();
        self.dirty.clear();
        lost
    }
}

/// What one cut threw away.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CutReport {
    /// Files whose contents went back to their last sync.
    pub files_rolled_back: u64,
    /// Unsynced pages discarded, in bytes (a page counts whole).
    pub bytes_lost: u64,
    /// Names (files or directories) that were not durable and vanished.
    pub names_lost: u64,
}

/// Counters since the volume was made.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub writes: u64,
    pub file_syncs: u64,
    pub dir_syncs: u64,
    pub bytes_synced: u64,
    pub cuts: u64,
}

/// The whole volume. Single-threaded by construction: the FUSE adapter holds it under one
/// lock.
#[derive(Debug)]
pub struct Volume {
    nodes: HashMap<u64, Node>,
    next: u64,
    pub stats: Stats,
}

impl Default for Volume {
    fn default() -> Self {
        Self::new()
    }
}

impl Volume {
    /// An empty volume whose root (mode 0755, owned by root) is durable.
    pub fn new() -> Volume {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                kind: Kind::Dir(DirData {
                    parent: ROOT,
                    ..DirData::default()
                }),
                perm: 0o755,
                uid: 0,
                gid: 0,
            },
        );
        Volume {
            nodes,
            next: ROOT + 1,
            stats: Stats::default(),
        }
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn node_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    fn dir(&self, ino: u64) -> Result<&DirData, Errno> {
        match self.nodes.get(&ino).map(|n| &n.kind) {
            Some(Kind::Dir(d)) => Ok(d),
            Some(Kind::File(_)) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut DirData, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::Dir(d)) => Ok(d),
            Some(Kind::File(_)) => Err(libc::ENOTDIR),
            None => Err(libc::ENOENT),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileData, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::File(f)) => Ok(f),
            Some(Kind::Dir(_)) => Err(libc::EISDIR),
            None => Err(libc::ENOENT),
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    /// `(name, ino, is_dir)` of a directory's current entries, `.` and `..` first.
    pub fn list(&self, dir: u64) -> Result<Vec<(OsString, u64, bool)>, Errno> {
        let d = self.dir(dir)?;
        let mut out = vec![(".".into(), dir, true), ("..".into(), d.parent, true)];
        for (name, &ino) in &d.entries {
            let is_dir = matches!(self.nodes.get(&ino).map(|n| &n.kind), Some(Kind::Dir(_)));
            out.push((name.clone(), ino, is_dir));
        }
        Ok(out)
    }

    /// A new file or directory named `name` in `parent` (volatile until `parent` is synced).
    pub fn make(
        &mut self,
        parent: u64,
        name: &OsStr,
        dir: bool,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64, Errno> {
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        let kind = if dir {
            Kind::Dir(DirData {
                parent,
                ..DirData::default()
            })
        } else {
            Kind::File(FileData::default())
        };
        self.nodes.insert(
            ino,
            Node {
                kind,
                perm,
                uid,
                gid,
            },
        );
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        Ok(ino)
    }

    /// Removes a name (`unlink`, or `rmdir` when `dir`). The node stays readable through
    /// handles still open; a cut drops it if no durable name reaches it.
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        match (&self.nodes[&ino].kind, dir) {
            (Kind::Dir(d), true) if !d.entries.is_empty() => return Err(libc::ENOTEMPTY),
            (Kind::Dir(_), false) => return Err(libc::EISDIR),
            (Kind::File(_), true) => return Err(libc::ENOTDIR),
            _ => {}
        }
        self.dir_mut(parent)?.entries.remove(name);
        Ok(())
    }

    /// `rename(2)`, replacing a file (or an empty directory) at the target unless
    /// `no_replace`.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        to_parent: u64,
        to_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        self.dir(to_parent)?;
        if let Ok(existing) = self.lookup(to_parent, to_name) {
            if no_replace {
                return Err(libc::EEXIST);
            }
            if existing == ino {
                return Ok(());
            }
            let src_dir = matches!(self.nodes[&ino].kind, Kind::Dir(_));
            match &self.nodes[&existing].kind {
                Kind::Dir(_) if !src_dir => return Err(libc::EISDIR),
                Kind::Dir(d) if !d.entries.is_empty() => return Err(libc::ENOTEMPTY),
                Kind::File(_) if src_dir => return Err(libc::ENOTDIR),
                _ => {}
            }
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.dir_mut(to_parent)?
            .entries
            .insert(to_name.to_owned(), ino);
        if let Some(Kind::Dir(d)) = self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            d.parent = to_parent;
        }
        Ok(())
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<&[u8], Errno> {
        match self.nodes.get(&ino).map(|n| &n.kind) {
            Some(Kind::File(f)) => {
                let len = f.data.len();
                let from = usize::try_from(offset).unwrap_or(usize::MAX).min(len);
                let to = from.saturating_add(size as usize).min(len);
                Ok(&f.data[from..to])
            }
            Some(Kind::Dir(_)) => Err(libc::EISDIR),
            None => Err(libc::ENOENT),
        }
    }

    pub fn write(&mut self, ino: u64, offset: u64, bytes: &[u8]) -> Result<(), Errno> {
        let offset = usize::try_from(offset).map_err(|_| libc::EFBIG)?;
        self.file_mut(ino)?.write(offset, bytes);
        self.stats.writes += 1;
        Ok(())
    }

    pub fn truncate(&mut self, ino: u64, len: u64) -> Result<(), Errno> {
        let len = usize::try_from(len).map_err(|_| libc::EFBIG)?;
        self.file_mut(ino)?.truncate(len);
        Ok(())
    }

    /// `fsync`/`fdatasync` of a file (its bytes and size) or of a directory (its names).
    pub fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::File(f)) => {
                self.stats.bytes_synced += f.sync();
                self.stats.file_syncs += 1;
            }
            Some(Kind::Dir(d)) => {
                d.synced = d.entries.clone();
                self.stats.dir_syncs += 1;
            }
            None => return Err(libc::ENOENT),
        }
        Ok(())
    }

    /// The power cut: everything not synced is gone. Run it while nothing is mounted (the
    /// kernel's caches would still hold what this throws away).
    pub fn cut(&mut self) -> CutReport {
        let mut report = CutReport::default();
        let mut reached = BTreeSet::from([ROOT]);
        let mut todo = vec![ROOT];
        while let Some(dir) = todo.pop() {
            let Some(Node {
                kind: Kind::Dir(d), ..
            }) = self.nodes.get_mut(&dir)
            else {
                continue;
            };
            report.names_lost += d
                .entries
                .iter()
                .filter(|(n, i)| d.synced.get(*n) != Some(i))
                .count() as u64;
            d.entries = d.synced.clone();
            for &child in d.entries.values() {
                // A directory synced into two places (a rename whose source and target
                // directories were both synced at different moments) is kept once.
                if reached.insert(child) {
                    todo.push(child);
                }
            }
            let children: Vec<u64> = d.entries.values().copied().collect();
            for child in children {
                if let Some(Node {
                    kind: Kind::Dir(cd),
                    ..
                }) = self.nodes.get_mut(&child)
                {
                    cd.parent = dir;
                }
            }
        }
        self.nodes.retain(|ino, _| reached.contains(ino));
        for node in self.nodes.values_mut() {
            if let Kind::File(f) = &mut node.kind
                && (!f.dirty.is_empty() || f.data.len() != f.synced.len())
            {
                report.files_rolled_back += 1;
                report.bytes_lost += f.cut();
            }
        }
        self.stats.cuts += 1;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(v: &mut Volume, parent: u64, name: &str) -> u64 {
        v.make(parent, OsStr::new(name), false, 0o644, 0, 0)
            .unwrap()
    }

    fn content(v: &Volume, parent: u64, name: &str) -> Option<Vec<u8>> {
        let ino = v.lookup(parent, OsStr::new(name)).ok()?;
        Some(v.read(ino, 0, u32::MAX).unwrap().to_vec())
    }

    #[test]
    fn unsynced_writes_vanish_and_synced_ones_stay() {
        let mut v = Volume::new();
        let f = file(&mut v, ROOT, "a");
        v.sync(ROOT).unwrap();
        v.write(f, 0, b"hello").unwrap();
        v.sync(f).unwrap();
        v.write(f, 5, b" world").unwrap();
        v.write(f, 0, b"J").unwrap();
        let r = v.cut();
        assert_eq!(content(&v, ROOT, "a").unwrap(), b"hello");
        assert_eq!(r.files_rolled_back, 1);
        assert_eq!(r.names_lost, 0);
    }

    #[test]
    fn a_file_sync_does_not_make_its_name_durable() {
        let mut v = Volume::new();
        let f = file(&mut v, ROOT, "new");
        v.write(f, 0, b"x").unwrap();
        v.sync(f).unwrap();
        let r = v.cut();
        assert_eq!(content(&v, ROOT, "new"), None);
        assert_eq!(r.names_lost, 1);
    }

    #[test]
    fn a_name_synced_without_its_data_comes_back_empty() {
        let mut v = Volume::new();
        let f = file(&mut v, ROOT, "f");
        v.write(f, 0, b"data").unwrap();
        v.sync(ROOT).unwrap();
        v.cut();
        assert_eq!(content(&v, ROOT, "f").unwrap(), b"");
    }

    #[test]
    fn an_unsynced_rename_leaves_the_old_name_and_content() {
        let mut v = Volume::new();
        let old = file(&mut v, ROOT, "s.json");
        v.write(old, 0, b"old").unwrap();
        v.sync(old).unwrap();
        v.sync(ROOT).unwrap();
        let tmp = file(&mut v, ROOT, ".s.tmp");
        v.write(tmp, 0, b"new").unwrap();
        v.sync(tmp).unwrap();
        v.rename(
            ROOT,
            OsStr::new(".s.tmp"),
            ROOT,
            OsStr::new("s.json"),
            false,
        )
        .unwrap();
        assert_eq!(content(&v, ROOT, "s.json").unwrap(), b"new");
        v.cut();
        assert_eq!(content(&v, ROOT, "s.json").unwrap(), b"old");
        assert_eq!(content(&v, ROOT, ".s.tmp"), None);
    }

    #[test]
    fn truncates_and_unlinks_are_volatile_too() {
        let mut v = Volume::new();
        let f = file(&mut v, ROOT, "f");
        v.write(f, 0, &[7u8; 10_000]).unwrap();
        v.sync(f).unwrap();
        v.sync(ROOT).unwrap();
        v.truncate(f, 3).unwrap();
        v.truncate(f, 9_000).unwrap();
        assert_eq!(content(&v, ROOT, "f").unwrap()[5], 0);
        v.remove(ROOT, OsStr::new("f"), false).unwrap();
        v.cut();
        assert_eq!(content(&v, ROOT, "f").unwrap(), vec![7u8; 10_000]);
    }

    #[test]
    fn a_sync_copies_a_shrink_then_growth_as_zeros() {
        let mut v = Volume::new();
        let f = file(&mut v, ROOT, "f");
        v.sync(ROOT).unwrap();
        v.write(f, 0, &[1u8; 9_000]).unwrap();
        v.sync(f).unwrap();
        v.truncate(f, 100).unwrap();
        v.truncate(f, 9_000).unwrap();
        v.sync(f).unwrap();
        v.cut();
        let c = content(&v, ROOT, "f").unwrap();
        assert_eq!(c.len(), 9_000);
        assert_eq!(&c[..100], &[1u8; 100][..]);
        assert!(c[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn directories_follow_the_same_rule() {
        let mut v = Volume::new();
        let d = v.make(ROOT, OsStr::new("d"), true, 0o700, 0, 0).unwrap();
        let f = file(&mut v, d, "f");
        v.write(f, 0, b"1").unwrap();
        v.sync(f).unwrap();
        v.sync(d).unwrap();
        // `d` itself was never synced into the root: it and all below it vanish.
        v.cut();
        assert!(v.lookup(ROOT, OsStr::new("d")).is_err());
        assert!(v.node(f).is_none());
    }
}
