//! The host APIs: what a guest may ask of its node beyond WASI, as core-module imports from
//! the module `apiary` (the ABI is in docs/PROTOCOL.md, "Host APIs for guests").
//!
//! Every function takes pointers and lengths into the guest's exported `memory` and returns
//! an `i32`: 0 (or a count) on success, a negative [`status`] on failure. A call the task was
//! not granted returns [`status::NOT_GRANTED`]; a pointer outside the guest's memory returns
//! [`status::BAD_POINTER`]. None of them traps, except `log` past the output limit, which
//! ends the run as a stdout or stderr flood would.
//!
//! The namespace the calls act in is the submission's ([`Grants::namespace`]), fixed when the
//! run's [`AppHost`] is made: no argument of any call names a namespace, so a guest cannot
//! reach outside its own. Keys, prefixes and topics are checked here, before they reach the
//! host, with the same rules the SDK applies ([`apiary_proto::app`]).

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use apiary_proto::app::{self, KeyPrefix};
use apiary_proto::message::Grants;
use bytes::Bytes;
use wasmtime::{Caller, Extern, Linker};

use super::TaskState;
use super::output::CappedOutput;

/// The import module every host API lives in.
pub const IMPORT_MODULE: &str = "apiary";

/// What a host API call returns to the guest when it fails. Stable: part of the ABI.
pub mod status {
    /// Success (calls that count return the count instead).
    pub const OK: i32 = 0;
    /// The task was not granted this API.
    pub const NOT_GRANTED: i32 = -1;
    /// No value under the key.
    pub const NOT_FOUND: i32 = -2;
    /// `kv_create` found a value, or `kv_update` a newer revision than the one given.
    pub const CONFLICT: i32 = -3;
    /// The key, prefix or topic is not valid (or not UTF-8).
    pub const INVALID_NAME: i32 = -4;
    /// The value or message is larger than the namespace or the server takes.
    pub const TOO_LARGE: i32 = -5;
    /// The guest's buffer is too small; the length needed was written to its length out-pointer.
    pub const BUFFER_TOO_SMALL: i32 = -6;
    /// The store or the bus did not answer in time, or failed.
    pub const UNAVAILABLE: i32 = -7;
    /// A pointer and length that are not inside the guest's memory, or no exported `memory`.
    pub const BAD_POINTER: i32 = -8;
    /// An argument out of its range (a log level above 4).
    pub const INVALID_ARGUMENT: i32 = -9;
}

/// How an [`AppHost`] operation failed, as the guest learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("no value under the key")]
    NotFound,
    #[error("the key exists, or is at another revision")]
    Conflict,
    #[error("not a valid key, prefix or topic")]
    InvalidName,
    #[error("larger than the namespace or the server takes")]
    TooLarge,
    #[error("the store or the bus is unavailable")]
    Unavailable,
}

impl HostError {
    fn status(self) -> i32 {
        match self {
            HostError::NotFound => status::NOT_FOUND,
            HostError::Conflict => status::CONFLICT,
            HostError::InvalidName => status::INVALID_NAME,
            HostError::TooLarge => status::TOO_LARGE,
            HostError::Unavailable => status::UNAVAILABLE,
        }
    }
}

/// A key's value and its revision (which `kv_update` compares against).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvValue {
    pub value: Bytes,
    pub revision: u64,
}

/// What an [`AppHost`] call returns: the run waits on it (suspended, not blocking its
/// thread).
pub type HostFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, HostError>> + Send + 'a>>;

/// The app store and messaging of one namespace, as a run sees them: what the agent does on
/// a guest's behalf. The run is suspended while a call is under way; an implementation
/// bounds each by the run's deadline. Keys, prefixes and topics arrive checked.
pub trait AppHost: Send {
    fn kv_get<'a>(&'a mut self, key: &'a str) -> HostFuture<'a, Option<KvValue>>;
    fn kv_put<'a>(&'a mut self, key: &'a str, value: Bytes) -> HostFuture<'a, u64>;
    /// Writes only if the key has no value ([`HostError::Conflict`] if it has).
    fn kv_create<'a>(&'a mut self, key: &'a str, value: Bytes) -> HostFuture<'a, u64>;
    /// Writes only if the key's latest revision is `revision` ([`HostError::Conflict`] if not).
    fn kv_update<'a>(
        &'a mut self,
        key: &'a str,
        value: Bytes,
        revision: u64,
    ) -> HostFuture<'a, u64>;
    fn kv_delete<'a>(&'a mut self, key: &'a str) -> HostFuture<'a, ()>;
    /// The keys with a value under `prefix`, in order.
    fn kv_keys<'a>(&'a mut self, prefix: &'a KeyPrefix) -> HostFuture<'a, Vec<String>>;
    fn publish<'a>(&'a mut self, topic: &'a str, payload: Bytes) -> HostFuture<'a, ()>;
}

/// One run's side of the host APIs: what it was granted, where the calls go, and what it
/// has asked so far.
pub(crate) struct GuestApi {
    kv: bool,
    publish: bool,
    host: Option<Box<dyn AppHost>>,
    /// The last key listing, kept so that `kv_keys` pages after the first read it instead
    /// of listing the namespace again.
    listing: Option<(String, Vec<String>)>,
    /// Where `log` writes: the run's stderr.
    log: CappedOutput,
    started: Instant,
    pub(crate) calls: u64,
}

impl GuestApi {
    pub(crate) fn new(grants: &Grants, host: Option<Box<dyn AppHost>>, log: CappedOutput) -> Self {
        Self {
            kv: grants.kv,
            publish: grants.publish,
            host,
            listing: None,
            log,
            started: Instant::now(),
            calls: 0,
        }
    }

    fn kv_host(&mut self) -> Result<&mut (dyn AppHost + 'static), i32> {
        if !self.kv {
            return Err(status::NOT_GRANTED);
        }
        self.host.as_deref_mut().ok_or(status::UNAVAILABLE)
    }

    fn publish_host(&mut self) -> Result<&mut (dyn AppHost + 'static), i32> {
        if !self.publish {
            return Err(status::NOT_GRANTED);
        }
        self.host.as_deref_mut().ok_or(status::UNAVAILABLE)
    }
}

type Ctx<'a> = Caller<'a, TaskState>;

/// Counts a call; [`status_of`] turns its `Result` into the status the guest gets.
fn count(caller: &mut Ctx<'_>) {
    caller.data_mut().api.calls += 1;
}

fn status_of(result: Result<i32, i32>) -> i32 {
    result.unwrap_or_else(|status| status)
}

fn memory_range(ptr: i32, len: i32) -> Result<std::ops::Range<usize>, i32> {
    // Pointers and lengths are unsigned in wasm32; the i32 is only how they travel.
    let start = ptr as u32 as usize;
    let len = len as u32 as usize;
    Ok(start..start.checked_add(len).ok_or(status::BAD_POINTER)?)
}

fn memory(caller: &mut Ctx<'_>) -> Result<wasmtime::Memory, i32> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or(status::BAD_POINTER)
}

fn read_bytes(caller: &mut Ctx<'_>, ptr: i32, len: i32) -> Result<Bytes, i32> {
    let memory = memory(caller)?;
    memory
        .data(&*caller)
        .get(memory_range(ptr, len)?)
        .map(Bytes::copy_from_slice)
        .ok_or(status::BAD_POINTER)
}

fn read_str(caller: &mut Ctx<'_>, ptr: i32, len: i32) -> Result<String, i32> {
    String::from_utf8(read_bytes(caller, ptr, len)?.to_vec()).map_err(|_| status::INVALID_NAME)
}

fn read_key(caller: &mut Ctx<'_>, ptr: i32, len: i32) -> Result<String, i32> {
    let key = read_str(caller, ptr, len)?;
    app::check_key(&key).map_err(|_| status::INVALID_NAME)?;
    Ok(key)
}

fn write_bytes(caller: &mut Ctx<'_>, ptr: i32, bytes: &[u8]) -> Result<(), i32> {
    let memory = memory(caller)?;
    let len = i32::try_from(bytes.len()).map_err(|_| status::BAD_POINTER)?;
    memory
        .data_mut(&mut *caller)
        .get_mut(memory_range(ptr, len)?)
        .ok_or(status::BAD_POINTER)?
        .copy_from_slice(bytes);
    Ok(())
}

fn write_u32(caller: &mut Ctx<'_>, ptr: i32, value: u32) -> Result<(), i32> {
    write_bytes(caller, ptr, &value.to_le_bytes())
}

fn write_u64(caller: &mut Ctx<'_>, ptr: i32, value: u64) -> Result<(), i32> {
    write_bytes(caller, ptr, &value.to_le_bytes())
}

fn length(len: usize) -> Result<u32, i32> {
    u32::try_from(len).map_err(|_| status::TOO_LARGE)
}

/// Writes a revision to the guest and reports success.
fn revision_out(
    caller: &mut Ctx<'_>,
    ptr: i32,
    written: Result<u64, HostError>,
) -> Result<i32, i32> {
    let revision = written.map_err(HostError::status)?;
    write_u64(caller, ptr, revision)?;
    Ok(status::OK)
}

/// Which write a `kv_put`, `kv_create` or `kv_update` call makes.
#[derive(Clone, Copy)]
enum Write {
    Put,
    Create,
    Update { expected: u64 },
}

/// A write of the key and value at `(key, key_len, value, value_len)` in the guest's memory,
/// whose new revision goes to the guest at `revision`.
async fn write_key(
    caller: &mut Ctx<'_>,
    (key, key_len, value, value_len): (i32, i32, i32, i32),
    revision: i32,
    write: Write,
) -> i32 {
    count(caller);
    status_of(
        async {
            caller.data_mut().api.kv_host()?;
            let key = read_key(caller, key, key_len)?;
            let value = read_bytes(caller, value, value_len)?;
            let host = caller.data_mut().api.kv_host()?;
            let written = match write {
                Write::Put => host.kv_put(&key, value).await,
                Write::Create => host.kv_create(&key, value).await,
                Write::Update { expected } => host.kv_update(&key, value, expected).await,
            };
            revision_out(caller, revision, written)
        }
        .await,
    )
}

/// Adds the `apiary` imports to the sandbox's linker. The calls that go to the host are
/// async: the run is suspended while they are under way.
pub(crate) fn add_to_linker(linker: &mut Linker<TaskState>) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        IMPORT_MODULE,
        "kv_get",
        |mut caller: Ctx<'_>,
         (key, key_len, buf, buf_cap, len_out, revision_out): (i32, i32, i32, i32, i32, i32)| {
            Box::new(async move {
                count(&mut caller);
                let caller = &mut caller;
                status_of(
                    async {
                        caller.data_mut().api.kv_host()?;
                        let key = read_key(caller, key, key_len)?;
                        let found = caller.data_mut().api.kv_host()?.kv_get(&key).await;
                        let value = found.map_err(HostError::status)?.ok_or(status::NOT_FOUND)?;
                        write_u32(caller, len_out, length(value.value.len())?)?;
                        if value.value.len() > buf_cap as u32 as usize {
                            return Err(status::BUFFER_TOO_SMALL);
                        }
                        write_bytes(caller, buf, &value.value)?;
                        write_u64(caller, revision_out, value.revision)?;
                        Ok(status::OK)
                    }
                    .await,
                )
            })
        },
    )?;
    linker.func_wrap_async(
        IMPORT_MODULE,
        "kv_put",
        |mut caller: Ctx<'_>,
         (key, key_len, value, value_len, revision): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let key_value = (key, key_len, value, value_len);
                write_key(&mut caller, key_value, revision, Write::Put).await
            })
        },
    )?;
    linker.func_wrap_async(
        IMPORT_MODULE,
        "kv_create",
        |mut caller: Ctx<'_>,
         (key, key_len, value, value_len, revision): (i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let key_value = (key, key_len, value, value_len);
                write_key(&mut caller, key_value, revision, Write::Create).await
            })
        },
    )?;
    linker.func_wrap_async(
        IMPORT_MODULE,
        "kv_update",
        |mut caller: Ctx<'_>,
         (key, key_len, value, value_len, expected, revision): (
            i32,
            i32,
            i32,
            i32,
            i64,
            i32,
        )| {
            Box::new(async move {
                // Revisions are u64; the i64 is only how they travel.
                let write = Write::Update {
                    expected: expected as u64,
                };
                let key_value = (key, key_len, value, value_len);
                write_key(&mut caller, key_value, revision, write).await
            })
        },
    )?;
    linker.func_wrap_async(
        IMPORT_MODULE,
        "kv_delete",
        |mut caller: Ctx<'_>, (key, key_len): (i32, i32)| {
            Box::new(async move {
                count(&mut caller);
                let caller = &mut caller;
                status_of(
                    async {
                        caller.data_mut().api.kv_host()?;
                        let key = read_key(caller, key, key_len)?;
                        let deleted = caller.data_mut().api.kv_host()?.kv_delete(&key).await;
                        deleted.map_err(HostError::status)?;
                        Ok(status::OK)
                    }
                    .await,
                )
            })
        },
    )?;
    linker.func_wrap_async(
        IMPORT_MODULE,
        "kv_keys",
        |mut caller: Ctx<'_>,
         (prefix, prefix_len, after, after_len, buf, buf_cap, len_out): (
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
            i32,
        )| {
            Box::new(async move {
                count(&mut caller);
                let caller = &mut caller;
                status_of(
                    async {
                        caller.data_mut().api.kv_host()?;
                        let prefix = read_str(caller, prefix, prefix_len)?;
                        let after = read_str(caller, after, after_len)?;
                        let keys = listing(caller, &prefix, after.is_empty()).await?;
                        let page = page_of_keys(&keys, &after, buf_cap as u32 as usize);
                        write_u32(caller, len_out, length(page.needed)?)?;
                        if page.count == 0 && page.needed > 0 {
                            return Err(status::BUFFER_TOO_SMALL);
                        }
                        write_bytes(caller, buf, &page.bytes)?;
                        i32::try_from(page.count).map_err(|_| status::TOO_LARGE)
                    }
                    .await,
                )
            })
        },
    )?;
    linker.func_wrap_async(
        IMPORT_MODULE,
        "publish",
        |mut caller: Ctx<'_>, (topic, topic_len, payload, payload_len): (i32, i32, i32, i32)| {
            Box::new(async move {
                count(&mut caller);
                let caller = &mut caller;
                status_of(
                    async {
                        caller.data_mut().api.publish_host()?;
                        let topic = read_str(caller, topic, topic_len)?;
                        app::check_topic(&topic).map_err(|_| status::INVALID_NAME)?;
                        let payload = read_bytes(caller, payload, payload_len)?;
                        let host = caller.data_mut().api.publish_host()?;
                        host.publish(&topic, payload)
                            .await
                            .map_err(HostError::status)?;
                        Ok(status::OK)
                    }
                    .await,
                )
            })
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "log",
        |mut caller: Ctx<'_>,
         level: i32,
         message: i32,
         message_len: i32|
         -> wasmtime::Result<i32> {
            count(&mut caller);
            let mut line = None;
            let status = status_of((|| {
                let level = LOG_LEVELS
                    .get(usize::try_from(level).map_err(|_| status::INVALID_ARGUMENT)?)
                    .ok_or(status::INVALID_ARGUMENT)?;
                let message = read_bytes(&mut caller, message, message_len)?;
                line = Some(log_line(level, &message, caller.data().api.started));
                Ok(status::OK)
            })());
            if let Some(line) = line {
                // Past the output limit this traps, as a flood of stderr writes does.
                caller.data_mut().api.log.append(line)?;
            }
            Ok(status)
        },
    )?;
    Ok(())
}

/// The log levels, by the number a guest passes.
const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

/// One log line as it goes to the task's stderr, and so to `apiary task logs`: a JSON object
/// on a line of its own, `{"log":"info","msg":"…","t_us":1234}`, where `t_us` counts from the
/// run's start. Bytes that are not UTF-8 are replaced.
fn log_line(level: &str, message: &[u8], started: Instant) -> Bytes {
    let line = serde_json::json!({
        "log": level,
        "msg": String::from_utf8_lossy(message),
        "t_us": u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    });
    let mut bytes = line.to_string().into_bytes();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// The keys under `prefix`: listed afresh for a first page, from the last listing for the
/// pages after it (when it was of the same prefix).
async fn listing(caller: &mut Ctx<'_>, prefix: &str, first_page: bool) -> Result<Vec<String>, i32> {
    let api = &mut caller.data_mut().api;
    if let Some((listed, keys)) = &api.listing
        && !first_page
        && listed == prefix
    {
        return Ok(keys.clone());
    }
    let parsed = KeyPrefix::parse(prefix).map_err(|_| status::INVALID_NAME)?;
    let keys = api
        .kv_host()?
        .kv_keys(&parsed)
        .await
        .map_err(HostError::status)?;
    api.listing = Some((prefix.to_owned(), keys.clone()));
    Ok(keys)
}

/// What one `kv_keys` call hands back: whole keys, each followed by `\n`.
#[derive(Debug, PartialEq, Eq)]
struct KeyPage {
    bytes: Vec<u8>,
    count: usize,
    /// The bytes written, or when not even one key fits, the bytes its line needs.
    needed: usize,
}

/// The keys after `after` that fit in `capacity` bytes.
fn page_of_keys(keys: &[String], after: &str, capacity: usize) -> KeyPage {
    let mut page = KeyPage {
        bytes: Vec::new(),
        count: 0,
        needed: 0,
    };
    for key in keys
        .iter()
        .filter(|key| after.is_empty() || key.as_str() > after)
    {
        if page.bytes.len() + key.len() + 1 > capacity {
            if page.count == 0 {
                page.needed = key.len() + 1;
            }
            break;
        }
        page.bytes.extend_from_slice(key.as_bytes());
        page.bytes.push(b'\n');
        page.count += 1;
        page.needed = page.bytes.len();
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    use apiary_proto::Namespace;
    use apiary_proto::message::{Limits, Outcome};

    use crate::sandbox::Sandbox;

    /// A namespace's store and topics in memory, for the ABI's own tests (the bus side runs
    /// against a real server in the integration tests' `host_api` module).
    #[derive(Clone, Default)]
    struct MemoryHost {
        values: Arc<Mutex<BTreeMap<String, KvValue>>>,
        published: Arc<Mutex<Vec<(String, Bytes)>>>,
    }

    impl MemoryHost {
        fn put(&self, key: &str, value: Bytes) -> u64 {
            let mut values = self.values.lock().unwrap();
            let revision = values.values().map(|v| v.revision).max().unwrap_or(0) + 1;
            values.insert(key.to_owned(), KvValue { value, revision });
            revision
        }
    }

    fn ready<'a, T: Send + 'a>(result: Result<T, HostError>) -> HostFuture<'a, T> {
        Box::pin(std::future::ready(result))
    }

    impl AppHost for MemoryHost {
        fn kv_get<'a>(&'a mut self, key: &'a str) -> HostFuture<'a, Option<KvValue>> {
            ready(Ok(self.values.lock().unwrap().get(key).cloned()))
        }
        fn kv_put<'a>(&'a mut self, key: &'a str, value: Bytes) -> HostFuture<'a, u64> {
            ready(Ok(self.put(key, value)))
        }
        fn kv_create<'a>(&'a mut self, key: &'a str, value: Bytes) -> HostFuture<'a, u64> {
            if self.values.lock().unwrap().contains_key(key) {
                return ready(Err(HostError::Conflict));
            }
            ready(Ok(self.put(key, value)))
        }
        fn kv_update<'a>(
            &'a mut self,
            key: &'a str,
            value: Bytes,
            revision: u64,
        ) -> HostFuture<'a, u64> {
            let current = self.values.lock().unwrap().get(key).map(|v| v.revision);
            if current != Some(revision) {
                return ready(Err(HostError::Conflict));
            }
            ready(Ok(self.put(key, value)))
        }
        fn kv_delete<'a>(&'a mut self, key: &'a str) -> HostFuture<'a, ()> {
            self.values.lock().unwrap().remove(key);
            ready(Ok(()))
        }
        fn kv_keys<'a>(&'a mut self, prefix: &'a KeyPrefix) -> HostFuture<'a, Vec<String>> {
            let values = self.values.lock().unwrap();
            ready(Ok(values
                .keys()
                .filter(|key| prefix.matches(key))
                .cloned()
                .collect()))
        }
        fn publish<'a>(&'a mut self, topic: &'a str, payload: Bytes) -> HostFuture<'a, ()> {
            self.published
                .lock()
                .unwrap()
                .push((topic.to_owned(), payload));
            ready(Ok(()))
        }
    }

    /// Puts `key` = `v1` (a key given as the module's data), reads it back into a 16-byte
    /// buffer, writes what it read to stdout, and exits with the negated status of the first
    /// call that failed (0 when none did). `$key_ptr` lets a test pass a bad pointer.
    fn put_then_get(key: &str, key_ptr: u32) -> String {
        format!(
            r#"(module
              (import "apiary" "kv_put" (func $put (param i32 i32 i32 i32 i32) (result i32)))
              (import "apiary" "kv_get" (func $get (param i32 i32 i32 i32 i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
              (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
              (memory (export "memory") 1)
              (data (i32.const 16) "{key}")
              (data (i32.const 48) "v1")
              (func (export "_start") (local $status i32)
                (local.set $status (call $put (i32.const {key_ptr}) (i32.const {len}) (i32.const 48) (i32.const 2) (i32.const 64)))
                (if (local.get $status) (then (call $exit (i32.sub (i32.const 0) (local.get $status)))))
                (local.set $status (call $get (i32.const {key_ptr}) (i32.const {len}) (i32.const 128) (i32.const 16) (i32.const 72) (i32.const 80)))
                (if (local.get $status) (then (call $exit (i32.sub (i32.const 0) (local.get $status)))))
                (i32.store (i32.const 96) (i32.const 128))
                (i32.store (i32.const 100) (i32.load (i32.const 72)))
                (drop (call $write (i32.const 1) (i32.const 96) (i32.const 1) (i32.const 104)))))"#,
            len = key.len()
        )
    }

    async fn run(wat: &str, grants: &Grants, host: Option<MemoryHost>) -> Outcome {
        let sandbox = Sandbox::new().expect("sandbox");
        let module = sandbox
            .compile(&wat::parse_str(wat).expect("valid wat"))
            .expect("compiles");
        let prepared = sandbox.prepare(module).expect("prepares");
        let host = host.map(|host| Box::new(host) as Box<dyn AppHost>);
        let stop = Arc::new(AtomicBool::new(false));
        sandbox
            .run_prepared(
                &prepared,
                Bytes::new(),
                &Limits::default(),
                grants,
                &stop,
                host,
            )
            .await
            .outcome
    }

    fn kv_grant() -> Grants {
        Grants {
            kv: true,
            namespace: Some(Namespace::new("ns").unwrap()),
            ..Grants::default()
        }
    }

    fn exit_and_stdout(outcome: Outcome) -> (i32, String) {
        match outcome {
            Outcome::Completed {
                exit_code, stdout, ..
            } => (exit_code, String::from_utf8_lossy(&stdout.0).into_owned()),
            other => panic!("expected the module to complete, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_granted_guest_writes_and_reads_back_its_namespace() {
        let host = MemoryHost::default();
        let outcome = run(&put_then_get("k", 16), &kv_grant(), Some(host.clone())).await;
        assert_eq!(exit_and_stdout(outcome), (0, "v1".to_owned()));
        assert_eq!(
            host.values.lock().unwrap()["k"].value,
            Bytes::from_static(b"v1")
        );
    }

    #[tokio::test]
    async fn a_call_without_the_grant_is_an_error_for_the_guest_and_reaches_no_host() {
        let host = MemoryHost::default();
        let publish_only = Grants {
            publish: true,
            namespace: Some(Namespace::new("ns").unwrap()),
            ..Grants::default()
        };
        for grants in [Grants::default(), publish_only] {
            let outcome = run(&put_then_get("k", 16), &grants, Some(host.clone())).await;
            assert_eq!(exit_and_stdout(outcome).0, -status::NOT_GRANTED);
        }
        assert!(host.values.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn bad_pointers_and_bad_keys_are_errors_for_the_guest_not_traps() {
        let outcome = run(
            &put_then_get("k", 70_000),
            &kv_grant(),
            Some(MemoryHost::default()),
        )
        .await;
        assert_eq!(exit_and_stdout(outcome).0, -status::BAD_POINTER);
        let outcome = run(
            &put_then_get("a.>", 16),
            &kv_grant(),
            Some(MemoryHost::default()),
        )
        .await;
        assert_eq!(exit_and_stdout(outcome).0, -status::INVALID_NAME);
    }

    #[tokio::test]
    async fn log_lines_reach_stderr_as_json() {
        let wat = r#"(module
          (import "apiary" "log" (func $log (param i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
          (memory (export "memory") 1)
          (data (i32.const 16) "hello")
          (func (export "_start")
            (drop (call $log (i32.const 3) (i32.const 16) (i32.const 5)))
            (call $exit (i32.sub (i32.const 0) (call $log (i32.const 9) (i32.const 16) (i32.const 5))))))"#;
        match run(wat, &Grants::default(), None).await {
            Outcome::Completed {
                exit_code, stderr, ..
            } => {
                assert_eq!(exit_code, -status::INVALID_ARGUMENT);
                let line: serde_json::Value =
                    serde_json::from_slice(stderr.0.trim_ascii_end()).expect("one json line");
                assert_eq!(
                    (line["log"].as_str(), line["msg"].as_str()),
                    (Some("warn"), Some("hello"))
                );
            }
            other => panic!("expected the module to complete, got {other:?}"),
        }
    }

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    /// The guest crate (`wasm-tasks/apiary-guest`, built for wasm32 in a workspace of its own,
    /// so it cannot share this module) repeats the status codes; they must be these.
    #[test]
    fn the_guest_crate_has_the_same_status_codes() {
        let guest = include_str!("../../../wasm-tasks/apiary-guest/src/sys.rs");
        let declared: BTreeMap<&str, i32> = guest
            .lines()
            .filter_map(|line| line.trim().strip_prefix("pub const "))
            .filter_map(|rest| {
                let (name, value) = rest.split_once(": i32 = ")?;
                Some((name, value.trim_end_matches(';').parse().ok()?))
            })
            .collect();
        let ours = [
            ("OK", status::OK),
            ("NOT_GRANTED", status::NOT_GRANTED),
            ("NOT_FOUND", status::NOT_FOUND),
            ("CONFLICT", status::CONFLICT),
            ("INVALID_NAME", status::INVALID_NAME),
            ("TOO_LARGE", status::TOO_LARGE),
            ("BUFFER_TOO_SMALL", status::BUFFER_TOO_SMALL),
            ("UNAVAILABLE", status::UNAVAILABLE),
            ("BAD_POINTER", status::BAD_POINTER),
            ("INVALID_ARGUMENT", status::INVALID_ARGUMENT),
        ];
        assert_eq!(declared, ours.into_iter().collect::<BTreeMap<_, _>>());
    }

    #[test]
    fn a_page_of_keys_holds_whole_keys_after_the_cursor() {
        let all = keys(&["a", "bb", "ccc"]);
        let page = page_of_keys(&all, "", 5);
        assert_eq!(page.bytes, b"a\nbb\n");
        assert_eq!((page.count, page.needed), (2, 5));
        let next = page_of_keys(&all, "bb", 5);
        assert_eq!(next.bytes, b"ccc\n");
        let done = page_of_keys(&all, "ccc", 5);
        assert_eq!((done.count, done.needed), (0, 0));
    }

    #[test]
    fn a_key_longer_than_the_buffer_says_what_it_needs() {
        let page = page_of_keys(&keys(&["long-key"]), "", 4);
        assert_eq!((page.count, page.needed), (0, 9));
    }

    #[test]
    fn log_lines_are_one_json_object_each() {
        let line = log_line("warn", b"disk \"full\"\nsoon", Instant::now());
        let text = std::str::from_utf8(&line).expect("utf-8");
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        let parsed: serde_json::Value = serde_json::from_str(text.trim_end()).expect("json");
        assert_eq!(parsed["log"], "warn");
        assert_eq!(parsed["msg"], "disk \"full\"\nsoon");
    }
}
