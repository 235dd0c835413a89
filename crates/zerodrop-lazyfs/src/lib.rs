//! A volume for power-cut tests: a FUSE file system, held in this process's memory, that
//! keeps every write in a volatile layer until `fsync` and, on [`LazyFs::power_cut`],
//! throws away everything not yet synced, as LazyFS does. What exactly survives (and what
//! is not modelled) is documented in [`volume`].
//!
//! [`LazyFs`] owns the mount: it mounts with the `mount(2)` system call (root and
//! `/dev/fuse` needed; no helper program), unmounts on a cut and mounts the surviving state
//! again, so no kernel cache can hand back a write the cut discarded, and unmounts on drop,
//! also while a test unwinds from a panic.
//!
//! Must not: be linked by anything that ships (it is a dev-dependency only), or be cut
//! while a process still has files open on it (the caller kills them first).

mod fuse;
pub mod volume;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{BackgroundSession, Config, MountOption};

use volume::Volume;
pub use volume::{CutReport, Stats};

/// Why this machine cannot run the volume, if it cannot (`/dev/fuse` absent).
pub fn unavailable() -> Option<String> {
    if Path::new("/dev/fuse").exists() {
        None
    } else {
        Some("/dev/fuse is absent: the FUSE kernel module is not loaded here".into())
    }
}

/// A mounted volume. Dropping it unmounts.
pub struct LazyFs {
    mountpoint: PathBuf,
    volume: Arc<Mutex<Volume>>,
    session: Option<BackgroundSession>,
}

impl LazyFs {
    /// Mounts an empty volume on `mountpoint` (an existing, empty directory).
    pub fn mount(mountpoint: &Path) -> io::Result<LazyFs> {
        let mut fs = LazyFs {
            mountpoint: mountpoint.to_path_buf(),
            volume: Arc::new(Mutex::new(Volume::new())),
            session: None,
        };
        fs.attach()?;
        Ok(fs)
    }

    fn attach(&mut self) -> io::Result<()> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("zerodrop-lazyfs".into()),
            MountOption::Subtype("lazyfs".into()),
        ];
        let fs = fuse::LazyFuse {
            volume: self.volume.clone(),
            epoch: SystemTime::now(),
        };
        self.session = Some(fuser::spawn_mount(fs, &self.mountpoint, &config)?);
        Ok(())
    }

    fn detach(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // A process that was just killed may still be closing its files; the kernel
        // answers EBUSY until it is done. Bounded: 50 tries over 5 s, then a lazy detach.
        if let Ok(c) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()) {
            let mut flags = 0;
            for attempt in 0..=50 {
                if attempt == 50 {
                    flags = libc::MNT_DETACH;
                }
                // SAFETY: umount2 with a valid NUL-terminated path has no memory effects.
                let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
                if rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EBUSY) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // The session reads ENODEV from its device once unmounted and ends its thread. (Its
        // own unmount on drop finds nothing left to do and only logs.)
        session.join()
    }

    /// The mounted directory.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The power cut: unmounts, discards every write not yet synced, mounts what survived.
    /// Every process with a file open here must be dead (killed) first.
    pub fn power_cut(&mut self) -> io::Result<CutReport> {
        self.detach()?;
        let report = self.volume.lock().unwrap_or_else(|p| p.into_inner()).cut();
        self.attach()?;
        Ok(report)
    }

    /// Writes, syncs and cuts so far.
    pub fn stats(&self) -> Stats {
        self.volume.lock().unwrap_or_else(|p| p.into_inner()).stats
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}
