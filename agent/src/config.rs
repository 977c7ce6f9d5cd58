//! Agent configuration. `main` loads it with `apiary_bin_support::load_config`: built-in
//! defaults, then an optional TOML file, then `APIARY_*` environment variables (the systemd
//! unit's `Environment=` lines), each overriding the last.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use apiary_proto::DEFAULT_NATS_URL;
use apiary_proto::message::{Limits, TaskError, TaskErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentConfig {
    /// `APIARY_NATS_URL`: the NATS server(s) to connect to, comma-separated.
    pub nats_url: String,
    /// `APIARY_NODE_ID`: this node's id; derived from the host name when absent.
    pub node_id: Option<String>,
    /// `APIARY_STATE_DIR`: where the node key and the offline outbox are kept (see
    /// [`crate::state`]); `/var/lib/apiary` under systemd, a per-user directory otherwise.
    pub state_dir: Option<PathBuf>,
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
    /// `APIARY_MAX_TASK_TIMEOUT`: the longest run this node accepts; a task asking for more
    /// fails with `invalid_task`.
    #[serde(with = "humantime_serde")]
    pub max_task_timeout: Duration,
    /// `APIARY_MAX_TASK_MEMORY`: the most linear memory (bytes) this node gives one task.
    pub max_task_memory: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            nats_url: DEFAULT_NATS_URL.into(),
            node_id: None,
            state_dir: None,
            token: None,
            slots: None,
            labels: BTreeMap::new(),
            module_cache_entries: 32,
            request_timeout: Duration::from_secs(2),
            max_register_backoff: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            max_task_timeout: Duration::from_secs(60 * 60),
            max_task_memory: 1024 * 1024 * 1024,
        }
    }
}

/// What one task may use on this node, whatever it asks for. Task limits come from whoever
/// submitted the task; these come from the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLimits {
    pub max_timeout_ms: u64,
    pub max_memory_bytes: u64,
}

impl From<&AgentConfig> for NodeLimits {
    fn from(config: &AgentConfig) -> Self {
        Self {
            max_timeout_ms: u64::try_from(config.max_task_timeout.as_millis()).unwrap_or(u64::MAX),
            max_memory_bytes: config.max_task_memory,
        }
    }
}

impl NodeLimits {
    /// Refuses a task whose limits exceed this node's, with the reason.
    pub fn admit(&self, limits: &Limits) -> Result<(), TaskError> {
        if limits.timeout_ms > self.max_timeout_ms {
            return Err(TaskError::new(
                TaskErrorKind::InvalidTask,
                format!(
                    "the task asks for a {} ms timeout; this node allows at most {} ms",
                    limits.timeout_ms, self.max_timeout_ms
                ),
            ));
        }
        if limits.max_memory_bytes > self.max_memory_bytes {
            return Err(TaskError::new(
                TaskErrorKind::InvalidTask,
                format!(
                    "the task asks for {} bytes of memory; this node allows at most {}",
                    limits.max_memory_bytes, self.max_memory_bytes
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_limits_refuse_greedy_tasks() {
        let node = NodeLimits::from(&AgentConfig::default());
        assert!(node.admit(&Limits::default()).is_ok());
        let forever = Limits {
            timeout_ms: u64::MAX,
            ..Limits::default()
        };
        assert_eq!(
            node.admit(&forever).unwrap_err().kind,
            TaskErrorKind::InvalidTask
        );
        let greedy = Limits {
            max_memory_bytes: 16 << 30,
            ..Limits::default()
        };
        assert_eq!(
            node.admit(&greedy).unwrap_err().kind,
            TaskErrorKind::InvalidTask
        );
    }
}
