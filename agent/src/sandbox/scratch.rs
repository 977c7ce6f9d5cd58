//! The scratch-directory grant: a private directory, preopened for the guest as `/scratch`,
//! capped in size, and deleted with everything in it when the run ends.
//!
//! The cap is checked on every epoch tick ([`super::EPOCH_TICK`]) while the guest runs, and
//! once more at the end: a guest can pass it by what it writes within one tick before it is
//! stopped, so a node's disk needs that much room beyond the caps of its slots. What counts
//! is each file's length plus [`ENTRY_BYTES`] per entry, so that a flood of empty files or
//! directories is stopped too.

use std::io;
use std::path::{Path, PathBuf};

/// What each file, directory or link counts for beyond its length: its name and inode.
pub const ENTRY_BYTES: u64 = 512;

/// Where a guest finds its scratch directory.
pub const GUEST_PATH: &str = "/scratch";

/// One run's scratch directory; removed when dropped.
pub(crate) struct Scratch {
    dir: tempfile::TempDir,
    cap: u64,
}

/// The error a run that passes its scratch cap traps with.
#[derive(Debug, thiserror::Error)]
#[error("the task put {used} bytes in its scratch directory; its grant allows {cap}")]
pub(crate) struct DiskLimitExceeded {
    pub(crate) used: u64,
    pub(crate) cap: u64,
}

impl Scratch {
    /// A fresh, empty directory under `root`.
    pub(crate) fn create(root: &Path, cap: u64) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let dir = tempfile::Builder::new().prefix("run-").tempdir_in(root)?;
        Ok(Self { dir, cap })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// What the directory holds now, counted as the cap counts it.
    pub(crate) fn used(&self) -> u64 {
        usage(self.dir.path())
    }

    /// The error to stop the run with, once the directory holds more than the cap.
    pub(crate) fn check(&self) -> Result<u64, DiskLimitExceeded> {
        let used = self.used();
        if used > self.cap {
            return Err(DiskLimitExceeded {
                used,
                cap: self.cap,
            });
        }
        Ok(used)
    }
}

/// Empties `root` of scratch directories a killed agent left behind, and makes sure it
/// exists.
pub(crate) fn reset_root(root: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(root) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    std::fs::create_dir_all(root)
}

/// The default root, for sandboxes made without one (tests, benchmarks): the system's
/// temporary directory, where nothing is cleared at start.
pub(crate) fn default_root() -> PathBuf {
    std::env::temp_dir().join("apiary-scratch")
}

/// The lengths of the files under `dir` plus [`ENTRY_BYTES`] per entry, links not followed.
/// Entries that vanish while it counts are skipped.
fn usage(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            total = total.saturating_add(ENTRY_BYTES);
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                total = total.saturating_add(metadata.len());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_is_file_lengths_plus_a_charge_per_entry_and_the_directory_goes_on_drop() {
        let root = tempfile::tempdir().expect("root");
        let scratch = Scratch::create(root.path(), 10_000).expect("scratch");
        std::fs::create_dir(scratch.path().join("sub")).expect("dir");
        std::fs::write(scratch.path().join("sub/a"), vec![0u8; 1000]).expect("file");
        assert_eq!(scratch.used(), 1000 + 2 * ENTRY_BYTES);
        assert!(scratch.check().is_ok());
        std::fs::write(scratch.path().join("b"), vec![0u8; 9000]).expect("file");
        let exceeded = scratch.check().expect_err("over the cap");
        assert_eq!(exceeded.used, 10_000 + 3 * ENTRY_BYTES);
        let path = scratch.path().to_path_buf();
        drop(scratch);
        assert!(!path.exists());
    }
}
