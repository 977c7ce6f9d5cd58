//! The task the load generator submits: the uppercase guest (`uppercase.wasm`), or the same
//! answer given after a wait on the monotonic clock.
//!
//! The wait matters. `uppercase.wasm` finishes in about a millisecond, so an agent killed at
//! a random moment almost never holds a task, and the suite could not see what becomes of
//! work that dies with its node (redelivery after the ack wait, a new incarnation reclaiming
//! it). A task that holds its slot for tens of milliseconds is in flight at most kills,
//! without burning a core on a two-core machine.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

/// The module bytes for tasks that take `task_time` (0: `uppercase.wasm` from `wasm_dir`).
pub fn load(task_time: Duration, wasm_dir: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    if task_time.is_zero() {
        let dir = wasm_dir
            .context("--task-time 0 runs uppercase.wasm: pass --wasm-dir or set APIARY_WASM_DIR")?;
        let path = dir.join("uppercase.wasm");
        return std::fs::read(&path).with_context(|| format!("failed to read {}", path.display()));
    }
    sleeping_uppercase(task_time)
}

/// A guest that waits `duration` on the monotonic clock, then answers like `uppercase.wasm`
/// for inputs up to 4 KiB: its stdin on stdout with ASCII letters in upper case. It traps if
/// the clock cannot be waited on, so a task that did not wait never passes for one that did.
fn sleeping_uppercase(duration: Duration) -> anyhow::Result<Vec<u8>> {
    let nanos = u64::try_from(duration.as_nanos()).context("the task time is too long")?;
    // One WASI `subscription` at offset 0 (a relative timeout on the monotonic clock, id 1),
    // its `event` at 64, the event count at 96; an iovec at 128 for a 4 KiB buffer at 1024,
    // the byte count read at 136 and the count written at 140.
    wat::parse_str(format!(
        r#"(module
             (import "wasi_snapshot_preview1" "poll_oneoff"
               (func $poll (param i32 i32 i32 i32) (result i32)))
             (import "wasi_snapshot_preview1" "fd_read"
               (func $read (param i32 i32 i32 i32) (result i32)))
             (import "wasi_snapshot_preview1" "fd_write"
               (func $write (param i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "_start") (local $n i32) (local $i i32) (local $c i32)
               (i32.store8 (i32.const 8) (i32.const 0))
               (i32.store (i32.const 16) (i32.const 1))
               (i64.store (i32.const 24) (i64.const {nanos}))
               (i64.store (i32.const 32) (i64.const 0))
               (i32.store16 (i32.const 40) (i32.const 0))
               (if (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 96))
                 (then unreachable))
               (block $done
                 (loop $again
                   (i32.store (i32.const 128) (i32.const 1024))
                   (i32.store (i32.const 132) (i32.const 4096))
                   (br_if $done
                     (call $read (i32.const 0) (i32.const 128) (i32.const 1) (i32.const 136)))
                   (local.set $n (i32.load (i32.const 136)))
                   (br_if $done (i32.eqz (local.get $n)))
                   (local.set $i (i32.const 0))
                   (block $upper_done
                     (loop $upper
                       (br_if $upper_done (i32.ge_u (local.get $i) (local.get $n)))
                       (local.set $c (i32.load8_u (i32.add (i32.const 1024) (local.get $i))))
                       (if (i32.and (i32.ge_u (local.get $c) (i32.const 97))
                                    (i32.le_u (local.get $c) (i32.const 122)))
                         (then (i32.store8 (i32.add (i32.const 1024) (local.get $i))
                                           (i32.sub (local.get $c) (i32.const 32)))))
                       (local.set $i (i32.add (local.get $i) (i32.const 1)))
                       (br $upper)))
                   (i32.store (i32.const 132) (local.get $n))
                   (drop (call $write (i32.const 1) (i32.const 128) (i32.const 1) (i32.const 140)))
                   (br $again)))))"#
    ))
    .context("failed to build the sleeping uppercase module")
}
