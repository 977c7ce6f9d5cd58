//! One worker process of the load generator: a share of the simulated fleet. Each simulated
//! node has its own node key and speaks the agent's membership protocol exactly as
//! `apiary-agent` does (`apiary_proto::rpc::request_signed` with the agent's message types):
//! it registers with the join token, then heartbeats every interval, registering again when
//! told it is unknown. There is no WebAssembly runner: these nodes take no work.
//!
//! Many nodes share one connection (a real fleet has one per node), so the server sees fewer
//! connections than it would; every register and heartbeat is still its own signed request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apiary_proto::admin::SecretToken;
use apiary_proto::identity::{self, KeyPair};
use apiary_proto::message::{
    Heartbeat, HeartbeatReply, NodeInfo, NodeMetrics, NodeState, RegisterReply, RegisterRequest,
};
use apiary_proto::rpc::{self, RequestError};
use apiary_proto::subject::{self, NodeVerb};
use apiary_proto::{NodeId, now_ms};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The agent's own default request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// What a worker was asked to do.
#[derive(Clone, Debug)]
pub struct FleetPlan {
    pub url: String,
    pub token: String,
    /// Node ids are `scale-<index>` for indices `first .. first + count`.
    pub first: usize,
    pub count: usize,
    pub connections: usize,
    pub in_flight: usize,
    pub interval: Duration,
    /// How long the nodes heartbeat once all of them have registered.
    pub steady: Duration,
}

/// What a worker measured, printed as one JSON line on its stdout.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FleetReport {
    pub nodes: usize,
    /// Wall-clock epoch milliseconds when registering started and ended.
    pub registering_from_ms: u64,
    pub registering_until_ms: u64,
    /// Registrations that had to be sent again (no answer in time, or refused and retried).
    pub registration_retries: u64,
    /// Each accepted registration's round trip, in microseconds.
    pub register_us: Vec<u64>,
    pub heartbeats: u64,
    /// Each answered heartbeat's round trip, in microseconds.
    pub heartbeat_us: Vec<u64>,
    /// Heartbeats that got no answer within the agent's timeout.
    pub heartbeats_failed: u64,
    /// Heartbeats answered "unknown node", after which the node registered again.
    pub reregistrations: u64,
}

struct SimulatedNode {
    key: KeyPair,
    info: NodeInfo,
}

impl SimulatedNode {
    fn new(index: usize) -> Self {
        let key = identity::generate();
        let node_id = NodeId::new(node_name(index)).expect("a valid node id");
        let info = NodeInfo {
            node_id: node_id.clone(),
            hostname: node_id.to_string(),
            arch: std::env::consts::ARCH.to_owned(),
            os: std::env::consts::OS.to_owned(),
            cpu_cores: 4,
            cpu_model: String::new(),
            memory_bytes: 4 << 30,
            slots: 4,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            labels: Default::default(),
            incarnation: nuid::next().to_string(),
            public_key: key.public_key(),
            inventory: Default::default(),
            roles: Default::default(),
        };
        Self { key, info }
    }

    async fn register(
        &self,
        client: &async_nats::Client,
        token: &str,
    ) -> Result<RegisterReply, RequestError> {
        let request = RegisterRequest {
            node: self.info.clone(),
            token: Some(SecretToken::from(token.to_owned())),
        };
        rpc::request_signed(
            client,
            subject::node(&self.info.node_id, NodeVerb::Register),
            &request,
            &self.key,
            REQUEST_TIMEOUT,
        )
        .await
    }

    async fn heartbeat(
        &self,
        client: &async_nats::Client,
        seq: u64,
    ) -> Result<HeartbeatReply, RequestError> {
        let heartbeat = Heartbeat {
            node_id: self.info.node_id.clone(),
            seq,
            state: NodeState::Active,
            metrics: NodeMetrics {
                slots: self.info.slots,
                ..NodeMetrics::default()
            },
            incarnation: self.info.incarnation.clone(),
        };
        rpc::request_signed(
            client,
            subject::node(&self.info.node_id, NodeVerb::Heartbeat),
            &heartbeat,
            &self.key,
            REQUEST_TIMEOUT,
        )
        .await
    }
}

/// The node id of simulated node `index`.
pub fn node_name(index: usize) -> String {
    format!("scale-{index}")
}

#[derive(Default)]
struct Tally {
    registration_retries: AtomicU64,
    heartbeats_failed: AtomicU64,
    reregistrations: AtomicU64,
    register_us: Mutex<Vec<u64>>,
    heartbeat_us: Mutex<Vec<u64>>,
}

/// Registers every node of the plan, then heartbeats them all for the steady period, and
/// reports what it measured.
pub async fn run(plan: FleetPlan) -> anyhow::Result<FleetReport> {
    let mut clients = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections.max(1) {
        clients.push(
            async_nats::ConnectOptions::new()
                .name("apiary-scale")
                .connect(plan.url.as_str())
                .await?,
        );
    }
    let nodes: Vec<Arc<SimulatedNode>> = (plan.first..plan.first + plan.count)
        .map(|index| Arc::new(SimulatedNode::new(index)))
        .collect();
    let tally = Arc::new(Tally::default());

    let registering_from_ms = now_ms();
    futures::stream::iter(nodes.iter().enumerate())
        .for_each_concurrent(plan.in_flight.max(1), |(index, node)| {
            let client = &clients[index % clients.len()];
            let tally = &tally;
            let token = &plan.token;
            async move { register_until_accepted(node, client, token, tally).await }
        })
        .await;
    let registering_until_ms = now_ms();
    // The driver starts its steady-state clock on this line.
    println!("registered");

    // Each node heartbeats on its own phase within the interval, as a fleet whose agents
    // started at different moments does.
    let steady_until = Instant::now() + plan.steady;
    let mut beating = tokio::task::JoinSet::new();
    for (index, node) in nodes.iter().enumerate() {
        let node = node.clone();
        let client = clients[index % clients.len()].clone();
        let tally = tally.clone();
        let token = plan.token.clone();
        let phase = plan
            .interval
            .mul_f64(index as f64 / plan.count.max(1) as f64);
        let interval = plan.interval;
        beating.spawn(async move {
            let mut ticker = tokio::time::interval_at(Instant::now() + phase, interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq = 0;
            let mut sent = 0u64;
            loop {
                let tick = ticker.tick().await;
                if tick >= steady_until {
                    return sent;
                }
                seq += 1;
                sent += 1;
                let started = Instant::now();
                match node.heartbeat(&client, seq).await {
                    Ok(reply) => {
                        let took = micros(started.elapsed());
                        tally.heartbeat_us.lock().await.push(took);
                        if !reply.registered {
                            tally.reregistrations.fetch_add(1, Ordering::Relaxed);
                            register_until_accepted(&node, &client, &token, &tally).await;
                        }
                    }
                    Err(_) => {
                        tally.heartbeats_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let mut heartbeats = 0;
    while let Some(sent) = beating.join_next().await {
        heartbeats += sent?;
    }
    let register_us = std::mem::take(&mut *tally.register_us.lock().await);
    let heartbeat_us = std::mem::take(&mut *tally.heartbeat_us.lock().await);
    Ok(FleetReport {
        nodes: plan.count,
        registering_from_ms,
        registering_until_ms,
        registration_retries: tally.registration_retries.load(Ordering::Relaxed),
        register_us,
        heartbeats,
        heartbeat_us,
        heartbeats_failed: tally.heartbeats_failed.load(Ordering::Relaxed),
        reregistrations: tally.reregistrations.load(Ordering::Relaxed),
    })
}

async fn register_until_accepted(
    node: &SimulatedNode,
    client: &async_nats::Client,
    token: &str,
    tally: &Tally,
) {
    loop {
        let started = Instant::now();
        match node.register(client, token).await {
            Ok(_) => {
                tally
                    .register_us
                    .lock()
                    .await
                    .push(micros(started.elapsed()));
                return;
            }
            Err(err) => {
                tally.registration_retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(node_id = %node.info.node_id, error = %err, "registration failed; retrying");
                // As the agent does, after a short pause.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
