//! Agent configuration. `main` loads it with `apiary_bin_support::load_config_with`: built-in
//! defaults, then an optional TOML file, then `APIARY_*` environment variables (the systemd
//! unit's `Environment=` lines), then the command line's [`AgentFlags`], each overriding the
//! last.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use apiary_proto::DEFAULT_NATS_URL;
use apiary_proto::admin::SecretToken;
use apiary_proto::message::{GrantKind, Grants, Limits, TaskError, TaskErrorKind};
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
    /// `APIARY_TOKEN`: the cluster join token, needed only for the node's first
    /// registration.
    pub token: Option<SecretToken>,
    /// `APIARY_SLOTS`: tasks run at once; the number of CPU cores when absent.
    pub slots: Option<u32>,
    /// `APIARY_LABELS`: labels tasks can require, e.g. `{zone="attic"}`.
    pub labels: BTreeMap<String, String>,
    /// `APIARY_ROLES`: the roles this node performs, which tasks can require, e.g.
    /// `[dns, gpu-host]`.
    pub roles: BTreeSet<String>,
    /// `APIARY_NVML_LIBRARY`: where to load NVIDIA's management library from, when it is not
    /// where the driver usually puts it (`libnvidia-ml.so.1`, found by the dynamic loader).
    pub nvml_library: Option<PathBuf>,
    /// Compiled modules kept in memory.
    pub module_cache_entries: usize,
    /// `APIARY_FORBID_GRANTS`: grants this node refuses (`args`, `env`, `clock`, `scratch`,
    /// `kv`, `publish`), e.g. `["scratch", "clock"]`; a task asking for one fails with
    /// `invalid_task`. Default: none.
    pub forbid_grants: BTreeSet<GrantKind>,
    /// `APIARY_ARTIFACT_CACHE_BYTES`: the most compiled modules kept on disk, in the state
    /// directory, take (least recently used go first); 0 keeps none.
    pub artifact_cache_bytes: u64,
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
    /// `APIARY_PRECOMPILED_ONLY`: run only modules precompiled for this platform
    /// (`apiary module compile`), as an agent built without the compiler does; never compile.
    pub precompiled_only: bool,
    /// `APIARY_MAX_SCRATCH_BYTES`: the largest scratch directory (bytes) this node gives one
    /// task; a task asking for more fails with `invalid_task`.
    pub max_scratch_bytes: u64,
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
            roles: BTreeSet::new(),
            nvml_library: None,
            module_cache_entries: 32,
            artifact_cache_bytes: 256 * 1024 * 1024,
            forbid_grants: BTreeSet::new(),
            request_timeout: Duration::from_secs(2),
            max_register_backoff: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            max_task_timeout: Duration::from_secs(60 * 60),
            max_task_memory: 1024 * 1024 * 1024,
            max_scratch_bytes: 64 * 1024 * 1024,
            precompiled_only: false,
        }
    }
}

/// The settings `apiary-agent` takes on its command line, on top of the file and the
/// environment. Only the flags given are serialized, so a flag left out leaves the layers
/// below alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, clap::Args)]
pub struct AgentFlags {
    /// The NATS server(s) to connect to, comma-separated [APIARY_NATS_URL].
    #[arg(long, global = true, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// This node's id; derived from the host name when absent [APIARY_NODE_ID].
    #[arg(long, global = true, value_name = "ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Where the node key and the offline outbox are kept [APIARY_STATE_DIR].
    #[arg(long, global = true, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Tasks run at once; the number of usable CPU cores when absent [APIARY_SLOTS].
    #[arg(long, global = true, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// A label tasks can require; repeat for more. Each sets its key over the labels of the
    /// file and the environment [APIARY_LABELS].
    #[arg(long = "label", global = true, value_name = "KEY=VALUE", value_parser = parse_label)]
    #[serde(
        rename = "labels",
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "labels_as_map"
    )]
    pub labels: Vec<(String, String)>,
    /// A role this node performs; repeat for more. Together they replace the roles of the
    /// file and the environment [APIARY_ROLES].
    #[arg(long = "role", global = true, value_name = "ROLE")]
    #[serde(rename = "roles", skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// The cluster join token. Prefer APIARY_TOKEN: other users of the host can read a
    /// process's command line [APIARY_TOKEN].
    #[arg(long, global = true, value_name = "TOKEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretToken>,
}

fn parse_label(label: &str) -> Result<(String, String), String> {
    match label.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {label:?}")),
    }
}

/// Labels given as repeated `--label` flags, written as the map the configuration holds.
fn labels_as_map<S: serde::Serializer>(
    labels: &[(String, String)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(labels.iter().map(|(key, value)| (key, value)))
}

/// What one task may use on this node, whatever it asks for. Task limits come from whoever
/// submitted the task; these come from the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLimits {
    pub max_timeout_ms: u64,
    pub max_memory_bytes: u64,
    pub max_scratch_bytes: u64,
    pub forbidden_grants: BTreeSet<GrantKind>,
}

impl From<&AgentConfig> for NodeLimits {
    fn from(config: &AgentConfig) -> Self {
        Self {
            max_timeout_ms: u64::try_from(config.max_task_timeout.as_millis()).unwrap_or(u64::MAX),
            max_memory_bytes: config.max_task_memory,
            max_scratch_bytes: config.max_scratch_bytes,
            forbidden_grants: config.forbid_grants.clone(),
        }
    }
}

impl NodeLimits {
    /// Refuses a task whose limits exceed this node's, or that asks for a grant this node
    /// forbids, with the reason.
    pub fn admit(&self, limits: &Limits, grants: &Grants) -> Result<(), TaskError> {
        grants
            .check()
            .map_err(|reason| TaskError::new(TaskErrorKind::InvalidTask, reason))?;
        if let Some(forbidden) = grants.kinds().intersection(&self.forbidden_grants).next() {
            return Err(TaskError::new(
                TaskErrorKind::InvalidTask,
                format!("the task asks for the {forbidden} grant, which this node forbids"),
            ));
        }
        if let Some(scratch) = grants
            .scratch_bytes
            .filter(|bytes| *bytes > self.max_scratch_bytes)
        {
            return Err(TaskError::new(
                TaskErrorKind::InvalidTask,
                format!(
                    "the task asks for a {scratch} byte scratch directory; this node allows at most {}",
                    self.max_scratch_bytes
                ),
            ));
        }
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
// figment's test jail returns its own large error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use clap::Parser as _;
    use std::path::Path;

    /// The agent's flags, parsed as its binary parses them.
    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        flags: AgentFlags,
    }

    fn flags(args: &[&str]) -> Result<AgentFlags, clap::Error> {
        Cli::try_parse_from(std::iter::once("apiary-agent").chain(args.iter().copied()))
            .map(|cli| cli.flags)
    }

    fn set<const N: usize>(items: [&str; N]) -> BTreeSet<String> {
        items.into_iter().map(str::to_owned).collect()
    }

    #[test]
    fn flags_override_the_environment_which_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "agent.toml",
                r#"
                nats_url = "nats://file:4222"
                node_id = "from-file"
                slots = 2
                roles = ["from-file"]
                max_task_timeout = "10m"
                [labels]
                zone = "file"
                rack = "file"
                "#,
            )?;
            jail.set_env("APIARY_NODE_ID", "from-env");
            jail.set_env("APIARY_SLOTS", "3");
            jail.set_env("APIARY_LABELS", r#"{zone="env"}"#);
            jail.set_env("APIARY_ROLES", "[dns, host]");
            jail.set_env("APIARY_FORBID_GRANTS", r#"["clock", "env"]"#);
            let file = Some(Path::new("agent.toml"));
            let load = |flags: &AgentFlags| {
                apiary_bin_support::load_config_with::<AgentConfig, _>(file, flags)
                    .map_err(|err| err.to_string())
            };

            // File and environment: the environment wins where it speaks.
            let config = load(&flags(&[]).unwrap())?;
            assert_eq!(config.nats_url, "nats://file:4222");
            assert_eq!(config.max_task_timeout, Duration::from_secs(600));
            assert_eq!(config.node_id.as_deref(), Some("from-env"));
            assert_eq!(config.slots, Some(3));
            assert_eq!(config.roles, set(["dns", "host"]));
            assert_eq!(
                config.forbid_grants,
                [GrantKind::Clock, GrantKind::Env].into()
            );
            assert_eq!(config.labels.get("zone").map(String::as_str), Some("env"));
            assert_eq!(config.labels.get("rack").map(String::as_str), Some("file"));

            // Flags win over both; what they leave out stays as it was.
            let config = load(
                &flags(&[
                    "--slots",
                    "5",
                    "--nats-url",
                    "nats://flag:4222",
                    "--label",
                    "rack=flag",
                    "--role",
                    "gpu-host",
                    "--role",
                    "dns",
                ])
                .unwrap(),
            )?;
            assert_eq!(config.slots, Some(5));
            assert_eq!(config.nats_url, "nats://flag:4222");
            assert_eq!(config.node_id.as_deref(), Some("from-env"));
            assert_eq!(config.max_task_timeout, Duration::from_secs(600));
            assert_eq!(config.roles, set(["dns", "gpu-host"]));
            assert_eq!(
                config.labels,
                BTreeMap::from([
                    ("rack".to_owned(), "flag".to_owned()),
                    ("zone".to_owned(), "env".to_owned()),
                ])
            );
            let config = load(&flags(&["--node-id", "from-flag", "--state-dir", "/s"]).unwrap())?;
            assert_eq!(config.node_id.as_deref(), Some("from-flag"));
            assert_eq!(config.state_dir.as_deref(), Some(Path::new("/s")));
            assert_eq!(config.slots, Some(3));
            Ok(())
        });
    }

    #[test]
    fn a_label_flag_needs_a_key_and_a_value() {
        assert!(flags(&["--label", "zone"]).is_err());
        assert!(flags(&["--label", "=attic"]).is_err());
        assert_eq!(
            flags(&["--label", "zone=attic=1"]).unwrap().labels,
            [("zone".to_owned(), "attic=1".to_owned())]
        );
    }

    #[test]
    fn a_node_refuses_the_grants_it_forbids_and_only_those() {
        let node = NodeLimits::from(&AgentConfig {
            forbid_grants: [GrantKind::Clock].into(),
            ..AgentConfig::default()
        });
        let clock = Grants {
            clock: true,
            ..Grants::default()
        };
        let refused = node.admit(&Limits::default(), &clock).unwrap_err();
        assert_eq!(refused.kind, TaskErrorKind::InvalidTask);
        assert!(refused.message.contains("clock"), "{}", refused.message);
        let args = Grants {
            args: vec!["-v".into()],
            ..Grants::default()
        };
        assert!(node.admit(&Limits::default(), &args).is_ok());
        assert!(node.admit(&Limits::default(), &Grants::default()).is_ok());
    }

    #[test]
    fn node_limits_refuse_greedy_tasks() {
        let node = NodeLimits::from(&AgentConfig::default());
        assert!(node.admit(&Limits::default(), &Grants::default()).is_ok());
        let forever = Limits {
            timeout_ms: u64::MAX,
            ..Limits::default()
        };
        assert_eq!(
            node.admit(&forever, &Grants::default()).unwrap_err().kind,
            TaskErrorKind::InvalidTask
        );
        let greedy = Limits {
            max_memory_bytes: 16 << 30,
            ..Limits::default()
        };
        assert_eq!(
            node.admit(&greedy, &Grants::default()).unwrap_err().kind,
            TaskErrorKind::InvalidTask
        );
    }
}
