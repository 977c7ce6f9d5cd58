//! A local apiary stack, the way `apiary dev` and the test harness start one: a private
//! `nats-server` configured by `broker-config/dev.conf`, the cluster's streams and buckets, a
//! join token for the agents to come, and the wait until a node has registered and is
//! online. The scheduler and agents themselves are started by the caller (in-process, as
//! `apiary dev` does, or behind relays, as the tests do), between [`watch_node`] and
//! awaiting what it returns.

use std::future::Future;

use anyhow::Context as _;
use apiary_broker::{BrokerOptions, DEV_CONFIG, NatsServer};
use apiary_proto::admin::TokenCreateRequest;
use apiary_proto::message::{NodeLiveness, NodeState};
use apiary_proto::topology::{self, NodeKey, Topology};
use apiary_proto::{Encoding, NodeId};
use futures::StreamExt as _;

/// A running server with the cluster's topology and a join token.
#[derive(Debug)]
pub struct Backbone {
    /// The server; tests stop and start it again.
    pub server: NatsServer,
    /// A join token with unlimited uses and no expiry, for every agent of this stack.
    pub token: String,
}

impl Backbone {
    /// Starts `nats-server` on `port` (0 picks a free one), sets up the cluster's streams
    /// and buckets, and mints a join token described as `purpose`.
    pub async fn start(port: u16, purpose: &str) -> anyhow::Result<Self> {
        Self::start_with(port, purpose, DEV_CONFIG.to_owned()).await
    }

    /// [`Backbone::start`] with the server configured by `config` instead of
    /// `broker-config/dev.conf`.
    pub async fn start_with(port: u16, purpose: &str, config: String) -> anyhow::Result<Self> {
        let server = NatsServer::start(BrokerOptions {
            port,
            config: Some(config),
        })
        .await
        .context("failed to start nats-server")?;
        let client = async_nats::connect(server.url())
            .await
            .context("failed to connect to the local server")?;
        let Topology { cluster, .. } = topology::ensure(&async_nats::jetstream::new(client))
            .await
            .context("failed to set up the cluster's streams and buckets")?;
        let token = apiary_scheduler::tokens::create(
            &cluster,
            &TokenCreateRequest {
                description: purpose.to_owned(),
                ttl_ms: None,
                max_uses: None,
            },
            apiary_proto::now_ms(),
        )
        .await
        .map_err(|err| anyhow::anyhow!("failed to create a join token: {err}"))?
        .token;
        Ok(Self { server, token })
    }

    /// The local server's configuration (`broker-config/dev.conf`); with `sync_always`, the
    /// server writes every JetStream message to disk before acknowledging it.
    pub fn server_config(sync_always: bool) -> String {
        if sync_always {
            DEV_CONFIG.replacen("jetstream {", "jetstream {\n    sync_interval: always", 1)
        } else {
            DEV_CONFIG.to_owned()
        }
    }

    pub fn url(&self) -> &str {
        self.server.url()
    }
}

/// Starts watching for `node` (any node when `None`) to register and then be online;
/// the returned future resolves with the node once it is. Only what happens from now on
/// counts, so a node restarting under an id that was online before must register again:
/// call this before starting its agent, then await the future.
pub async fn watch_node(
    url: &str,
    node: Option<&NodeId>,
) -> anyhow::Result<impl Future<Output = anyhow::Result<NodeId>> + Send + use<>> {
    let client = async_nats::connect(url)
        .await
        .context("failed to connect to the server")?;
    let nodes = async_nats::jetstream::new(client)
        .get_key_value(topology::NODES_BUCKET)
        .await
        .context("failed to open the node bucket")?;
    let mut changes = match node {
        Some(node) => {
            nodes
                .watch_many([topology::node_info_key(node), topology::node_live_key(node)])
                .await
        }
        None => nodes.watch_all().await,
    }
    .context("failed to watch the node bucket")?;
    Ok(async move {
        // The bucket's handle, and with it the connection, lives as long as the watch.
        let _nodes = nodes;
        // Nodes seen registering since the watch began.
        let mut registered = std::collections::HashSet::new();
        while let Some(entry) = changes.next().await {
            let entry = entry.context("failed to read the node bucket")?;
            match topology::parse_node_key(&entry.key) {
                Some(NodeKey::Info(id)) => {
                    registered.insert(id);
                }
                Some(NodeKey::Live(id)) if registered.contains(&id) => {
                    let live: NodeLiveness = Encoding::detect(None, &entry.value)
                        .decode(&entry.value)
                        .context("failed to read a node's liveness")?;
                    if live.state == NodeState::Active {
                        return Ok(id);
                    }
                }
                _ => {}
            }
        }
        anyhow::bail!("the node bucket's watch ended")
    })
}
