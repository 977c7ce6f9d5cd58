//! Header names apiary sets or reads.

/// The encoding of a message body: [`crate::codec::JSON_CONTENT_TYPE`] or
/// [`crate::codec::MSGPACK_CONTENT_TYPE`].
pub const CONTENT_TYPE: &str = "Content-Type";

/// The task a stream message belongs to. Task ids live here and in payloads, never in stream
/// subjects.
pub const TASK_ID: &str = "Apiary-Task-Id";

/// JetStream's de-duplication header: a repeated id inside the stream's duplicate window is
/// stored once.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// The NATS micro protocol's error headers, set on error replies so that `nats req` and
/// `nats micro` show them.
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// The public key (an nkey, `N…`) of the node that signed a register or heartbeat body.
pub const NODE_KEY: &str = "Apiary-Node-Key";

/// The node key's ed25519 signature over the exact body bytes, base64url without padding.
pub const SIGNATURE: &str = "Apiary-Signature";

/// JetStream KV's header naming what a message of a bucket is: absent (or anything else) for
/// a value, [`KV_OPERATION_DELETE`] or [`KV_OPERATION_PURGE`] for a key's removal.
pub const KV_OPERATION: &str = "KV-Operation";
/// [`KV_OPERATION`] of a delete marker.
pub const KV_OPERATION_DELETE: &str = "DEL";
/// [`KV_OPERATION`] of a purge marker.
pub const KV_OPERATION_PURGE: &str = "PURGE";
