//! Agent configuration: built-in defaults, then an optional TOML file, then `APIARY_*`
//! environment variables (the systemd unit's `Environment=` lines), each overriding the last.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The default NATS URL of every apiary component, where `apiary dev` serves.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

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

impl AgentConfig {
    /// Loads the configuration: defaults, then `file` if given, then `APIARY_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            .merge(Env::prefixed("APIARY_"))
            .extract()
            .map_err(Box::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_file_and_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("agent.toml", "slots = 2\nnode_id = \"from-file\"")?;
            jail.set_env("APIARY_NODE_ID", "from-env");
            jail.set_env("APIARY_REQUEST_TIMEOUT", "750ms");
            let config =
                AgentConfig::load(Some(Path::new("agent.toml"))).map_err(|err| err.to_string())?;
            assert_eq!(config.slots, Some(2));
            assert_eq!(config.node_id.as_deref(), Some("from-env"));
            assert_eq!(config.request_timeout, Duration::from_millis(750));
            assert_eq!(config.nats_url, DEFAULT_NATS_URL);
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_is_an_error() {
        figment::Jail::expect_with(|_| {
            assert!(AgentConfig::load(Some(Path::new("nope.toml"))).is_err());
            Ok(())
        });
    }
}
