//! The host APIs' other end: a granted guest's app-store and messaging calls, made on the bus
//! with the SDK's own app-store and messaging code, in the namespace of the task's
//! submission ([`Grants::namespace`](apiary_proto::message::Grants)).
//!
//! A guest's call suspends its run (wasmtime's async support: the run is a future, and the
//! guest's stack a fiber) until the SDK's answer comes, bounded by what is left of the run's
//! time (and by [`CALL_TIMEOUT`]), so a store that does not answer costs the guest an
//! `UNAVAILABLE`, never its node a slot beyond the task's timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apiary_proto::Namespace;
use apiary_proto::app::KeyPrefix;
use apiary_sdk::{Kv, KvErrorKind, PubSubErrorKind};
use bytes::Bytes;

use crate::sandbox::{AppHost, HostError, HostFuture, KvValue};

/// The longest one host call may take, whatever time its run has left.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Namespaces kept open at once; past this the cache starts again, which only costs a
/// namespace lookup on its next call.
const OPEN_NAMESPACES: usize = 64;

/// The agent's side of the host APIs: its connection, as an SDK client made on first use,
/// and the namespaces it has opened.
pub(crate) struct AppStore {
    nats: async_nats::Client,
    client: tokio::sync::OnceCell<apiary_sdk::Client>,
    namespaces: Mutex<HashMap<Namespace, Kv>>,
}

impl std::fmt::Debug for AppStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppStore").finish_non_exhaustive()
    }
}

impl AppStore {
    pub(crate) fn new(nats: async_nats::Client) -> Arc<Self> {
        Arc::new(Self {
            nats,
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
    /// `call`, within what is left of the run's time.
    fn bounded<'a, T: 'a>(
        &self,
        call: impl Future<Output = Result<T, HostError>> + Send + 'a,
    ) -> HostFuture<'a, T> {
        let budget = self
            .deadline
            .saturating_duration_since(Instant::now())
            .min(CALL_TIMEOUT);
        Box::pin(async move {
            tokio::time::timeout(budget, call)
                .await
                .unwrap_or(Err(HostError::Unavailable))
        })
    }
}

impl AppHost for RunHost {
    fn kv_get<'a>(&'a mut self, key: &'a str) -> HostFuture<'a, Option<KvValue>> {
        let (store, namespace) = (&self.store, &self.namespace);
        self.bounded(async move {
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

    fn kv_put<'a>(&'a mut self, key: &'a str, value: Bytes) -> HostFuture<'a, u64> {
        let (store, namespace) = (&self.store, &self.namespace);
        self.bounded(async move {
            let kv = store.kv(namespace).await?;
            kv.put(key, value).await.map_err(kv_error)
        })
    }

    fn kv_create<'a>(&'a mut self, key: &'a str, value: Bytes) -> HostFuture<'a, u64> {
        let (store, namespace) = (&self.store, &self.namespace);
        self.bounded(async move {
            let kv = store.kv(namespace).await?;
            kv.create(key, value).await.map_err(kv_error)
        })
    }

    fn kv_update<'a>(
        &'a mut self,
        key: &'a str,
        value: Bytes,
        revision: u64,
    ) -> HostFuture<'a, u64> {
        let (store, namespace) = (&self.store, &self.namespace);
        self.bounded(async move {
            let kv = store.kv(namespace).await?;
            kv.update(key, value, revision).await.map_err(kv_error)
        })
    }

    fn kv_delete<'a>(&'a mut self, key: &'a str) -> HostFuture<'a, ()> {
        let (store, namespace) = (&self.store, &self.namespace);
        self.bounded(async move {
            let kv = store.kv(namespace).await?;
            kv.delete(key).await.map_err(kv_error)
        })
    }

    fn kv_keys<'a>(&'a mut self, prefix: &'a KeyPrefix) -> HostFuture<'a, Vec<String>> {
        let (store, namespace) = (&self.store, &self.namespace);
        self.bounded(async move {
            let kv = store.kv(namespace).await?;
            kv.keys(&prefix.prefix).await.map_err(kv_error)
        })
    }

    fn publish<'a>(&'a mut self, topic: &'a str, payload: Bytes) -> HostFuture<'a, ()> {
        let (store, namespace) = (&self.store, &self.namespace);
        self.bounded(async move {
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
