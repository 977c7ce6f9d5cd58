//! The agent's state directory: where its node key and its offline outbox live.
//!
//! Chosen in this order: `APIARY_STATE_DIR` (the `state_dir` setting); `$STATE_DIRECTORY`,
//! which systemd sets to `/var/lib/apiary` for a unit with `StateDirectory=apiary`; the
//! per-user `$XDG_STATE_HOME/apiary`, else `~/.local/state/apiary`. The directory is created
//! if missing, readable by its owner only, because it holds the node's private key.

use std::path::{Path, PathBuf};

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "no state directory: set APIARY_STATE_DIR (or run under systemd with StateDirectory=, or with HOME set)"
    )]
    Unknown,
    #[error("failed to create the state directory {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An existing directory that only this user can read.
#[derive(Clone, Debug)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Resolves the directory from the configured one and the environment, and creates it.
    pub fn open(configured: Option<&Path>) -> Result<Self, StateDirError> {
        let path = match configured {
            Some(path) => path.to_owned(),
            None => default_path(|name| std::env::var_os(name)).ok_or(StateDirError::Unknown)?,
        };
        create_private_dir(&path).map_err(|source| StateDirError::Create {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file or directory inside the state directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Whether this node has joined its cluster before: then it registers without its join
    /// token, which need not travel again (and may have expired).
    pub fn has_joined(&self) -> bool {
        self.join(JOINED_FILE).exists()
    }

    /// Records that the node joined its cluster.
    pub fn mark_joined(&self) -> std::io::Result<()> {
        write_durably(&self.join(JOINED_FILE), b"")
    }

    /// When an operator removed this node from its cluster: the agent then refuses to start
    /// until the file is deleted, so that a removed host does not join again at its next
    /// boot with the token still in its environment.
    pub fn removed_marker(&self) -> Option<PathBuf> {
        Some(self.join(REMOVED_FILE)).filter(|path| path.exists())
    }

    /// Records that an operator removed this node.
    pub fn mark_removed(&self, cluster_said: &str) -> std::io::Result<()> {
        write_durably(&self.join(REMOVED_FILE), cluster_said.as_bytes())
    }
}

/// Marks that this node registered with its cluster at least once.
const JOINED_FILE: &str = "joined";
/// Marks that an operator removed this node; delete it to join again.
pub const REMOVED_FILE: &str = "removed";

/// Writes `contents` to `path` through a temporary file, flushed, renamed into place, and
/// the directory flushed, so that a power cut leaves the old file or the new one, never an
/// empty or torn one.
pub(crate) fn write_durably(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut temporary = tempfile::NamedTempFile::new_in(dir)?;
    temporary.write_all(contents)?;
    temporary.as_file().sync_all()?;
    temporary.persist(path).map_err(|err| err.error)?;
    sync_dir(dir)
}

/// Flushes a directory's entries (a rename, a new file) to disk.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// The directory used when none is configured, read from the environment through `var`.
fn default_path(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let non_empty = |name: &str| var(name).filter(|value| !value.is_empty());
    if let Some(systemd) = non_empty("STATE_DIRECTORY") {
        // systemd passes one path per configured directory, separated by colons; the unit
        // configures one.
        let first = systemd.to_string_lossy().split(':').next()?.to_owned();
        return Some(PathBuf::from(first));
    }
    if let Some(xdg) = non_empty("XDG_STATE_HOME") {
        return Some(PathBuf::from(xdg).join("apiary"));
    }
    non_empty("HOME").map(|home| PathBuf::from(home).join(".local/state/apiary"))
}

#[cfg(unix)]
fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    // An existing directory keeps its mode unless it lets others in.
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn create_private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::OsString;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(*v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn systemd_state_directory_comes_before_the_user_dirs() {
        let path = default_path(env(&[
            ("STATE_DIRECTORY", "/var/lib/apiary"),
            ("HOME", "/home/pi"),
        ]));
        assert_eq!(path, Some(PathBuf::from("/var/lib/apiary")));
    }

    #[test]
    fn user_dirs_follow_xdg_then_home() {
        assert_eq!(
            default_path(env(&[("XDG_STATE_HOME", "/x"), ("HOME", "/home/pi")])),
            Some(PathBuf::from("/x/apiary"))
        );
        assert_eq!(
            default_path(env(&[("HOME", "/home/pi")])),
            Some(PathBuf::from("/home/pi/.local/state/apiary"))
        );
        assert_eq!(default_path(env(&[])), None);
    }

    #[test]
    fn joined_and_removed_markers_persist() {
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::open(Some(root.path())).unwrap();
        assert!(!dir.has_joined() && dir.removed_marker().is_none());
        dir.mark_joined().unwrap();
        dir.mark_removed("removed by an operator").unwrap();
        let again = StateDir::open(Some(root.path())).unwrap();
        assert!(again.has_joined());
        assert_eq!(again.removed_marker(), Some(root.path().join(REMOVED_FILE)));
    }

    #[cfg(unix)]
    #[test]
    fn the_directory_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().unwrap();
        let dir = StateDir::open(Some(&root.path().join("a/b"))).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
