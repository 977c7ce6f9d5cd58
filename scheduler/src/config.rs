//! Scheduler configuration. `main` loads it with `apiary_bin_support::load_config`: built-in
//! defaults, then an optional TOML file, then `APIARY_*` environment variables.

use std::time::Duration;

use apiary_proto::DEFAULT_NATS_URL;
use apiary_proto::subject;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// `APIARY_NATS_URL`: the NATS server(s) to connect to, comma-separated.
    pub nats_url: String,
    /// `APIARY_HEARTBEAT_INTERVAL`: how often agents heartbeat (told to them at registration).
    /// A node is shown offline two and a half intervals after its last heartbeat.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How many submitted tasks one replica works on at once (placement and dispatch).
    pub max_in_flight: usize,
    /// `APIARY_REPLY_SUBJECT_PREFIXES`: where results may be delivered. A task whose
    /// `reply_to` starts with none of these is refused. Add an application's custom inbox
    /// prefix here (with its trailing dot) if it sets one.
    pub reply_subject_prefixes: Vec<String>,
    /// `APIARY_MAX_ATTEMPTS`: how many times a task is placed before the loss of its nodes
    /// is reported as a `node_lost` failure. Each node lost while holding the task (crashed,
    /// or left without running it) costs one attempt.
    pub max_attempts: u32,
    /// `APIARY_NODE_BACKLOG`: how many of this replica's tasks may wait at a node beyond its
    /// slots; unset means as many as the node has slots. The rest waits in the shared queue,
    /// for whichever node has room first.
    pub node_backlog: Option<u32>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            nats_url: DEFAULT_NATS_URL.into(),
            heartbeat_interval: Duration::from_secs(5),
            max_in_flight: 256,
            reply_subject_prefixes: vec![subject::DEFAULT_REPLY_PREFIX.to_owned()],
            max_attempts: 3,
            node_backlog: None,
        }
    }
}
