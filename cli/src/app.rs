//! `apiary kv …`, `apiary pub` and `apiary sub`: the app store and app messaging of a
//! namespace, writing to given writers so that the tests run the same code.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use apiary_proto::Payload;
use apiary_sdk::{Client, KvEntry, KvOperation, TopicMessage};
use bytes::Bytes;
use clap::Subcommand;
use futures::StreamExt as _;

use crate::output;

/// `apiary kv …`.
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Print a key's value, as it is.
    Get {
        namespace: String,
        key: String,
        /// Print the entry (value, revision, time) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set a key's value: the argument, --file, or stdin.
    Put(ValueArgs),
    /// Set a key's value only if it has none.
    Create(ValueArgs),
    /// Set a key's value only if its latest revision is --revision (compare-and-swap).
    Update {
        #[command(flatten)]
        value: ValueArgs,
        /// The revision the key must still be at.
        #[arg(long)]
        revision: u64,
    },
    /// Delete a key's value (--purge: and its history).
    Del {
        namespace: String,
        key: String,
        #[arg(long)]
        purge: bool,
    },
    /// List keys, optionally under a prefix; --limit pages through them.
    Ls {
        namespace: String,
        /// Keys starting with this (`users.` for whole tokens, `us` part-way).
        prefix: Option<String>,
        /// At most this many entries, with values (the last key is the cursor for --after).
        #[arg(long)]
        limit: Option<usize>,
        /// Start after this key.
        #[arg(long)]
        after: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print changes to keys under a prefix as they happen.
    Watch {
        namespace: String,
        prefix: Option<String>,
        /// Exit after this many changes.
        #[arg(long)]
        count: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Print the values a key has had, oldest first.
    History {
        namespace: String,
        key: String,
        #[arg(long)]
        json: bool,
    },
}

/// A namespace, a key, and a value from the argument, a file or stdin.
#[derive(Debug, clap::Args)]
pub struct ValueArgs {
    pub namespace: String,
    pub key: String,
    /// The value; without it (and without --file) stdin is read.
    pub value: Option<String>,
    /// Read the value from this file.
    #[arg(long, conflicts_with = "value")]
    pub file: Option<PathBuf>,
}

impl ValueArgs {
    fn read(&self, stdin: &mut impl std::io::Read) -> anyhow::Result<Bytes> {
        match (&self.value, &self.file) {
            (Some(value), _) => Ok(Bytes::from(value.clone())),
            (None, Some(path)) => std::fs::read(path)
                .map(Bytes::from)
                .with_context(|| format!("failed to read {}", path.display())),
            (None, None) => {
                let mut buffer = Vec::new();
                stdin
                    .read_to_end(&mut buffer)
                    .context("failed to read the value from stdin")?;
                Ok(buffer.into())
            }
        }
    }
}

/// Runs `apiary kv …`.
pub async fn kv(
    client: &Client,
    command: KvCommand,
    stdin: &mut impl std::io::Read,
    out: &mut impl Write,
    notice: &mut impl Write,
) -> anyhow::Result<()> {
    match command {
        KvCommand::Get {
            namespace,
            key,
            json,
        } => {
            let store = client.kv_existing(&namespace).await?;
            if json {
                let entry = store
                    .entry(&key)
                    .await?
                    .with_context(|| format!("no value under key {key:?} in {namespace}"))?;
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&entry_json(&entry))?
                )?;
            } else {
                out.write_all(&store.get(&key).await?)?;
            }
        }
        KvCommand::Put(args) => {
            let value = args.read(stdin)?;
            let revision = client
                .kv(&args.namespace)
                .await?
                .put(&args.key, value)
                .await?;
            writeln!(out, "{revision}")?;
        }
        KvCommand::Create(args) => {
            let value = args.read(stdin)?;
            let revision = client
                .kv(&args.namespace)
                .await?
                .create(&args.key, value)
                .await?;
            writeln!(out, "{revision}")?;
        }
        KvCommand::Update { value, revision } => {
            let bytes = value.read(stdin)?;
            let revision = client
                .kv(&value.namespace)
                .await?
                .update(&value.key, bytes, revision)
                .await?;
            writeln!(out, "{revision}")?;
        }
        KvCommand::Del {
            namespace,
            key,
            purge,
        } => {
            let store = client.kv_existing(&namespace).await?;
            if purge {
                store.purge(&key).await?;
            } else {
                store.delete(&key).await?;
            }
        }
        KvCommand::Ls {
            namespace,
            prefix,
            limit,
            after,
            json,
        } => {
            let store = client.kv_existing(&namespace).await?;
            let prefix = prefix.unwrap_or_default();
            match limit {
                Some(limit) => {
                    let page = store.list(&prefix, limit, after.as_deref()).await?;
                    if json {
                        let entries: Vec<_> = page.entries.iter().map(entry_json).collect();
                        let page = serde_json::json!({"entries": entries, "next": page.next});
                        writeln!(out, "{}", serde_json::to_string_pretty(&page)?)?;
                    } else {
                        let rows = page.entries.iter().map(|entry| {
                            vec![
                                entry.key.clone(),
                                entry.revision.to_string(),
                                String::from_utf8_lossy(&entry.value).into_owned(),
                            ]
                        });
                        writeln!(
                            out,
                            "{}",
                            output::table(&["KEY", "REVISION", "VALUE"], rows)
                        )?;
                        if let Some(next) = page.next {
                            writeln!(out, "more: --after {next}")?;
                        }
                    }
                }
                None => {
                    let keys: Vec<String> = store
                        .keys(&prefix)
                        .await?
                        .into_iter()
                        .filter(|key| after.as_deref().is_none_or(|after| key.as_str() > after))
                        .collect();
                    if json {
                        writeln!(out, "{}", serde_json::to_string_pretty(&keys)?)?;
                    } else {
                        for key in keys {
                            writeln!(out, "{key}")?;
                        }
                    }
                }
            }
        }
        KvCommand::Watch {
            namespace,
            prefix,
            count,
            json,
        } => {
            let store = client.kv_existing(&namespace).await?;
            let prefix = prefix.unwrap_or_default();
            let mut changes = std::pin::pin!(store.watch(&prefix).await?);
            // As `sub` does: from this line on, every change is printed.
            writeln!(
                notice,
                "watching keys under {prefix:?} in namespace {namespace}"
            )?;
            notice.flush()?;
            let mut seen = 0;
            while count.is_none_or(|count| seen < count) {
                let Some(change) = changes.next().await else {
                    break;
                };
                let change = change?;
                if json {
                    writeln!(out, "{}", serde_json::to_string(&entry_json(&change))?)?;
                } else {
                    writeln!(
                        out,
                        "{} {} {}",
                        operation_name(change.operation),
                        change.key,
                        String::from_utf8_lossy(&change.value)
                    )?;
                }
                out.flush()?;
                seen += 1;
            }
        }
        KvCommand::History {
            namespace,
            key,
            json,
        } => {
            let history = client.kv_existing(&namespace).await?.history(&key).await?;
            if json {
                let entries: Vec<_> = history.iter().map(entry_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&entries)?)?;
            } else {
                let rows = history.iter().map(|entry| {
                    vec![
                        entry.revision.to_string(),
                        operation_name(entry.operation).to_owned(),
                        output::time_ago(
                            u64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000)
                                .unwrap_or(0),
                            apiary_proto::now_ms(),
                        ),
                        String::from_utf8_lossy(&entry.value).into_owned(),
                    ]
                });
                writeln!(
                    out,
                    "{}",
                    output::table(&["REVISION", "OP", "WRITTEN", "VALUE"], rows)
                )?;
            }
        }
    }
    Ok(())
}

/// Runs `apiary pub`.
pub async fn publish(
    client: &Client,
    namespace: &str,
    topic: &str,
    message: Bytes,
) -> anyhow::Result<()> {
    let pubsub = client.pubsub(namespace)?;
    pubsub.publish(topic, message).await?;
    // Published is not sent: flush, so that the message has left before the process exits.
    client
        .nats()
        .flush()
        .await
        .context("failed to send the message")?;
    Ok(())
}

/// Runs `apiary sub`: prints each message on topics matching `filter` (its payload, or with
/// `json` one JSON object per line with its topic), and returns after `count` if given.
/// Once the server has the subscription it says so on `notice` (stderr), so that a person or
/// a script knows that what is published from then on will be printed.
pub async fn subscribe(
    client: &Client,
    namespace: &str,
    filter: &str,
    count: Option<usize>,
    json: bool,
    out: &mut impl Write,
    notice: &mut impl Write,
) -> anyhow::Result<()> {
    let pubsub = client.pubsub(namespace)?;
    let mut messages = pubsub.subscribe(filter).await?;
    writeln!(notice, "listening on {filter} in namespace {namespace}")?;
    notice.flush()?;
    let mut seen = 0;
    while count.is_none_or(|count| seen < count) {
        let Some(message) = messages.next().await else {
            break;
        };
        print_message(&message, json, out)?;
        seen += 1;
    }
    Ok(())
}

fn print_message(message: &TopicMessage, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        let line = serde_json::json!({
            "topic": message.topic,
            "payload": Payload(message.payload.clone()),
        });
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
    } else {
        out.write_all(&message.payload)?;
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}

fn operation_name(operation: KvOperation) -> &'static str {
    match operation {
        KvOperation::Put => "PUT",
        KvOperation::Delete => "DEL",
        KvOperation::Purge => "PURGE",
    }
}

/// An entry as JSON: the value as a string when it is UTF-8, else `{"base64": …}`.
fn entry_json(entry: &KvEntry) -> serde_json::Value {
    serde_json::json!({
        "key": entry.key,
        "value": Payload(entry.value.clone()),
        "revision": entry.revision,
        "created_ms": entry.created.unix_timestamp_nanos() / 1_000_000,
        "operation": operation_name(entry.operation),
    })
}
