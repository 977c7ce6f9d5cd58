//! The disk cache of compiled modules: what Cranelift made of a module, kept in the state
//! directory so that a restarted agent (or one that dropped the module from memory) does not
//! compile it again. Compiling is the expensive part of a cold start on a small host.
//!
//! - **Keyed by what makes an artifact valid.** Files live in
//!   `<state>/artifacts/<engine>/<digest>.cwasm`: `<digest>` is the module's SHA-256, and
//!   `<engine>` is wasmtime's own compatibility hash of the engine's settings and version
//!   (`Engine::precompile_compatibility_hash`), so an upgraded agent or changed settings
//!   start a fresh directory instead of loading artifacts made for another engine.
//! - **Loaded only from our own files.** `Module::deserialize_file` trusts its input (it is
//!   machine code), so it reads only files this agent wrote into its own state directory,
//!   which is private to the agent's user. A file is written under a temporary name and
//!   renamed into place, so a crash never leaves half an artifact under a real name; one
//!   that fails to load anyway (a disk error) is removed and the module compiled again.
//! - **Bounded.** After each store the directory is trimmed to its byte limit, least
//!   recently used first (a load touches the file's modification time). Directories of
//!   other engines are removed at start: nothing can load them any more.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use wasmtime::{Engine, Module};

/// The artifact cache's directory inside the agent's state directory.
pub const DIR_NAME: &str = "artifacts";

/// Compiled modules on disk, for one engine.
#[derive(Debug)]
pub struct ArtifactCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl ArtifactCache {
    /// Opens (creating it if need be) the cache for `engine` under `root`, keeping at most
    /// `max_bytes` of artifacts, and removes the directories of other engines.
    pub fn open(root: &Path, engine: &Engine, max_bytes: u64) -> std::io::Result<Self> {
        let engine_dir = engine_dir_name(engine);
        std::fs::create_dir_all(root.join(&engine_dir))?;
        for entry in std::fs::read_dir(root)?.flatten() {
            if entry.file_name() != engine_dir.as_str()
                && entry.path().is_dir()
                && let Err(err) = std::fs::remove_dir_all(entry.path())
            {
                tracing::warn!(error = %err, dir = %entry.path().display(), "failed to remove another engine's artifacts");
            }
        }
        Ok(Self {
            dir: root.join(engine_dir),
            max_bytes,
        })
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.cwasm"))
    }

    /// The module compiled from the bytes with SHA-256 `digest`, if this cache has it.
    /// Blocking file I/O: call it off the async runtime.
    pub fn load(&self, engine: &Engine, digest: &str) -> Option<Module> {
        let path = self.path(digest);
        if !path.exists() {
            return None;
        }
        // The one unsafe call of the cache, allowed here alone.
        // SAFETY: the file is an artifact this agent serialized itself, under the directory
        // of this exact engine, in a state directory only the agent's user can write; it was
        // renamed into place only once completely written. wasmtime checks its header (the
        // engine's version and settings) and refuses anything else.
        #[allow(unsafe_code)]
        let loaded = unsafe { Module::deserialize_file(engine, &path) };
        match loaded {
            Ok(module) => {
                touch(&path);
                Some(module)
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), path = %path.display(), "a cached artifact could not be loaded; compiling the module again");
                std::fs::remove_file(&path).ok();
                None
            }
        }
    }

    /// Keeps `module`'s artifact for `digest`, then trims the cache to its limit. Failures
    /// only cost a later compile, so they are logged, not returned. Blocking file I/O.
    #[cfg(feature = "compiler")]
    pub fn store(&self, digest: &str, module: &Module) {
        if self.max_bytes == 0 {
            return;
        }
        let artifact = match module.serialize() {
            Ok(artifact) => artifact,
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "failed to serialize a compiled module");
                return;
            }
        };
        if artifact.len() as u64 > self.max_bytes {
            tracing::debug!(
                bytes = artifact.len(),
                "a compiled module larger than the whole cache is not kept"
            );
            return;
        }
        if let Err(err) = self.write(digest, &artifact) {
            tracing::warn!(error = %err, "failed to keep a compiled module on disk");
            return;
        }
        self.trim();
    }

    /// Takes an artifact precompiled elsewhere (fetched from `APIARY_ARTIFACTS`, which only
    /// operators write) into the cache and loads it from there, so that machine code is
    /// still only ever loaded from this cache's own files. Kept whatever the byte limit, until
    /// the trim that follows the load. Blocking file I/O.
    pub fn adopt(&self, engine: &Engine, digest: &str, artifact: &[u8]) -> Result<Module, String> {
        self.write(digest, artifact)
            .map_err(|err| format!("cannot keep the precompiled module on disk: {err}"))?;
        let module = self.load(engine, digest).ok_or_else(|| {
            "the precompiled module does not load in this agent's engine (compiled by another \
             apiary release, or for another platform); compile it again with this release's \
             `apiary module compile`"
                .to_owned()
        })?;
        self.trim();
        Ok(module)
    }

    /// A runtime-only engine compiles nothing, so it has nothing of its own to keep.
    #[cfg(not(feature = "compiler"))]
    pub fn store(&self, _digest: &str, _module: &Module) {}

    fn write(&self, digest: &str, artifact: &[u8]) -> std::io::Result<()> {
        let mut temporary = tempfile::NamedTempFile::new_in(&self.dir)?;
        temporary.write_all(artifact)?;
        temporary.persist(self.path(digest))?;
        Ok(())
    }

    /// Removes the least recently used artifacts until the rest fit the byte limit.
    fn trim(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut artifacts: Vec<(SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "cwasm"))
            .filter_map(|entry| {
                let metadata = entry.metadata().ok()?;
                Some((metadata.modified().ok()?, metadata.len(), entry.path()))
            })
            .collect();
        let mut total: u64 = artifacts.iter().map(|(_, size, _)| size).sum();
        artifacts.sort();
        for (_, size, path) in artifacts {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
                tracing::debug!(path = %path.display(), "evicted a compiled module from the disk cache");
            }
        }
    }

    /// The bytes the cache holds now.
    pub fn bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|entry| entry.metadata().ok())
                    .map(|metadata| metadata.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// The directory name for `engine`'s artifacts: its compatibility hash, in hex.
#[cfg(feature = "compiler")]
fn engine_dir_name(engine: &Engine) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// The directory name for a runtime-only engine's artifacts, which wasmtime gives no
/// compatibility hash: the agent's release (which pins its wasmtime). It only sorts the
/// files: what keeps an incompatible artifact out is wasmtime's own check of each file's
/// header (its version and settings), which refuses it, and the file is then removed.
#[cfg(not(feature = "compiler"))]
fn engine_dir_name(_engine: &Engine) -> String {
    format!("precompiled-{}", env!("CARGO_PKG_VERSION"))
}

/// Marks `path` used now, for the least-recently-used trim.
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().write(true).open(path) {
        file.set_modified(SystemTime::now()).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        Engine::default()
    }

    fn module(engine: &Engine, body: &str) -> Module {
        let wat = format!(r#"(module (func (export "_start") {body}))"#);
        Module::new(engine, wat::parse_str(wat).unwrap()).unwrap()
    }

    #[test]
    fn a_stored_module_loads_back_and_runs() {
        let root = tempfile::tempdir().unwrap();
        let engine = engine();
        let cache = ArtifactCache::open(root.path(), &engine, 64 << 20).unwrap();
        assert!(cache.load(&engine, "abc").is_none());
        cache.store("abc", &module(&engine, "nop"));
        let loaded = cache.load(&engine, "abc").expect("stored");
        let mut store = wasmtime::Store::new(&engine, ());
        let instance = wasmtime::Instance::new(&mut store, &loaded, &[]).unwrap();
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .unwrap();
        start.call(&mut store, ()).unwrap();
    }

    #[test]
    fn a_damaged_artifact_is_removed_not_loaded() {
        let root = tempfile::tempdir().unwrap();
        let engine = engine();
        let cache = ArtifactCache::open(root.path(), &engine, 64 << 20).unwrap();
        cache.store("abc", &module(&engine, "nop"));
        std::fs::write(cache.path("abc"), b"not an artifact").unwrap();
        assert!(cache.load(&engine, "abc").is_none());
        assert!(!cache.path("abc").exists());
    }

    #[test]
    fn the_least_recently_used_go_first_when_the_cache_is_full() {
        let root = tempfile::tempdir().unwrap();
        let engine = engine();
        let one = module(&engine, "nop").serialize().unwrap().len() as u64;
        // Room for two artifacts of this size, not three.
        let cache = ArtifactCache::open(root.path(), &engine, one * 2 + one / 2).unwrap();
        cache.store("first", &module(&engine, "nop"));
        cache.store("second", &module(&engine, "nop"));
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        for name in ["first", "second"] {
            let file = std::fs::File::options()
                .write(true)
                .open(cache.path(name))
                .unwrap();
            file.set_modified(old).unwrap();
        }
        // Using "first" makes "second" the least recently used.
        assert!(cache.load(&engine, "first").is_some());
        cache.store("third", &module(&engine, "nop"));
        assert!(cache.path("first").exists());
        assert!(!cache.path("second").exists());
        assert!(cache.path("third").exists());
        assert!(cache.bytes() <= one * 2 + one / 2);
    }

    #[test]
    fn other_engines_artifacts_are_removed_at_open() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("0123456789abcdef")).unwrap();
        std::fs::write(root.path().join("0123456789abcdef/x.cwasm"), b"old").unwrap();
        let engine = engine();
        ArtifactCache::open(root.path(), &engine, 1 << 20).unwrap();
        assert!(!root.path().join("0123456789abcdef").exists());
        assert!(root.path().join(engine_dir_name(&engine)).is_dir());
    }
}
