//! Agent configuration. `main` loads it with `apiary_bin_support::load_config`: built-in
//! defaults, then an optional TOML file, then `APIARY_*` environment variables (the systemd
//! unit's `Environment=` lines), each overriding the last.

use std::collections::BTreeMap;
use std::time::Duration;

use apiary_proto::DEFAULT_NATS_URL;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentConfig {
    /// `APIARY_NATS_URL`: the NATS server(s) to connect to, comma-separated.
    pub nats_url: String,
    /// `APIARY_NODE_ID`: this node's id; derived from the host name when absent.
    pub node_id: Option<String>,
    /// `APIARY_TOKEN`: the cluster join token.
    pub token: Option<String>,
    /// `APIARY_SLOTS`: tasks run at once; the number of CPU cores when absent.
    pub slots: Option<u32>,
    /// `APIARY_LABELS`: labels tasks can require, e.g. `{zone="attic"}`.
    pub labels: BTreeMap<String, String>,
    /// Compiled modules kept in memory.
    pub module_cache_entries: usize,
    /// How long to wait for the scheduler's answer to a registration or heartbeat.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The longest pause between registration attempts while no scheduler answers.
    #[serde(with = "humantime_serde")]
    pub max_register_backoff: Duration,
    /// How long a stopping agent waits for running tasks to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            nats_url: DEFAULT_NATS_URL.into(),
            node_id: None,
            token: None,
            slots: None,
            labels: BTreeMap::new(),
            module_cache_entries: 32,
            request_timeout: Duration::from_secs(2),
            max_register_backoff: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}
