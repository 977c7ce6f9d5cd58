//! Fetching, checking and compiling modules, with caches of compiled modules.
//!
//! Modules are named by the SHA-256 of their bytes, so a cached compilation can never be
//! stale: the same name always means the same bytes. Compiling is the expensive step on a
//! small host, and most clusters run a few modules many times, so the agent keeps the most
//! recently used compiled modules in memory, and every module it compiled on disk
//! ([`crate::artifacts`]), where a restarted agent finds them.
//!
//! A runtime-only agent (built without the `compiler` feature, or told to run only
//! precompiled modules) compiles nothing: it fetches the module precompiled for its platform
//! from `APIARY_ARTIFACTS` (put there by `apiary module compile`), takes it into its disk
//! cache, and loads it from there.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use apiary_proto::message::{ModuleCacheStats, ModuleRef, TaskError, TaskErrorKind};
use apiary_proto::topology;
use async_nats::jetstream::object_store::{GetErrorKind, ObjectStore};
use tokio::io::AsyncReadExt as _;

use crate::artifacts::ArtifactCache;
use crate::sandbox::{Prepared, Sandbox};

/// The largest module the agent will fetch. Bigger objects are refused by their recorded size
/// before any of them is read, and reading stops at the limit in any case.
pub const MAX_MODULE_BYTES: u64 = 64 * 1024 * 1024;

/// Compiled modules by digest, in front of the module object store.
pub struct ModuleCache {
    store: ObjectStore,
    /// `APIARY_ARTIFACTS`: where a runtime-only agent finds modules precompiled for it.
    precompiled: ObjectStore,
    sandbox: Arc<Sandbox>,
    compiled: Mutex<lru::LruCache<String, Prepared>>,
    artifacts: Option<Arc<ArtifactCache>>,
    memory_hits: AtomicU64,
    disk_loads: AtomicU64,
    compilations: AtomicU64,
    precompiled_loads: AtomicU64,
}

impl std::fmt::Debug for ModuleCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleCache").finish_non_exhaustive()
    }
}

impl ModuleCache {
    /// A cache of `capacity` modules in memory, in front of `artifacts` on disk when given.
    pub fn new(
        store: ObjectStore,
        precompiled: ObjectStore,
        sandbox: Arc<Sandbox>,
        capacity: NonZeroUsize,
        artifacts: Option<ArtifactCache>,
    ) -> Self {
        Self {
            store,
            precompiled,
            sandbox,
            compiled: Mutex::new(lru::LruCache::new(capacity)),
            artifacts: artifacts.map(Arc::new),
            memory_hits: AtomicU64::new(0),
            disk_loads: AtomicU64::new(0),
            compilations: AtomicU64::new(0),
            precompiled_loads: AtomicU64::new(0),
        }
    }

    /// The compiled module for `module`: from memory, from the disk cache, or fetched,
    /// checked against its digest, compiled and kept in both.
    #[tracing::instrument(skip_all, fields(module = %module.sha256))]
    pub async fn get(&self, module: &ModuleRef) -> Result<Prepared, TaskError> {
        // Checked first: the digest names the artifact's file.
        if !is_sha256_hex(&module.sha256) {
            return Err(TaskError::new(
                TaskErrorKind::InvalidTask,
                format!("{:?} is not a SHA-256 digest", module.sha256),
            ));
        }
        if let Some(compiled) = self.cached(&module.sha256) {
            tracing::trace!("compiled module cache hit");
            self.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(compiled);
        }
        if let Some(loaded) = self.load_from_disk(&module.sha256).await {
            tracing::debug!("module loaded from the disk cache");
            self.disk_loads.fetch_add(1, Ordering::Relaxed);
            self.lock().put(module.sha256.clone(), loaded.clone());
            return Ok(loaded);
        }
        if !self.sandbox.compiles() {
            let loaded = self.load_precompiled(module).await?;
            tracing::debug!("precompiled module fetched");
            self.precompiled_loads.fetch_add(1, Ordering::Relaxed);
            self.lock().put(module.sha256.clone(), loaded.clone());
            return Ok(loaded);
        }
        let bytes = self.fetch(module).await?;
        let sandbox = self.sandbox.clone();
        let artifacts = self.artifacts.clone();
        let digest = module.sha256.clone();
        // The artifact is written before the run, on the compiler's thread: a few
        // milliseconds on the first run of a module, and an agent killed right after it
        // still finds the module compiled when it starts again.
        let compiled = tokio::task::spawn_blocking(move || {
            let compiled = sandbox.compile(&bytes)?;
            if let Some(artifacts) = artifacts {
                artifacts.store(&digest, &compiled);
            }
            sandbox.prepare(compiled)
        })
        .await
        .map_err(|err| {
            TaskError::new(
                TaskErrorKind::Internal,
                format!("the compiler thread failed: {err}"),
            )
        })??;
        tracing::debug!("module compiled");
        self.compilations.fetch_add(1, Ordering::Relaxed);
        self.lock().put(module.sha256.clone(), compiled.clone());
        Ok(compiled)
    }

    /// The module precompiled for this platform, from `APIARY_ARTIFACTS` through the disk
    /// cache.
    async fn load_precompiled(&self, module: &ModuleRef) -> Result<Prepared, TaskError> {
        let platform = topology::host_platform();
        let name = topology::artifact_name(&module.sha256, &platform);
        let artifact = read_object(&self.precompiled, &name, MAX_ARTIFACT_BYTES)
            .await
            .map_err(|err| match err {
                ReadError::NotFound => TaskError::new(
                    TaskErrorKind::ModuleNotFound,
                    format!(
                        "this agent runs only precompiled modules, and module {} has not been \
                         precompiled for {platform} (`apiary module compile --target`)",
                        module.sha256
                    ),
                ),
                other => other.into_task_error(&name),
            })?;
        let Some(artifacts) = self.artifacts.clone() else {
            return Err(TaskError::new(
                TaskErrorKind::Internal,
                "a runtime-only agent needs its artifact cache, which could not be opened",
            ));
        };
        let sandbox = self.sandbox.clone();
        let digest = module.sha256.clone();
        tokio::task::spawn_blocking(move || {
            let module = artifacts
                .adopt(sandbox.engine(), &digest, &artifact)
                .map_err(|message| TaskError::new(TaskErrorKind::InvalidModule, message))?;
            sandbox.prepare(module)
        })
        .await
        .map_err(|err| {
            TaskError::new(
                TaskErrorKind::Internal,
                format!("the loader thread failed: {err}"),
            )
        })?
    }

    async fn load_from_disk(&self, digest: &str) -> Option<Prepared> {
        let artifacts = self.artifacts.clone()?;
        let sandbox = self.sandbox.clone();
        let digest = digest.to_owned();
        tokio::task::spawn_blocking(move || {
            let module = artifacts.load(sandbox.engine(), &digest)?;
            // A module was stored only after it compiled; one that no longer prepares
            // (the linker changed without the engine hash) is compiled again.
            sandbox.prepare(module).ok()
        })
        .await
        .ok()
        .flatten()
    }

    /// Where the modules run so far came from, and what the disk cache holds.
    pub fn stats(&self) -> ModuleCacheStats {
        ModuleCacheStats {
            memory_hits: self.memory_hits.load(Ordering::Relaxed),
            disk_loads: self.disk_loads.load(Ordering::Relaxed),
            compiled: self.compilations.load(Ordering::Relaxed),
            disk_bytes: self
                .artifacts
                .as_ref()
                .map_or(0, |artifacts| artifacts.bytes()),
            precompiled: self.precompiled_loads.load(Ordering::Relaxed),
            compiles: self.sandbox.compiles(),
        }
    }

    fn cached(&self, digest: &str) -> Option<Prepared> {
        self.lock().get(digest).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, lru::LruCache<String, Prepared>> {
        // A panic while holding the lock cannot leave the cache inconsistent (every operation
        // is a single call into the LRU), so a poisoned lock is still usable.
        self.compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn fetch(&self, module: &ModuleRef) -> Result<Vec<u8>, TaskError> {
        let bytes = read_object(&self.store, &module.sha256, MAX_MODULE_BYTES)
            .await
            .map_err(|err| match err {
                ReadError::NotFound => TaskError::new(
                    TaskErrorKind::ModuleNotFound,
                    format!("module {} is not in the module store", module.sha256),
                ),
                ReadError::TooLarge(size) => TaskError::new(
                    TaskErrorKind::InvalidModule,
                    format!("the module is {size} bytes, more than the {MAX_MODULE_BYTES} allowed"),
                ),
                other => other.into_task_error(&module.sha256),
            })?;
        if !module.matches(&bytes) {
            return Err(TaskError::new(
                TaskErrorKind::ModuleDigestMismatch,
                format!(
                    "the module store returned {} bytes that do not hash to {}",
                    bytes.len(),
                    module.sha256
                ),
            ));
        }
        Ok(bytes)
    }
}

/// The largest precompiled module the agent will fetch: machine code is several times the
/// size of its module.
pub const MAX_ARTIFACT_BYTES: u64 = 4 * MAX_MODULE_BYTES;

/// Why an object could not be read.
#[derive(Debug)]
enum ReadError {
    NotFound,
    /// Larger than allowed: its recorded size, or (when that was wrong) the limit plus one.
    TooLarge(u64),
    Failed(String),
}

impl ReadError {
    fn into_task_error(self, name: &str) -> TaskError {
        match self {
            ReadError::NotFound => TaskError::new(
                TaskErrorKind::ModuleNotFound,
                format!("{name} is not in the store"),
            ),
            ReadError::TooLarge(size) => TaskError::new(
                TaskErrorKind::InvalidModule,
                format!("{name} is {size} bytes, more than allowed"),
            ),
            ReadError::Failed(message) => TaskError::new(
                TaskErrorKind::Internal,
                format!("failed to fetch {name}: {message}"),
            ),
        }
    }
}

/// Reads object `name` of `store`, refusing one larger than `max_bytes` by its recorded size
/// before any of it is read, and stopping at the limit in any case: the recorded size could
/// be wrong.
async fn read_object(
    store: &ObjectStore,
    name: &str,
    max_bytes: u64,
) -> Result<Vec<u8>, ReadError> {
    let object = store.get(name).await.map_err(|err| {
        if err.kind() == GetErrorKind::NotFound {
            ReadError::NotFound
        } else {
            ReadError::Failed(err.to_string())
        }
    })?;
    if object.info.size as u64 > max_bytes {
        return Err(ReadError::TooLarge(object.info.size as u64));
    }
    let mut bytes = Vec::new();
    object
        .take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|err| ReadError::Failed(err.to_string()))?;
    if bytes.len() as u64 > max_bytes {
        return Err(ReadError::TooLarge(bytes.len() as u64));
    }
    Ok(bytes)
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_lowercase_hex_of_the_right_length() {
        assert!(is_sha256_hex(&ModuleRef::for_bytes(b"x").sha256));
        assert!(!is_sha256_hex("abc"));
        assert!(!is_sha256_hex(&"G".repeat(64)));
        assert!(!is_sha256_hex(&"../".repeat(22)[..64]));
    }
}
