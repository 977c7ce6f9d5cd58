//! The host APIs' other end: a granted guest's app-store and messaging calls, made on the bus
//! with the SDK's own app-store and messaging code, in the namespace of the task's
//! submission ([`Grants::namespace`](apiary_proto::message::Grants)).
//!
//! Guest calls come from the run's blocking thread; each is run on the agent's async runtime
//! and waited for, bounded by what is left of the run's time (and by [`CALL_TIMEOUT`]), so a
//! store that does not answer costs the guest an `UNAVAILABLE`, never its node a slot beyond
//! the task's timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiary_proto::Namespace;
use apiary_proto::app::KeyPrefix;
use apiary_sdk::{Kv, KvErrorKind, PubSubErrorKind};
use bytes::Bytes;
use tokio::runtime::Handle;

use crate::sandbox::{AppHost, HostError, KvValue};

/// The longest one host call may take, whatever time its run has left.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Namespaces kept open at once; past this the cache starts again, which only costs a
/// namespace lookup on its next call.
const OPEN_NAMESPACES: usize = 64;

/// The agent's side of the host APIs: its connection, as an SDK client made on first use,
/// and the namespaces it has opened.
pub(crate) struct AppStore {
    nats: async_nats::Client,
    runtime: Handle,
    client: tokio::sync::OnceCell<apiary_sdk::Client>,
    namespaces: Mutex<HashMap<Namespace, Kv>>,
}

impl std::fmt::Debug for AppStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppStore").finish_non_exhaustive()
    }
}

impl AppStore {
    /// Must be made on the agent's runtime.
    pub(crate) fn new(nats: async_nats::Client) -> Arc<Self> {
        Arc::new(Self {
            nats,
            runtime: Handle::current(),
            client: tokio::sync::OnceCell::new(),
            namespaces: Mutex::default(),
        })
    }

    /// What one run's calls go to: `namespace`, until `deadline`.
    pub(crate) fn for_run(
        self: &Arc<Self>,
        namespace: Namespace,
        deadline: Instant,
    ) -> Box<dyn AppHost> {
        Box::new(RunHost {
            store: self.clone(),
            namespace,
            deadline,
        })
    }

    async fn client(&self) -> Result<&apiary_sdk::Client, HostError> {
        self.client
            .get_or_try_init(|| apiary_sdk::Client::from_nats(self.nats.clone()))
            .await
            .map_err(|err| {
                tracing::warn!(error = %err, "cannot serve the guest host APIs");
                HostError::Unavailable
            })
    }

    async fn kv(&self, namespace: &Namespace) -> Result<Kv, HostError> {
        if let Some(kv) = self.lock().get(namespace) {
            return Ok(kv.clone());
        }
        let kv = self
            .client()
            .await?
            .kv(namespace.as_str())
            .await
            .map_err(kv_error)?;
        let mut namespaces = self.lock();
        if namespaces.len() >= OPEN_NAMESPACES {
            namespaces.clear();
        }
        namespaces.insert(namespace.clone(), kv.clone());
        Ok(kv)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Namespace, Kv>> {
        // Every critical section is one lookup or insert, which cannot panic halfway.
        self.namespaces
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One run's host: its namespace and deadline.
struct RunHost {
    store: Arc<AppStore>,
    namespace: Namespace,
    deadline: Instant,
}

impl RunHost {
    /// Runs `call` on the agent's runtime and waits for it, within the run's time.
    fn block<T>(
        &self,
        call: impl AsyncFnOnce(&AppStore, &Namespace) -> Result<T, HostError>,
    ) -> Result<T, HostError> {
        let budget = self
            .deadline
            .saturating_duration_since(Instant::now())
            .min(CALL_TIMEOUT);
        // The run's thread is a blocking-pool thread, outside any task: blocking it on the
        // runtime is what it is for.
        self.store.runtime.block_on(async {
            tokio::time::timeout(budget, call(&self.store, &self.namespace))
                .await
                .unwrap_or(Err(HostError::Unavailable))
        })
    }
}

impl AppHost for RunHost {
    fn kv_get(&mut self, key: &str) -> Result<Option<KvValue>, HostError> {
        self.block(async |store, namespace| {
            let entry = store
                .kv(namespace)
                .await?
                .entry(key)
                .await
                .map_err(kv_error)?;
            Ok(entry.map(|entry| KvValue {
                value: entry.value,
                revision: entry.revision,
            }))
        })
    }

    fn kv_put(&mut self, key: &str, value: Bytes) -> Result<u64, HostError> {
        self.block(async |store, namespace| {
            store
                .kv(namespace)
                .await?
                .put(key, value)
                .await
                .map_err(kv_error)
        })
    }

    fn kv_create(&mut self, key: &str, value: Bytes) -> Result<u64, HostError> {
        self.block(async |store, namespace| {
            store
                .kv(namespace)
                .await?
                .create(key, value)
                .await
                .map_err(kv_error)
        })
    }

    fn kv_update(&mut self, key: &str, value: Bytes, revision: u64) -> Result<u64, HostError> {
        self.block(async |store, namespace| {
            let kv = store.kv(namespace).await?;
            kv.update(key, value, revision).await.map_err(kv_error)
        })
    }

    fn kv_delete(&mut self, key: &str) -> Result<(), HostError> {
        self.block(async |store, namespace| {
            store
                .kv(namespace)
                .await?
                .delete(key)
                .await
                .map_err(kv_error)
        })
    }

    fn kv_keys(&mut self, prefix: &KeyPrefix) -> Result<Vec<String>, HostError> {
        self.block(async |store, namespace| {
            let kv = store.kv(namespace).await?;
            kv.keys(&prefix.prefix).await.map_err(kv_error)
        })
    }

    fn publish(&mut self, topic: &str, payload: Bytes) -> Result<(), HostError> {
        self.block(async |store, namespace| {
            let pubsub = store
                .client()
                .await?
                .pubsub(namespace.as_str())
                .map_err(pubsub_error)?;
            pubsub.publish(topic, payload).await.map_err(pubsub_error)
        })
    }
}

fn kv_error(err: apiary_sdk::KvError) -> HostError {
    match err.kind() {
        KvErrorKind::NotFound => HostError::NotFound,
        KvErrorKind::AlreadyExists | KvErrorKind::Conflict => HostError::Conflict,
        KvErrorKind::InvalidKey | KvErrorKind::InvalidNamespace => HostError::InvalidName,
        KvErrorKind::TooLarge => HostError::TooLarge,
        _ => {
            tracing::debug!(error = %err, "a guest's app-store call failed");
            HostError::Unavailable
        }
    }
}

fn pubsub_error(err: apiary_sdk::PubSubError) -> HostError {
    match err.kind() {
        PubSubErrorKind::InvalidTopic | PubSubErrorKind::InvalidNamespace => HostError::InvalidName,
        PubSubErrorKind::TooLarge => HostError::TooLarge,
        _ => {
            tracing::debug!(error = %err, "a guest's publish failed");
            HostError::Unavailable
        }
    }
}
