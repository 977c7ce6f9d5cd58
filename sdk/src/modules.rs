//! The cluster's module store ([`Client::modules`]): WebAssembly modules named by the
//! SHA-256 of their bytes, in the object store `APIARY_MODULES`.

use std::collections::BTreeMap;

use apiary_proto::message::ModuleRef;
use async_nats::jetstream::object_store::{self, InfoErrorKind};
use bytes::Bytes;
use futures::StreamExt as _;
use tokio::io::AsyncReadExt as _;

use crate::error::OpError;
use crate::{Client, lock};

/// A module-store operation that failed; [`ModuleError::kind`] says how.
pub type ModuleError = OpError<ModuleErrorKind>;

/// How a module-store operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModuleErrorKind {
    /// The digest is not 64 lowercase hex characters.
    InvalidDigest,
    /// No module under that digest.
    NotFound,
    /// The bytes stored under the digest are not the module it names.
    Corrupt,
    /// The store could not be reached or set up, or failed the operation.
    Store,
}

/// How long a client trusts that a module it found in the store is still there. Without a
/// bound, a module removed by someone else (`apiary module rm`) would never be uploaded again
/// by a long-lived client, and its tasks would fail with `module_unavailable`; with it, that
/// lasts at most this long, for one store lookup per module per period.
pub const UPLOAD_MEMORY: std::time::Duration = std::time::Duration::from_secs(60);

/// A module in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Its name: the lowercase hex SHA-256 of its bytes.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was stored (ms since the Unix epoch, server time).
    pub stored_at_ms: u64,
}

fn store_error(what: &str, err: impl std::error::Error + Send + Sync + 'static) -> ModuleError {
    ModuleError::with_source(ModuleErrorKind::Store, format!("failed to {what}"), err)
}

fn not_found(module: &ModuleRef) -> ModuleError {
    ModuleError::new(
        ModuleErrorKind::NotFound,
        format!("no module {}", module.sha256),
    )
}

/// Checks a digest typed by a person and makes it a reference.
pub fn module_ref(sha256: &str) -> Result<ModuleRef, ModuleError> {
    let reference = ModuleRef {
        sha256: sha256.to_owned(),
        size: 0,
    };
    let valid = sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && reference.object_store_digest().is_some();
    if !valid {
        return Err(ModuleError::new(
            ModuleErrorKind::InvalidDigest,
            format!("{sha256:?} is not a module digest (64 lowercase hex characters)"),
        ));
    }
    Ok(reference)
}

impl Client {
    /// The cluster's module store.
    pub fn modules(&self) -> Modules {
        Modules {
            client: self.clone(),
        }
    }
}

/// The cluster's module store ([`Client::modules`]).
#[derive(Clone, Debug)]
pub struct Modules {
    client: Client,
}

impl Modules {
    async fn store(&self) -> Result<&object_store::ObjectStore, ModuleError> {
        self.client
            .topology()
            .await
            .map(|topology| &topology.modules)
            .map_err(|err| store_error("open the module store", err))
    }

    /// Stores `module` unless the store already has it, and returns its reference (its
    /// digest and size). Bytes found under the module's name that are not the module (a
    /// botched hand upload) are replaced.
    pub async fn put(&self, module: &[u8]) -> Result<ModuleRef, ModuleError> {
        let reference = ModuleRef::for_bytes(module);
        let known = lock(&self.client.inner.uploaded)
            .get(&reference.sha256)
            .is_some_and(|seen| seen.elapsed() < UPLOAD_MEMORY);
        if known {
            return Ok(reference);
        }
        let store = self.store().await?;
        let present = match store.info(&reference.sha256).await {
            // The object store records the digest of what it holds, so a matching digest
            // means these very bytes are there.
            Ok(info) => info.digest == reference.object_store_digest(),
            Err(err) if err.kind() == InfoErrorKind::NotFound => false,
            Err(err) => return Err(store_error("look up a module", err)),
        };
        if !present {
            let mut reader = module;
            store
                .put(reference.sha256.as_str(), &mut reader)
                .await
                .map_err(|err| store_error("store a module", err))?;
            tracing::debug!(module = %reference.sha256, size = module.len(), "module uploaded");
        }
        lock(&self.client.inner.uploaded)
            .insert(reference.sha256.clone(), std::time::Instant::now());
        Ok(reference)
    }

    /// Stores `artifact`, `module` precompiled for `platform` (`x86_64-linux`,
    /// `aarch64-linux`, …), where runtime-only agents of that platform fetch it
    /// (`APIARY_ARTIFACTS`, `<sha256>.<platform>`). Only operators may write there on a
    /// deployment that follows broker-config/production.conf.example: agents load it as
    /// machine code.
    pub async fn put_precompiled(
        &self,
        module: &ModuleRef,
        platform: &str,
        artifact: &[u8],
    ) -> Result<(), ModuleError> {
        let store = self
            .client
            .topology()
            .await
            .map(|topology| &topology.artifacts)
            .map_err(|err| store_error("open the precompiled module store", err))?;
        let mut reader = artifact;
        store
            .put(
                apiary_proto::topology::artifact_name(&module.sha256, platform).as_str(),
                &mut reader,
            )
            .await
            .map_err(|err| store_error("store a precompiled module", err))?;
        Ok(())
    }

    /// The module's bytes, checked against its digest.
    pub async fn get(&self, module: &ModuleRef) -> Result<Bytes, ModuleError> {
        let store = self.store().await?;
        let mut object = store.get(module.sha256.as_str()).await.map_err(|err| {
            if err.kind() == object_store::GetErrorKind::NotFound {
                not_found(module)
            } else {
                store_error("fetch a module", err)
            }
        })?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|err| store_error("read a module", err))?;
        if !module.matches(&bytes) {
            return Err(ModuleError::new(
                ModuleErrorKind::Corrupt,
                format!("the bytes stored as {} are not that module", module.sha256),
            ));
        }
        Ok(bytes.into())
    }

    /// Every module in the store, by digest.
    pub async fn ls(&self) -> Result<Vec<ModuleInfo>, ModuleError> {
        let store = self.store().await?;
        let mut list = store
            .list()
            .await
            .map_err(|err| store_error("list modules", err))?;
        let mut modules = BTreeMap::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(|err| store_error("list modules", err))?;
            if info.deleted {
                continue;
            }
            let stored_at_ms = u64::try_from(
                info.modified
                    .map_or(0, |at| at.unix_timestamp_nanos() / 1_000_000),
            )
            .unwrap_or(0);
            modules.insert(
                info.name.clone(),
                ModuleInfo {
                    sha256: info.name,
                    size: info.size as u64,
                    stored_at_ms,
                },
            );
        }
        Ok(modules.into_values().collect())
    }

    /// Removes a module from the store. Tasks already submitted with it fail with
    /// `module_unavailable` on nodes that have not cached it.
    pub async fn rm(&self, module: &ModuleRef) -> Result<(), ModuleError> {
        let store = self.store().await?;
        // Deleting an absent object succeeds; asking first tells the caller it was not there.
        match store.info(&module.sha256).await {
            Ok(info) if !info.deleted => {}
            Ok(_) => return Err(not_found(module)),
            Err(err) if err.kind() == InfoErrorKind::NotFound => return Err(not_found(module)),
            Err(err) => return Err(store_error("look up a module", err)),
        }
        store
            .delete(module.sha256.as_str())
            .await
            .map_err(|err| store_error("remove a module", err))?;
        lock(&self.client.inner.uploaded).remove(&module.sha256);
        Ok(())
    }
}
