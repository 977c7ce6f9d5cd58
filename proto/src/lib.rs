//! The apiary wire protocol, in one place.
//!
//! Every component of apiary (agent, scheduler, SDK, CLI) talks only through NATS, and every
//! subject, stream name, bucket name, message type and the codec that those components share
//! lives in this crate. Nothing outside it builds a subject string: the [`subject`] module's
//! functions do, so a change of layout is a change here and nowhere else.
//!
//! - [`subject`]: the subject layout (`apiary.v1.…`) and its parsers.
//! - [`topology`]: JetStream streams, consumers, the node KV bucket and the module object
//!   store, with [`topology::ensure`] to create whichever are missing.
//! - [`message`]: every message type that crosses the bus, with [`inventory`] for what a node
//!   reports about its host.
//! - [`codec`]: MessagePack by default, JSON for operators, and the rule that a reply is
//!   written in the encoding its request came in.
//! - [`admin`]: join tokens, cluster settings, and what operators set on nodes.
//! - [`identity`]: node keys and the signatures on register and heartbeat bodies.
//! - [`liveness`]: the pure function that decides whether a node is online.
//! - [`lifecycle`]: a task's states, its record and every transition, pure.
//! - [`rpc`] and [`stored`]: request/reply and stored publishes, done the same way everywhere.

pub mod admin;
pub mod app;
pub mod codec;
pub mod headers;
pub mod id;
pub mod identity;
pub mod inbound;
pub mod inventory;
pub mod lifecycle;
pub mod liveness;
pub mod message;
pub mod payload;
pub mod rpc;
pub mod stored;
pub mod subject;
pub mod topology;

pub use codec::{CodecError, Encoding};
pub use id::{IdError, Namespace, NodeId, TaskId};
pub use payload::Payload;

/// Where every apiary component looks for NATS unless told otherwise (`APIARY_NATS_URL`), and
/// where `apiary dev` serves.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Milliseconds since the Unix epoch, the one timestamp format of the protocol.
///
/// Integers travel the same in MessagePack and JSON and need no time library on the other end.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
