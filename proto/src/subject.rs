//! The subject layout. Every subject apiary uses is built by a function here.
//!
//! Layout (version 1):
//!
//! | subject                               | kind              | from → to            |
//! |---------------------------------------|-------------------|----------------------|
//! | `apiary.v1.node.<node>.register`      | request           | agent → scheduler    |
//! | `apiary.v1.node.<node>.heartbeat`     | request           | agent → scheduler    |
//! | `apiary.v1.node.<node>.dispatch`      | stream `APIARY_DISPATCH` | scheduler → agent |
//! | `apiary.v1.node.<node>.result`        | stream `APIARY_RESULTS`  | agent → scheduler |
//! | `apiary.v1.node.<node>.status`        | request           | anyone → agent       |
//! | `apiary.v1.node.<node>.started`       | core publish      | agent → scheduler    |
//! | `apiary.v1.node.<node>.cancel`        | core publish      | scheduler → agent    |
//! | `apiary.v1.tasks.submit`              | stream `APIARY_TASKS`    | SDK → scheduler   |
//! | `apiary.v1.tasks.submit.high`, `.low` | stream `APIARY_TASKS`    | SDK → scheduler   |
//! | `apiary.v1.tasks.<command>`           | request (status, result, ls, cancel) | anyone → scheduler |
//! | `apiary.v1.tasks.archive.<shard>`     | stream `APIARY_TASK_ARCHIVE` | scheduler → readers |
//! | `apiary.v1.tasks.dead`                | stream `APIARY_DLQ`      | scheduler → operators |
//! | `apiary.v1.dlq.<command>`             | request (ls, show, requeue) | operator → scheduler |
//! | `apiary.v1.nodes.list`                | request           | anyone → scheduler   |
//! | `apiary.v1.nodes.<command>`           | request           | operator → scheduler |
//! | `apiary.v1.tokens.<command>`          | request           | operator → scheduler |
//! | `apiary.v1.cluster.settings`          | request           | operator → scheduler |
//!
//! Everything a node sends or receives sits under `apiary.v1.node.<node>.`, so a server
//! permission of `apiary.v1.node.<node>.>` fences one node to its own subjects. Task ids never
//! appear in a stream subject: per-subject state in JetStream is kept in memory, and the number
//! of nodes is bounded where the number of tasks is not.

use std::fmt;

use crate::id::{Namespace, NodeId};
use crate::message::Priority;

/// The root of every apiary subject; the version lets a later protocol run beside this one.
pub const ROOT: &str = "apiary.v1";

/// A subject built by this module. Wrapping it keeps hand-built strings out of call sites
/// that take a subject.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Subject(String);

impl Subject {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl From<Subject> for async_nats::Subject {
    fn from(subject: Subject) -> Self {
        async_nats::Subject::from(subject.0)
    }
}

impl async_nats::subject::ToSubject for Subject {
    fn to_subject(&self) -> async_nats::Subject {
        async_nats::Subject::from(self.0.as_str())
    }
}

impl From<Subject> for String {
    fn from(subject: Subject) -> Self {
        subject.0
    }
}

/// What a node-scoped subject is for: the last token of `apiary.v1.node.<node>.<verb>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeVerb {
    /// The agent asks to join the cluster.
    Register,
    /// The agent reports that it is alive, with live metrics.
    Heartbeat,
    /// Work placed on the node (JetStream).
    Dispatch,
    /// Outcomes of the node's work (JetStream).
    Result,
    /// Ask the agent itself how it is doing.
    Status,
    /// The agent started an attempt (core NATS; the task's record shows it running).
    Started,
    /// A scheduler tells the agent to stop an attempt of a cancelled task (core NATS).
    Cancel,
}

impl NodeVerb {
    pub const ALL: [NodeVerb; 7] = [
        NodeVerb::Register,
        NodeVerb::Heartbeat,
        NodeVerb::Dispatch,
        NodeVerb::Result,
        NodeVerb::Status,
        NodeVerb::Started,
        NodeVerb::Cancel,
    ];

    fn token(self) -> &'static str {
        match self {
            NodeVerb::Register => "register",
            NodeVerb::Heartbeat => "heartbeat",
            NodeVerb::Dispatch => "dispatch",
            NodeVerb::Result => "result",
            NodeVerb::Status => "status",
            NodeVerb::Started => "started",
            NodeVerb::Cancel => "cancel",
        }
    }
}

/// `apiary.v1.node.<node>.<verb>`: a subject of one node.
pub fn node(node: &NodeId, verb: NodeVerb) -> Subject {
    Subject(format!("{ROOT}.node.{node}.{}", verb.token()))
}

/// `apiary.v1.node.*.<verb>`: the same subject for every node, for subscribers and stream
/// filters that serve all nodes.
pub fn all_nodes(verb: NodeVerb) -> Subject {
    Subject(format!("{ROOT}.node.*.{}", verb.token()))
}

/// `apiary.v1.node.<node>.>`: everything one node may publish or subscribe to. This is the
/// unit that server permissions grant to a node.
pub fn node_scope(node: &NodeId) -> Subject {
    Subject(format!("{ROOT}.node.{node}.>"))
}

/// `apiary.v1.tasks.submit`: the queue of normal-priority tasks (stream `APIARY_TASKS`), the
/// subject every client used before priorities were honoured. A submission published here
/// whose body asks for another priority is moved to that priority's queue by the scheduler.
pub fn task_submit() -> Subject {
    Subject(format!("{ROOT}.tasks.submit"))
}

/// The queue of tasks of `priority` in `APIARY_TASKS`: [`task_submit`] for normal ones,
/// `apiary.v1.tasks.submit.high` and `apiary.v1.tasks.submit.low` for the others. Each queue
/// has its own scheduler consumer, so the scheduler chooses which to serve next.
pub fn task_submit_for(priority: Priority) -> Subject {
    match priority {
        Priority::Normal => task_submit(),
        Priority::High => Subject(format!("{ROOT}.tasks.submit.high")),
        Priority::Low => Subject(format!("{ROOT}.tasks.submit.low")),
    }
}

/// The priority whose queue `subject` is ([`task_submit_for`]); `None` for any other subject.
pub fn parse_task_submit(subject: &str) -> Option<Priority> {
    Priority::ALL
        .into_iter()
        .find(|priority| task_submit_for(*priority).as_str() == subject)
}

/// What a client asks about tasks: the last token of `apiary.v1.tasks.<command>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TasksCommand {
    /// A task's record by id.
    Status,
    /// A task's result by id, once it has one.
    Result,
    /// Records, filtered and paginated.
    List,
    Cancel,
}

impl TasksCommand {
    pub const ALL: [TasksCommand; 4] = [
        TasksCommand::Status,
        TasksCommand::Result,
        TasksCommand::List,
        TasksCommand::Cancel,
    ];

    pub fn token(self) -> &'static str {
        match self {
            TasksCommand::Status => "status",
            TasksCommand::Result => "result",
            TasksCommand::List => "ls",
            TasksCommand::Cancel => "cancel",
        }
    }
}

/// `apiary.v1.tasks.<command>`: a question or command about tasks.
pub fn tasks_command(command: TasksCommand) -> Subject {
    Subject(format!("{ROOT}.tasks.{}", command.token()))
}

/// What an operator does with the dead-letter stream: `apiary.v1.dlq.<command>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DlqCommand {
    List,
    Show,
    Requeue,
}

impl DlqCommand {
    pub const ALL: [DlqCommand; 3] = [DlqCommand::List, DlqCommand::Show, DlqCommand::Requeue];

    pub fn token(self) -> &'static str {
        match self {
            DlqCommand::List => "ls",
            DlqCommand::Show => "show",
            DlqCommand::Requeue => "requeue",
        }
    }
}

/// `apiary.v1.dlq.<command>`: dead-letter administration.
pub fn dlq_command(command: DlqCommand) -> Subject {
    Subject(format!("{ROOT}.dlq.{}", command.token()))
}

/// How many archive shards there are: the task archive's subjects are one per shard, never
/// one per task, so the server's per-subject state stays at this many entries however many
/// tasks pass.
pub const ARCHIVE_SHARDS: u32 = 1 << 16;

/// The archive shard a task's final record goes to: the first 16 bits of the SHA-256 of its
/// id, as 4 lowercase hex digits. Other languages compute it the same way.
pub fn archive_shard(task: &crate::id::TaskId) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(task.as_str().as_bytes());
    hex::encode(&digest[..2])
}

/// `apiary.v1.tasks.archive.<shard>`: where a task's final record is kept (stream
/// `APIARY_TASK_ARCHIVE`).
pub fn task_archive(task: &crate::id::TaskId) -> Subject {
    Subject(format!("{ROOT}.tasks.archive.{}", archive_shard(task)))
}

/// `apiary.v1.tasks.archive.*`: every archive shard, the archive stream's subjects.
pub fn task_archive_all() -> Subject {
    Subject(format!("{ROOT}.tasks.archive.*"))
}

/// `apiary.v1.tasks.dead`: the dead-letter stream's one subject (`APIARY_DLQ`).
pub fn task_dead() -> Subject {
    Subject(format!("{ROOT}.tasks.dead"))
}

/// `apiary.v1.nodes.list`: request the node table from any scheduler.
pub fn nodes_list() -> Subject {
    Subject(format!("{ROOT}.nodes.list"))
}

/// What an operator does to a node: the last token of `apiary.v1.nodes.<command>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodesCommand {
    /// The full record, inventory and live metrics of one node.
    Show,
    Cordon,
    Uncordon,
    Drain,
    Label,
    Role,
    Approve,
    /// Forget the node and its key binding.
    Remove,
}

impl NodesCommand {
    pub const ALL: [NodesCommand; 8] = [
        NodesCommand::Show,
        NodesCommand::Cordon,
        NodesCommand::Uncordon,
        NodesCommand::Drain,
        NodesCommand::Label,
        NodesCommand::Role,
        NodesCommand::Approve,
        NodesCommand::Remove,
    ];

    /// The subject token, also the micro service endpoint's name suffix.
    pub fn token(self) -> &'static str {
        match self {
            NodesCommand::Show => "show",
            NodesCommand::Cordon => "cordon",
            NodesCommand::Uncordon => "uncordon",
            NodesCommand::Drain => "drain",
            NodesCommand::Label => "label",
            NodesCommand::Role => "role",
            NodesCommand::Approve => "approve",
            NodesCommand::Remove => "rm",
        }
    }
}

/// `apiary.v1.nodes.<command>`: an operator's command about one node.
pub fn nodes_command(command: NodesCommand) -> Subject {
    Subject(format!("{ROOT}.nodes.{}", command.token()))
}

/// What an operator does with join tokens: the last token of `apiary.v1.tokens.<command>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokensCommand {
    Create,
    List,
    Revoke,
}

impl TokensCommand {
    pub const ALL: [TokensCommand; 3] = [
        TokensCommand::Create,
        TokensCommand::List,
        TokensCommand::Revoke,
    ];

    pub fn token(self) -> &'static str {
        match self {
            TokensCommand::Create => "create",
            TokensCommand::List => "list",
            TokensCommand::Revoke => "revoke",
        }
    }
}

/// `apiary.v1.tokens.<command>`: join token administration.
pub fn tokens_command(command: TokensCommand) -> Subject {
    Subject(format!("{ROOT}.tokens.{}", command.token()))
}

/// `apiary.v1.cluster.settings`: read or change the cluster's settings.
pub fn cluster_settings() -> Subject {
    Subject(format!("{ROOT}.cluster.settings"))
}

/// `apiary.v1.bench.echo`: the raw request/reply baseline of `apiary bench`.
pub fn bench_echo() -> Subject {
    Subject(format!("{ROOT}.bench.echo"))
}

/// `apiary.v1.bench.raw`: the raw JetStream baseline of `apiary bench` (stream
/// [`crate::topology::BENCH_STREAM`]).
pub fn bench_raw() -> Subject {
    Subject(format!("{ROOT}.bench.raw"))
}

/// Splits `apiary.v1.node.<node>.<verb>` into its node and verb. Anything else, including a
/// node token that is not a valid node id, is `None`.
pub fn parse_node_subject(subject: &str) -> Option<(NodeId, NodeVerb)> {
    let rest = subject.strip_prefix(ROOT)?.strip_prefix(".node.")?;
    let (node, verb) = rest.split_once('.')?;
    let verb = NodeVerb::ALL.into_iter().find(|v| v.token() == verb)?;
    let node = NodeId::new(node).ok()?;
    Some((node, verb))
}

/// The reply subject prefix the SDK's inboxes use unless the application sets a custom
/// inbox prefix.
pub const DEFAULT_REPLY_PREFIX: &str = "_INBOX.";

/// Whether `subject` may be used as a task's `reply_to`, where the scheduler will publish the
/// task's result with its own permissions. Only plain subjects (no wildcards, no empty tokens)
/// that start with one of `allowed_prefixes` qualify, and never one in apiary's own namespace
/// or the server's `$` namespaces: a result must not land in a stream, a node's subject, the
/// JetStream API or another application's subjects.
pub fn is_allowed_reply_subject(subject: &str, allowed_prefixes: &[String]) -> bool {
    !subject.is_empty()
        && subject.len() <= 256
        && !subject.starts_with('$')
        && !subject.starts_with("apiary.")
        && allowed_prefixes
            .iter()
            .any(|prefix| !prefix.is_empty() && subject.starts_with(prefix.as_str()))
        && subject.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

/// The subject of `topic` in a namespace's messaging: `apiary.v1.app.<namespace>.<topic>`.
/// The topic (or topic filter) must have passed [`crate::app::check_topic`] (or
/// [`crate::app::check_topic_filter`]): the namespace's tokens come first, so no topic can
/// reach another namespace's subjects.
pub fn app_topic(namespace: &Namespace, topic: &str) -> String {
    format!("{ROOT}.app.{namespace}.{topic}")
}

/// The topic of a subject of `namespace`'s messaging: the inverse of [`app_topic`].
pub fn parse_app_topic<'a>(namespace: &Namespace, subject: &'a str) -> Option<&'a str> {
    subject
        .strip_prefix(ROOT)?
        .strip_prefix(".app.")?
        .strip_prefix(namespace.as_str())?
        .strip_prefix('.')
}

#[cfg(test)]
mod tests {
    #[test]
    fn app_topics_live_under_their_namespace() {
        let chat = Namespace::new("chat").unwrap();
        let subject = app_topic(&chat, "room.1");
        assert_eq!(subject, "apiary.v1.app.chat.room.1");
        assert_eq!(parse_app_topic(&chat, &subject), Some("room.1"));
        let other = Namespace::new("chatter").unwrap();
        assert_eq!(parse_app_topic(&chat, &app_topic(&other, "room.1")), None);
    }

    use super::*;

    fn node_id(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    #[test]
    fn node_subjects_round_trip() {
        for verb in NodeVerb::ALL {
            let subject = node(&node_id("pi-1"), verb);
            assert!(subject.as_str().starts_with("apiary.v1.node.pi-1."));
            assert_eq!(
                parse_node_subject(subject.as_str()),
                Some((node_id("pi-1"), verb))
            );
        }
    }

    #[test]
    fn node_subjects_sit_inside_the_node_scope() {
        let scope = node_scope(&node_id("n"));
        let prefix = scope.as_str().trim_end_matches('>');
        for verb in NodeVerb::ALL {
            assert!(node(&node_id("n"), verb).as_str().starts_with(prefix));
        }
    }

    #[test]
    fn wildcard_subjects_cover_every_node() {
        assert_eq!(
            all_nodes(NodeVerb::Heartbeat).as_str(),
            "apiary.v1.node.*.heartbeat"
        );
    }

    #[test]
    fn reply_subjects_must_be_plain_inboxes() {
        let inbox = [DEFAULT_REPLY_PREFIX.to_owned()];
        let allowed = |subject: &str| is_allowed_reply_subject(subject, &inbox);
        assert!(allowed("_INBOX.abc.def"));
        assert!(!allowed("myapp.results"));
        assert!(!allowed(""));
        assert!(!allowed("$JS.API.STREAM.DELETE.APIARY_TASKS"));
        assert!(!allowed("apiary.v1.tasks.submit"));
        assert!(!allowed("_INBOX.*"));
        assert!(!allowed("_INBOX.>"));
        assert!(!allowed("_INBOX..x"));
        assert!(!allowed("_INBOX.a b"));
        assert!(!allowed("_INBOXevil"));
        // An operator may allow other prefixes, but never the reserved namespaces.
        let wide = ["myapp.".to_owned(), "$JS.".to_owned(), "apiary.".to_owned()];
        assert!(is_allowed_reply_subject("myapp.results", &wide));
        assert!(!is_allowed_reply_subject("$JS.API.INFO", &wide));
        assert!(!is_allowed_reply_subject("apiary.v1.nodes.list", &wide));
    }

    #[test]
    fn archive_subjects_are_bounded_by_the_shard_count() {
        let task = crate::id::TaskId::new("t-1").unwrap();
        let shard = archive_shard(&task);
        assert_eq!(shard.len(), 4);
        assert!(u32::from_str_radix(&shard, 16).unwrap() < ARCHIVE_SHARDS);
        assert_eq!(
            task_archive(&task).as_str(),
            format!("apiary.v1.tasks.archive.{shard}")
        );
        // Stable across processes and languages: SHA-256("t-1") starts with these bytes.
        assert_eq!(
            shard,
            archive_shard(&crate::id::TaskId::new("t-1").unwrap())
        );
    }

    #[test]
    fn each_priority_has_its_own_queue() {
        assert_eq!(
            task_submit_for(Priority::Normal).as_str(),
            "apiary.v1.tasks.submit"
        );
        assert_eq!(
            task_submit_for(Priority::High).as_str(),
            "apiary.v1.tasks.submit.high"
        );
        assert_eq!(
            task_submit_for(Priority::Low).as_str(),
            "apiary.v1.tasks.submit.low"
        );
        for priority in Priority::ALL {
            assert_eq!(
                parse_task_submit(task_submit_for(priority).as_str()),
                Some(priority)
            );
        }
        assert_eq!(parse_task_submit("apiary.v1.tasks.submit.normal"), None);
        assert_eq!(parse_task_submit("apiary.v1.tasks.submit.urgent"), None);
        assert_eq!(parse_task_submit("apiary.v1.tasks.status"), None);
    }

    #[test]
    fn foreign_subjects_do_not_parse() {
        assert_eq!(parse_node_subject("apiary.v1.node.a.b.register"), None);
        assert_eq!(parse_node_subject("apiary.v1.node.a.explode"), None);
        assert_eq!(parse_node_subject("apiary.v2.node.a.register"), None);
        assert_eq!(parse_node_subject("apiary.v1.tasks.submit"), None);
        assert_eq!(parse_node_subject("apiary.v1.node.*.register"), None);
    }
}
