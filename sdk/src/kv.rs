//! The app store: a namespace's keys and values in JetStream KV ([`Client::kv`]).
//!
//! Each namespace is its own bucket (`APIARY_KV_<namespace>`), so one namespace cannot read,
//! list or watch another's keys, and keys are checked before they reach a subject (see
//! [`apiary_proto::app`]): a wildcard, an empty token or a stray character is an
//! [`KvErrorKind::InvalidKey`] error, never a subject that matches more than the key.

use std::collections::BTreeSet;

use apiary_proto::app::{self, KeyPrefix, NameError};
use apiary_proto::{Encoding, Namespace, headers, topology};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use apiary_proto::app::StoreSettings;

use crate::Client;
use crate::error::OpError;

/// An app-store operation that failed; [`KvError::kind`] says how.
pub type KvError = OpError<KvErrorKind>;

/// How an app-store operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvErrorKind {
    /// The namespace's name is not an identifier (`[A-Za-z0-9_-]`, at most 64).
    InvalidNamespace,
    /// The key or prefix is not dot-joined tokens of `[A-Za-z0-9_=/-]`.
    InvalidKey,
    /// No value under the key (or, from [`Client::kv_existing`], no such namespace).
    NotFound,
    /// `create` found the key already there.
    AlreadyExists,
    /// `update` was given a revision that is not the key's latest.
    Conflict,
    /// The value is larger than the namespace or the server takes.
    TooLarge,
    /// A typed helper could not encode or decode the value.
    Codec,
    /// The namespace's bucket could not be opened or created.
    Namespace,
    /// The server or the connection failed the operation.
    Transport,
}

fn invalid_key(err: NameError) -> KvError {
    KvError::with_source(KvErrorKind::InvalidKey, "invalid key", err)
}

fn transport(what: &str, err: impl std::error::Error + Send + Sync + 'static) -> KvError {
    KvError::with_source(KvErrorKind::Transport, format!("failed to {what}"), err)
}

/// What a change to a key was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvOperation {
    /// A value was written.
    Put,
    /// The value was deleted (its history stays).
    Delete,
    /// The key and its history were purged.
    Purge,
}

/// One value of a key, with its revision (the bucket's sequence number, which `update`
/// compares against).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// The value (empty for a delete or purge).
    pub value: Bytes,
    /// The revision: the bucket's sequence number of this write.
    pub revision: u64,
    /// When it was written (server time).
    pub created: time::OffsetDateTime,
    /// What the write was.
    pub operation: KvOperation,
}

impl From<kv::Entry> for KvEntry {
    fn from(entry: kv::Entry) -> Self {
        Self {
            key: entry.key,
            value: entry.value,
            revision: entry.revision,
            created: entry.created,
            operation: match entry.operation {
                kv::Operation::Put => KvOperation::Put,
                kv::Operation::Delete => KvOperation::Delete,
                kv::Operation::Purge => KvOperation::Purge,
            },
        }
    }
}

/// One page of [`Kv::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPage {
    /// The entries, in key order.
    pub entries: Vec<KvEntry>,
    /// The key to pass as `after` for the next page; `None` on the last page.
    pub next: Option<String>,
}

impl Client {
    /// Opens namespace `namespace` of the app store, creating it with the default settings
    /// ([`StoreSettings::default`]) if it does not exist yet.
    pub async fn kv(&self, namespace: &str) -> Result<Kv, KvError> {
        let namespace = parse_namespace(namespace)?;
        let js = self.jetstream();
        match js
            .get_key_value(topology::app_bucket_name(&namespace))
            .await
        {
            Ok(store) => return Kv::opened(self, namespace, store).await,
            Err(err) if err.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {}
            Err(err) => {
                return Err(KvError::with_source(
                    KvErrorKind::Namespace,
                    format!("failed to open namespace {namespace}"),
                    err,
                ));
            }
        }
        self.create_kv(namespace.as_str(), &StoreSettings::default())
            .await
    }

    /// Opens namespace `namespace` only if it exists; [`KvErrorKind::NotFound`] if not.
    /// For readers, which should not create a namespace by misspelling one.
    pub async fn kv_existing(&self, namespace: &str) -> Result<Kv, KvError> {
        let namespace = parse_namespace(namespace)?;
        match self
            .jetstream()
            .get_key_value(topology::app_bucket_name(&namespace))
            .await
        {
            Ok(store) => Kv::opened(self, namespace, store).await,
            Err(err) if err.kind() == jetstream::context::KeyValueErrorKind::GetBucket => {
                Err(KvError::with_source(
                    KvErrorKind::NotFound,
                    format!("no namespace {namespace}"),
                    err,
                ))
            }
            Err(err) => Err(KvError::with_source(
                KvErrorKind::Namespace,
                format!("failed to open namespace {namespace}"),
                err,
            )),
        }
    }

    /// Creates namespace `namespace` with `settings`, or opens it as it is if it exists.
    pub async fn create_kv(
        &self,
        namespace: &str,
        settings: &StoreSettings,
    ) -> Result<Kv, KvError> {
        let namespace = parse_namespace(namespace)?;
        let js = self.jetstream();
        let config = topology::app_bucket(&namespace, settings);
        let store = match js.create_key_value(config).await {
            Ok(store) => store,
            // Created by someone else a moment ago, perhaps with other settings: theirs stand.
            Err(_) => js
                .get_key_value(topology::app_bucket_name(&namespace))
                .await
                .map_err(|err| {
                    KvError::with_source(
                        KvErrorKind::Namespace,
                        format!("failed to create namespace {namespace}"),
                        err,
                    )
                })?,
        };
        Kv::opened(self, namespace, store).await
    }

    fn jetstream(&self) -> jetstream::Context {
        jetstream::new(self.nats().clone())
    }
}

fn parse_namespace(namespace: &str) -> Result<Namespace, KvError> {
    Namespace::new(namespace).map_err(|err| {
        KvError::with_source(KvErrorKind::InvalidNamespace, "invalid namespace", err)
    })
}

/// A namespace of the app store. Cheap to clone.
#[derive(Clone)]
pub struct Kv {
    namespace: Namespace,
    store: kv::Store,
    /// The largest value this namespace and the server take.
    max_value: usize,
}

impl Kv {
    async fn opened(
        client: &Client,
        namespace: Namespace,
        store: kv::Store,
    ) -> Result<Self, KvError> {
        let status = store
            .status()
            .await
            .map_err(|err| transport("read the namespace's settings", err))?;
        let server_max = client.nats().server_info().max_payload;
        let namespace_max = usize::try_from(status.info.config.max_message_size)
            .ok()
            .filter(|max| *max > 0)
            .unwrap_or(usize::MAX);
        Ok(Self {
            namespace,
            store,
            max_value: server_max.min(namespace_max),
        })
    }

    /// The namespace's name.
    pub fn namespace(&self) -> &str {
        self.namespace.as_str()
    }

    /// The value under `key`; [`KvErrorKind::NotFound`] if there is none.
    pub async fn get(&self, key: &str) -> Result<Bytes, KvError> {
        self.entry(key)
            .await?
            .map(|entry| entry.value)
            .ok_or_else(|| {
                KvError::new(KvErrorKind::NotFound, format!("no value under key {key:?}"))
            })
    }

    /// The latest entry of `key`, if it has a value.
    pub async fn entry(&self, key: &str) -> Result<Option<KvEntry>, KvError> {
        app::check_key(key).map_err(invalid_key)?;
        let entry = self
            .store
            .entry(key)
            .await
            .map_err(|err| transport("read a key", err))?;
        Ok(entry
            .filter(|entry| entry.operation == kv::Operation::Put)
            .map(KvEntry::from))
    }

    /// Whether `key` has a value.
    pub async fn exists(&self, key: &str) -> Result<bool, KvError> {
        Ok(self.entry(key).await?.is_some())
    }

    /// Sets `key` to `value`; returns the new revision.
    pub async fn put(&self, key: &str, value: impl Into<Bytes>) -> Result<u64, KvError> {
        let value = self.checked(key, value.into())?;
        self.store
            .put(key, value)
            .await
            .map_err(|err| transport("write a key", err))
    }

    /// Sets `key` to `value` only if it has no value; [`KvErrorKind::AlreadyExists`] if it
    /// has one.
    pub async fn create(&self, key: &str, value: impl Into<Bytes>) -> Result<u64, KvError> {
        let value = self.checked(key, value.into())?;
        self.store
            .create(key, value)
            .await
            .map_err(|err| match err.kind() {
                kv::CreateErrorKind::AlreadyExists => KvError::with_source(
                    KvErrorKind::AlreadyExists,
                    format!("key {key:?} already has a value"),
                    err,
                ),
                _ => transport("create a key", err),
            })
    }

    /// Sets `key` to `value` only if its latest revision is `revision` (compare-and-swap);
    /// [`KvErrorKind::Conflict`] if it has changed since.
    pub async fn update(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        revision: u64,
    ) -> Result<u64, KvError> {
        let value = self.checked(key, value.into())?;
        self.store
            .update(key, value, revision)
            .await
            .map_err(|err| match err.kind() {
                kv::UpdateErrorKind::WrongLastRevision => KvError::with_source(
                    KvErrorKind::Conflict,
                    format!("key {key:?} is no longer at revision {revision}"),
                    err,
                ),
                _ => transport("update a key", err),
            })
    }

    /// Deletes `key`'s value (its history stays, up to the namespace's depth).
    pub async fn delete(&self, key: &str) -> Result<(), KvError> {
        app::check_key(key).map_err(invalid_key)?;
        self.store
            .delete(key)
            .await
            .map_err(|err| transport("delete a key", err))
    }

    /// Deletes `key` and its whole history.
    pub async fn purge(&self, key: &str) -> Result<(), KvError> {
        app::check_key(key).map_err(invalid_key)?;
        self.store
            .purge(key)
            .await
            .map_err(|err| transport("purge a key", err))
    }

    /// Every value `key` still has, oldest first (as many as the namespace's history keeps),
    /// deletes included.
    pub async fn history(&self, key: &str) -> Result<Vec<KvEntry>, KvError> {
        app::check_key(key).map_err(invalid_key)?;
        let mut history = self
            .store
            .history(key)
            .await
            .map_err(|err| transport("read a key's history", err))?;
        let mut entries = Vec::new();
        while let Some(entry) = history.next().await {
            entries.push(KvEntry::from(
                entry.map_err(|err| transport("read a key's history", err))?,
            ));
        }
        Ok(entries)
    }

    /// The keys that have a value and start with `prefix` (`""` for all), in order.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, KvError> {
        let prefix = KeyPrefix::parse(prefix).map_err(invalid_key)?;
        Ok(self.latest(&prefix).await?.into_iter().collect())
    }

    /// Up to `limit` entries whose keys start with `prefix`, in key order, after key `after`
    /// (`None` for the first page). [`KvPage::next`] is `Some` while more keys follow.
    pub async fn list(
        &self,
        prefix: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<KvPage, KvError> {
        let keys = self.keys(prefix).await?;
        let mut remaining = keys
            .into_iter()
            .filter(|key| after.is_none_or(|after| key.as_str() > after))
            .peekable();
        let mut entries = Vec::new();
        while entries.len() < limit {
            let Some(key) = remaining.next() else { break };
            // Deleted since the keys were read: left out of the page.
            if let Some(entry) = self.entry(&key).await? {
                entries.push(entry);
            }
        }
        let next = match (remaining.peek(), entries.last()) {
            (Some(_), Some(last)) => Some(last.key.clone()),
            _ => None,
        };
        Ok(KvPage { entries, next })
    }

    /// Every change to keys starting with `prefix` from now on, as it happens.
    pub async fn watch(
        &self,
        prefix: &str,
    ) -> Result<impl Stream<Item = Result<KvEntry, KvError>> + Send + use<>, KvError> {
        let prefix = KeyPrefix::parse(prefix).map_err(invalid_key)?;
        let watch = self
            .store
            .watch(&prefix.filter)
            .await
            .map_err(|err| transport("watch keys", err))?;
        Ok(watch.filter_map(move |entry| {
            let entry = match entry {
                Ok(entry) if prefix.matches(&entry.key) => Some(Ok(KvEntry::from(entry))),
                Ok(_) => None,
                Err(err) => Some(Err(transport("watch keys", err))),
            };
            std::future::ready(entry)
        }))
    }

    /// The value under `key`, decoded from JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<T, KvError> {
        decode(Encoding::Json, &self.get(key).await?)
    }

    /// Sets `key` to `value` encoded as JSON.
    pub async fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<u64, KvError> {
        self.put(key, encode(Encoding::Json, value)?).await
    }

    /// The value under `key`, decoded from MessagePack.
    pub async fn get_msgpack<T: DeserializeOwned>(&self, key: &str) -> Result<T, KvError> {
        decode(Encoding::MsgPack, &self.get(key).await?)
    }

    /// Sets `key` to `value` encoded as MessagePack.
    pub async fn put_msgpack<T: Serialize>(&self, key: &str, value: &T) -> Result<u64, KvError> {
        self.put(key, encode(Encoding::MsgPack, value)?).await
    }

    /// Checks a key and a value before they are written.
    fn checked(&self, key: &str, value: Bytes) -> Result<Bytes, KvError> {
        app::check_key(key).map_err(invalid_key)?;
        if value.len() > self.max_value {
            return Err(KvError::new(
                KvErrorKind::TooLarge,
                format!(
                    "a value of {} bytes is larger than the {} bytes namespace {} takes",
                    value.len(),
                    self.max_value,
                    self.namespace
                ),
            ));
        }
        Ok(value)
    }

    /// The keys under `prefix` whose latest entry is a value (not a delete). Read with a
    /// short-lived consumer that delivers only the last message of each key, headers only,
    /// and ends once it has delivered what it had pending when it was made.
    async fn latest(&self, prefix: &KeyPrefix) -> Result<BTreeSet<String>, KvError> {
        let failed = |err: async_nats::Error| {
            KvError::with_source(
                KvErrorKind::Transport,
                "failed to list keys",
                std::io::Error::other(err),
            )
        };
        let consumer: jetstream::consumer::PullConsumer = self
            .store
            .stream
            .create_consumer(jetstream::consumer::pull::Config {
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                filter_subject: topology::app_key_subject(&self.namespace, &prefix.filter),
                headers_only: true,
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: std::time::Duration::from_secs(30),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|err| failed(err.into()))?;
        let mut pending = consumer.cached_info().num_pending;
        let mut keys = BTreeSet::new();
        while pending > 0 {
            let mut batch = consumer
                .fetch()
                .max_messages(usize::try_from(pending.min(1_000)).unwrap_or(1_000))
                .expires(std::time::Duration::from_secs(5))
                .messages()
                .await
                .map_err(|err| failed(err.into()))?;
            let mut got = 0;
            while let Some(message) = batch.next().await {
                let message = message.map_err(&failed)?;
                got += 1;
                pending = message.info().map_or(0, |info| info.pending);
                let Some(key) = topology::parse_app_key_subject(&self.namespace, &message.subject)
                else {
                    continue;
                };
                let deleted = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(headers::KV_OPERATION))
                    .is_some_and(|operation| {
                        [headers::KV_OPERATION_DELETE, headers::KV_OPERATION_PURGE]
                            .contains(&operation.as_str())
                    });
                if !deleted && prefix.matches(key) {
                    keys.insert(key.to_owned());
                }
            }
            if got == 0 {
                break;
            }
        }
        // Gone by itself after its inactive threshold anyway; deleting it now keeps the
        // server's consumer count down.
        let _ = self
            .store
            .stream
            .delete_consumer(&consumer.cached_info().name)
            .await;
        Ok(keys)
    }
}

fn encode<T: Serialize>(encoding: Encoding, value: &T) -> Result<Bytes, KvError> {
    encoding
        .encode(value)
        .map_err(|err| KvError::with_source(KvErrorKind::Codec, "failed to encode a value", err))
}

fn decode<T: DeserializeOwned>(encoding: Encoding, value: &[u8]) -> Result<T, KvError> {
    encoding
        .decode(value)
        .map_err(|err| KvError::with_source(KvErrorKind::Codec, "failed to decode a value", err))
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv")
            .field("namespace", &self.namespace)
            .field("max_value", &self.max_value)
            .finish_non_exhaustive()
    }
}
