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
    apiary_harness::sleeping_guest(task_time, apiary_harness::Answer::Uppercase)
        .context("failed to build the sleeping uppercase module")
}
