//! Scheduler configuration. `main` loads it with `apiary_bin_support::load_config`: built-in
//! defaults, then an optional TOML file, then `APIARY_*` environment variables.

use std::time::Duration;

use apiary_proto::DEFAULT_NATS_URL;
use apiary_proto::subject;
use serde::{Deserialize, Serialize};

/// A day, as Nomad forgets down nodes: long enough that a host switched off overnight or
/// over a weekend's power cut is still listed, short enough that a fleet that churns
/// through hosts does not carry them all forever.
pub const DEFAULT_FORGET_OFFLINE_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

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
    /// `APIARY_MAX_ATTEMPTS`: how many attempts a task gets for system failures (its node
    /// lost, an internal error on the node) unless its own retry policy says otherwise.
    /// After the last, the task is `dead` and goes to the dead-letter stream.
    pub max_attempts: u32,
    /// `APIARY_NODE_BACKLOG`: how many of this replica's tasks may wait at a node beyond its
    /// slots; unset means it follows the node's pace (what it finishes in 10 ms, between one
    /// and eight per slot; see `view::Pace`). The rest waits in the shared queue, for
    /// whichever node has room first.
    pub node_backlog: Option<u32>,
    /// `APIARY_TASK_RETENTION`: how long an ended task's record stays readable by id (the
    /// task archive's age limit).
    #[serde(with = "humantime_serde")]
    pub task_retention: Duration,
    /// `APIARY_TASK_ARCHIVE_MAX_BYTES`: the most disk the task archive may use; the oldest
    /// records go first when it is full, even inside the retention period.
    pub task_archive_max_bytes: i64,
    /// `APIARY_FORGET_OFFLINE_AFTER`: how long a node may be offline (or gone, having left)
    /// before it leaves the node table and its dispatch queue is deleted, once it holds no
    /// work. Its key stays bound to its id and its operator settings stay, so a node that
    /// comes back later registers again without a token. `0s` keeps offline nodes forever.
    #[serde(with = "humantime_serde")]
    pub forget_offline_after: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            nats_url: DEFAULT_NATS_URL.into(),
            heartbeat_interval: Duration::from_millis(
                apiary_proto::liveness::DEFAULT_HEARTBEAT_INTERVAL_MS,
            ),
            max_in_flight: 256,
            reply_subject_prefixes: vec![subject::DEFAULT_REPLY_PREFIX.to_owned()],
            max_attempts: 3,
            node_backlog: None,
            task_retention: apiary_proto::topology::TASK_RETENTION,
            task_archive_max_bytes: apiary_proto::topology::TASK_ARCHIVE_MAX_BYTES,
            forget_offline_after: DEFAULT_FORGET_OFFLINE_AFTER,
        }
    }
}
