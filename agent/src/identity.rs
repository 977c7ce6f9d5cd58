//! This node's key: made at first start, kept in the state directory, never sent anywhere.
//! Only its public half leaves the node, in the registration record and in the signature
//! headers of every register and heartbeat body.

use std::io::Write as _;
use std::path::Path;

use apiary_proto::identity::{self, KeyPair};

use crate::state::StateDir;

/// The seed's file name inside the state directory.
pub const KEY_FILE: &str = "node.nk";

/// Why the node key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("failed to read the node key {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write the node key {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but holds no valid node seed. It is never overwritten: a node that
    /// lost its key must be removed and joined again by an operator.
    #[error(
        "the node key {path} is not valid ({reason}); remove the node (apiary nodes rm) and delete the file to join anew"
    )]
    Invalid { path: String, reason: String },
}

/// Loads the node key from the state directory, or makes and stores one at first start.
pub fn load_or_create(state: &StateDir) -> Result<KeyPair, IdentityError> {
    let path = state.join(KEY_FILE);
    let shown = path.display().to_string();
    match std::fs::read_to_string(&path) {
        Ok(seed) => identity::from_seed(&seed).map_err(|err| IdentityError::Invalid {
            path: shown,
            reason: err.to_string(),
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let key = identity::generate();
            match write_new(&path, &key) {
                Ok(()) => {
                    tracing::info!(public_key = %key.public_key(), path = %shown, "made a new node key");
                    Ok(key)
                }
                // Another process made it between our read and our write: use theirs.
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                    load_or_create(state)
                }
                Err(source) => Err(IdentityError::Write {
                    path: shown,
                    source,
                }),
            }
        }
        Err(source) => Err(IdentityError::Read {
            path: shown,
            source,
        }),
    }
}

/// Writes the seed to a file that must not exist yet, readable by its owner only, and on
/// disk before the key is used: it is written to a temporary file (created 0600), flushed,
/// linked into place only if no key is there, and the directory flushed. A power cut leaves
/// no key or the whole key, never an empty file that would lock the node out of its id.
fn write_new(path: &Path, key: &KeyPair) -> std::io::Result<()> {
    let seed = key
        .seed()
        .map_err(|err| std::io::Error::other(err.to_string()))?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut temporary = tempfile::NamedTempFile::new_in(dir)?;
    temporary.write_all(seed.as_bytes())?;
    temporary.write_all(b"\n")?;
    temporary.as_file().sync_all()?;
    temporary.persist_noclobber(path).map_err(|err| err.error)?;
    crate::state::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_and_kept() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::open(Some(root.path())).unwrap();
        let first = load_or_create(&state).unwrap();
        let again = load_or_create(&state).unwrap();
        assert_eq!(first.public_key(), again.public_key());
        assert!(first.public_key().starts_with('N'));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(state.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_damaged_key_is_an_error_and_is_not_replaced() {
        let root = tempfile::tempdir().unwrap();
        let state = StateDir::open(Some(root.path())).unwrap();
        std::fs::write(state.join(KEY_FILE), "garbage").unwrap();
        assert!(matches!(
            load_or_create(&state),
            Err(IdentityError::Invalid { .. })
        ));
        assert_eq!(
            std::fs::read_to_string(state.join(KEY_FILE)).unwrap(),
            "garbage"
        );
    }
}
