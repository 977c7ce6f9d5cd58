//! The WebAssembly sandbox: compiles modules and runs them under WASI preview 1 with limits.
//!
//! A task is a WASI command (`_start`). It reads its input on stdin, writes its answer to
//! stdout and may write diagnostics to stderr. It sees no files and no network, and unless
//! its submission grants them ([`Grants`]) no arguments beyond its name, no environment, and
//! clocks stopped at the Unix epoch. Each run gets a fresh store, so nothing leaks from one
//! task to the next.
//!
//! Limits, and how each is enforced:
//! - time: epoch interruption. A ticker thread advances the engine's epoch every
//!   [`EPOCH_TICK`], and each store traps once its deadline in ticks has passed.
//! - memory: a resource limiter that refuses, with a trap, growth past the limit.
//! - output: stdout and stderr are in-memory pipes ([`CappedOutput`]); a write past the
//!   limit traps, so a guest that would ignore failed writes cannot spin on until its
//!   timeout.
//! - CPU: optional wasmtime fuel, deterministic across machines.
//!
//! Nothing here touches NATS: the functions take bytes and limits and return an [`Outcome`],
//! so they are tested with plain modules.

mod guest_api;
mod output;
mod scratch;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use apiary_proto::Payload;
use apiary_proto::message::{Grants, Limits, Outcome, RunUsage, TaskError, TaskErrorKind};
use bytes::Bytes;
use wasmtime::{Config, Engine, InstancePre, Linker, Module, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{FsPerms, HostMonotonicClock, HostWallClock, I32Exit};

pub use guest_api::{AppHost, HostError, HostFuture, IMPORT_MODULE, KvValue, status};
use output::{CappedOutput, OutputLimitExceeded};
use scratch::{DiskLimitExceeded, Scratch};

/// The engine settings of every apiary engine, the agents' and `apiary module compile`'s, so
/// that a module precompiled elsewhere loads in an agent's engine.
pub fn engine_config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.consume_fuel(true);
    config
}

/// Compiles module bytes for `target` (a target triple such as
/// `aarch64-unknown-linux-musl`), as a runtime-only agent of that platform loads them.
/// Cranelift's baseline for the architecture: no CPU features beyond it are assumed, so the
/// artifact runs on every host of the platform.
#[cfg(feature = "compiler")]
pub fn precompile(bytes: &[u8], target: &str) -> Result<Vec<u8>, SandboxError> {
    let mut config = engine_config();
    config
        .target(target)
        .map_err(|err| SandboxError(format!("unsupported target {target}: {err:#}")))?;
    let engine = Engine::new(&config).map_err(|err| SandboxError(format!("{err:#}")))?;
    engine
        .precompile_module(bytes)
        .map_err(|err| SandboxError(format!("cannot compile the module for {target}: {err:#}")))
}

/// The directory under the agent's state directory where runs get their scratch
/// directories.
pub const SCRATCH_DIR_NAME: &str = "scratch";

/// Tables a module may have in a pooled sandbox (as the memory limiter allows elsewhere).
const POOLED_TABLES_PER_MODULE: u32 = 4;
/// Elements a table may have in a pooled sandbox.
const POOLED_TABLE_ELEMENTS: usize = 100_000;
/// What a pooled slot keeps mapped between runs.
const POOLED_KEEP_RESIDENT: usize = 256 * 1024;

/// How often the engine's epoch advances: the granularity of task timeouts.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How much fuel a guest spends between two yields to the thread that polls its run: about a
/// millisecond of compute on the development VM. An epoch tick alone would leave a guest on
/// the thread for up to [`EPOCH_TICK`] at a time.
pub const YIELD_EVERY_FUEL: u64 = 1_000_000;

/// Why the sandbox could not be set up. Fatal for the agent: without a sandbox it cannot run
/// anything.
#[derive(Debug, thiserror::Error)]
#[error("failed to set up the WebAssembly sandbox: {0}")]
pub struct SandboxError(String);

/// A compiled-module runner. Cheap to share: one per agent.
pub struct Sandbox {
    engine: Engine,
    /// Whether modules are compiled here; a runtime-only sandbox loads precompiled ones.
    compiles: bool,
    linker: Linker<TaskState>,
    ticker_stop: Arc<AtomicBool>,
    /// Where runs granted a scratch directory get theirs.
    scratch_root: PathBuf,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").finish_non_exhaustive()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// What each run's store holds.
pub(crate) struct TaskState {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
    api: guest_api::GuestApi,
    scratch: Option<Scratch>,
}

/// Refuses memory growth past the task's limit, and remembers that it did, so that the trap
/// that follows is reported as a memory limit and not as a generic failure. Also keeps the
/// largest size the memory reached: wasmtime asks it for the memory's first allocation too.
struct MemoryLimiter {
    max_memory_bytes: usize,
    exceeded: bool,
    peak_bytes: usize,
}

/// The error a refused memory growth traps with.
#[derive(Debug, thiserror::Error)]
#[error("memory limit of {limit} bytes exceeded: the module asked for {desired} bytes")]
struct MemoryLimitExceeded {
    limit: usize,
    desired: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory_bytes {
            self.exceeded = true;
            return Err(wasmtime::Error::new(MemoryLimitExceeded {
                limit: self.max_memory_bytes,
                desired,
            }));
        }
        self.peak_bytes = self.peak_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; a million entries is far beyond any real module.
        Ok(desired <= 1_000_000)
    }

    fn instances(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }
}

impl Sandbox {
    /// Builds the engine, the WASI linker, and starts the epoch ticker.
    pub fn new() -> Result<Self, SandboxError> {
        Self::with_config(&engine_config())
    }

    /// A sandbox whose runs take their instance, memory and table from a pool made once for
    /// `instances` runs at a time, each with at most `max_memory_bytes` of linear memory,
    /// instead of mapping and unmapping them for every run (wasmtime's pooling allocator).
    /// A run past `instances` at once fails to instantiate, with `internal`.
    pub fn pooled(instances: u32, max_memory_bytes: u64) -> Result<Self, SandboxError> {
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_core_instances(instances)
            .total_memories(instances)
            // Each run's guest stack is a fiber of its own (runs are async).
            .total_stacks(instances)
            .total_tables(instances.saturating_mul(POOLED_TABLES_PER_MODULE))
            .max_tables_per_module(POOLED_TABLES_PER_MODULE)
            .table_elements(POOLED_TABLE_ELEMENTS)
            .max_memory_size(usize::try_from(max_memory_bytes).unwrap_or(usize::MAX))
            // The first pages a run touches stay mapped for the next run of the slot, so a
            // small module does not fault its memory in again every time.
            .linear_memory_keep_resident(POOLED_KEEP_RESIDENT)
            .table_keep_resident(POOLED_KEEP_RESIDENT);
        let mut config = engine_config();
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        Self::with_config(&config)
    }

    fn with_config(config: &Config) -> Result<Self, SandboxError> {
        let engine = Engine::new(config).map_err(|err| SandboxError(format!("{err:#}")))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |state: &mut TaskState| {
            &mut state.wasi
        })
        .map_err(|err| SandboxError(format!("{err:#}")))?;
        guest_api::add_to_linker(&mut linker).map_err(|err| SandboxError(format!("{err:#}")))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let stop = ticker_stop.clone();
        std::thread::Builder::new()
            .name("apiary-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|err| SandboxError(format!("cannot start the epoch ticker: {err}")))?;

        Ok(Self {
            engine,
            linker,
            ticker_stop,
            scratch_root: scratch::default_root(),
            compiles: cfg!(feature = "compiler"),
        })
    }

    /// Makes this sandbox run only precompiled modules, as an agent built without the
    /// compiler does, even if it has one.
    pub fn precompiled_only(mut self) -> Self {
        self.compiles = false;
        self
    }

    /// Whether [`Sandbox::compile`] compiles; otherwise modules must come precompiled.
    pub fn compiles(&self) -> bool {
        self.compiles
    }

    /// Makes runs' scratch directories under `root`, which is emptied first of what an
    /// agent killed before its runs ended left there. The root is the sandbox's own: nothing
    /// else may keep files in it.
    pub fn with_scratch_root(mut self, root: PathBuf) -> Result<Self, SandboxError> {
        scratch::reset_root(&root).map_err(|err| {
            SandboxError(format!(
                "cannot prepare the scratch directory {}: {err}",
                root.display()
            ))
        })?;
        self.scratch_root = root;
        Ok(self)
    }

    /// The engine modules are compiled for.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles module bytes. CPU-heavy: call it off the async runtime. A runtime-only
    /// sandbox ([`Sandbox::compiles`] false) refuses, with `internal`: not the module's fault.
    pub fn compile(&self, bytes: &[u8]) -> Result<Module, TaskError> {
        #[cfg(feature = "compiler")]
        if self.compiles {
            return Module::from_binary(&self.engine, bytes).map_err(|err| {
                TaskError::new(
                    TaskErrorKind::InvalidModule,
                    format!("not a valid WebAssembly module: {err:#}"),
                )
            });
        }
        let _ = bytes;
        Err(TaskError::new(
            TaskErrorKind::Internal,
            "this agent runs only precompiled modules and cannot compile",
        ))
    }

    /// Resolves a compiled module's imports against the WASI linker once, so that each run
    /// only instantiates. A module that imports what the sandbox does not give is invalid.
    pub fn prepare(&self, module: Module) -> Result<Prepared, TaskError> {
        let pre = self.linker.instantiate_pre(&module).map_err(|err| {
            TaskError::new(
                TaskErrorKind::InvalidModule,
                format!("cannot instantiate the module: {err:#}"),
            )
        })?;
        Ok(Prepared { module, pre })
    }

    /// Runs a compiled module's `_start` with `input` on stdin, within `limits`.
    pub async fn run(&self, module: &Module, input: Bytes, limits: &Limits) -> Run {
        self.run_stoppable(
            module,
            input,
            limits,
            &Grants::default(),
            &Arc::new(AtomicBool::new(false)),
        )
        .await
    }

    /// [`Sandbox::run`], stopped with a `cancelled` failure within one epoch tick of `stop`
    /// being set (from any thread): the store's epoch callback looks at it every tick, and
    /// counts the ticks of the timeout too.
    pub async fn run_stoppable(
        &self,
        module: &Module,
        input: Bytes,
        limits: &Limits,
        grants: &Grants,
        stop: &Arc<AtomicBool>,
    ) -> Run {
        match self.prepare(module.clone()) {
            Ok(prepared) => {
                self.run_prepared(&prepared, input, limits, grants, stop, None)
                    .await
            }
            Err(error) => Run::not_started(Outcome::Failed {
                error,
                stderr: Payload::default(),
            }),
        }
    }

    /// [`Sandbox::run_stoppable`] for a module prepared before: what the agent runs. `host`
    /// serves the host APIs the grants allow; without one, a granted call gets
    /// [`status::UNAVAILABLE`].
    ///
    /// The run is a future: the guest runs on a fiber of its own, on the thread that polls
    /// it, and yields every [`YIELD_EVERY_FUEL`] of fuel and at every epoch tick, so a long
    /// run shares its thread with other tasks instead of holding it, and a host call that
    /// waits (a WASI sleep, an app-store call) suspends it. Dropping the future ends the
    /// run.
    pub async fn run_prepared(
        &self,
        prepared: &Prepared,
        input: Bytes,
        limits: &Limits,
        grants: &Grants,
        stop: &Arc<AtomicBool>,
        host: Option<Box<dyn AppHost>>,
    ) -> Run {
        let output_limit = usize::try_from(limits.max_output_bytes).unwrap_or(usize::MAX);
        let stdout = CappedOutput::new(output_limit);
        let stderr = CappedOutput::new(output_limit);
        let mut wasi = wasmtime_wasi::WasiCtxBuilder::new();
        // Not `allow_blocking_current_thread`: with it, wasmtime-wasi sleeps a guest's
        // `poll_oneoff` with `std::thread::sleep`, holding the worker thread the run shares.
        wasi.stdin(MemoryInputPipe::new(input))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .arg("task")
            .args(&grants.args);
        let env: Vec<(&String, &String)> = grants.env.iter().collect();
        wasi.envs(&env);
        if !grants.clock {
            wasi.wall_clock(StoppedClock).monotonic_clock(StoppedClock);
        }
        let scratch = match grants.scratch_bytes {
            Some(cap) => match self.scratch(&mut wasi, cap) {
                Ok(scratch) => Some(scratch),
                Err(message) => return not_started(TaskErrorKind::Internal, message, &stderr),
            },
            None => None,
        };
        let wasi = wasi.build_p1();
        let mut store = Store::new(
            &self.engine,
            TaskState {
                wasi,
                limiter: MemoryLimiter {
                    max_memory_bytes: usize::try_from(limits.max_memory_bytes)
                        .unwrap_or(usize::MAX),
                    exceeded: false,
                    peak_bytes: 0,
                },
                api: guest_api::GuestApi::new(grants, host, stderr.clone()),
                scratch,
            },
        );
        store.limiter(|state| &mut state.limiter);
        let mut ticks_left = deadline_ticks(limits.timeout_ms);
        let stop = stop.clone();
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |store| {
            if stop.load(Ordering::Relaxed) {
                return Err(wasmtime::Error::new(Stopped));
            }
            if let Some(scratch) = &store.data().scratch {
                scratch.check().map_err(wasmtime::Error::new)?;
            }
            ticks_left = ticks_left.saturating_sub(1);
            if ticks_left == 0 {
                return Err(wasmtime::Error::new(Trap::Interrupt));
            }
            // Give the thread to the other tasks that wait for it, once a tick.
            Ok(wasmtime::UpdateDeadline::Yield(1))
        });
        let fuel = limits.fuel.unwrap_or(u64::MAX);
        if let Err(err) = store
            .set_fuel(fuel)
            .and_then(|()| store.fuel_async_yield_interval(Some(YIELD_EVERY_FUEL)))
        {
            return not_started(
                TaskErrorKind::Internal,
                format!("cannot set fuel: {err:#}"),
                &stderr,
            );
        }

        let started = Instant::now();
        let call = match prepared.pre.instantiate_async(&mut store).await {
            Err(err) => Err((Stage::Instantiate, err)),
            Ok(instance) => match instance.get_typed_func::<(), ()>(&mut store, "_start") {
                Err(err) => Err((Stage::FindStart, err)),
                Ok(start) => start
                    .call_async(&mut store, ())
                    .await
                    .map_err(|err| (Stage::Run, err)),
            },
        };
        let (stdout_bytes, stdout_cut) = stdout.written();
        let (stderr_bytes, stderr_cut) = stderr.written();
        let usage = RunUsage {
            module_sha256: String::new(),
            // What is left after a run out of fuel is 0; after a store that could not say,
            // nothing was counted.
            fuel_consumed: store.get_fuel().map_or(0, |left| fuel.saturating_sub(left)),
            wall_time_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            peak_memory_bytes: store.data().limiter.peak_bytes as u64,
            stdout_bytes,
            stdout_cut,
            stderr_bytes,
            stderr_cut,
            scratch_bytes: store.data().scratch.as_ref().map_or(0, Scratch::used),
            host_calls: store.data().api.calls,
        };
        // A run may pass its scratch cap after the last tick's check; it fails all the same.
        let call = call.and_then(|()| match &store.data().scratch {
            Some(scratch) => scratch
                .check()
                .map(drop)
                .map_err(|err| (Stage::Run, wasmtime::Error::new(err))),
            None => Ok(()),
        });
        let outcome = Self::outcome(call, &store, limits, &stdout, &stderr);
        Run {
            outcome,
            usage,
            spent: Spent(Some(store)),
        }
    }

    /// A scratch directory for one run, preopened for the guest at [`scratch::GUEST_PATH`].
    fn scratch(
        &self,
        wasi: &mut wasmtime_wasi::WasiCtxBuilder,
        cap: u64,
    ) -> Result<Scratch, String> {
        let scratch = Scratch::create(&self.scratch_root, cap)
            .map_err(|err| format!("cannot make the task's scratch directory: {err}"))?;
        wasi.preopened_dir(scratch.path(), scratch::GUEST_PATH, FsPerms::ReadWrite)
            .map_err(|err| format!("cannot open the task's scratch directory: {err:#}"))?;
        Ok(scratch)
    }

    /// What a run's end means for the task: completed with its exit code, or failed with the
    /// kind of failure a user can act on.
    fn outcome(
        call: Result<(), (Stage, wasmtime::Error)>,
        store: &Store<TaskState>,
        limits: &Limits,
        stdout: &CappedOutput,
        stderr: &CappedOutput,
    ) -> Outcome {
        let output_limit = usize::try_from(limits.max_output_bytes).unwrap_or(usize::MAX);

        // Classified by the error that ended the run, so that a run that ended otherwise
        // (out of fuel, at its timeout) is reported as what ended it.
        let output_exceeded = matches!(&call, Err((Stage::Run, err)) if err.downcast_ref::<OutputLimitExceeded>().is_some());
        if output_exceeded {
            return failed(
                TaskErrorKind::OutputLimit,
                OutputLimitExceeded {
                    limit: output_limit,
                }
                .to_string(),
                stderr,
            );
        }
        if let Err((Stage::Run, err)) = &call
            && let Some(exceeded) = err.downcast_ref::<DiskLimitExceeded>()
        {
            return failed(TaskErrorKind::DiskLimit, exceeded.to_string(), stderr);
        }
        match call {
            Ok(()) => completed(0, stdout, stderr),
            Err((Stage::Run, err)) if err.downcast_ref::<I32Exit>().is_some() => {
                let code = err.downcast_ref::<I32Exit>().map_or(0, |exit| exit.0);
                completed(code, stdout, stderr)
            }
            Err((stage, err)) => {
                let memory_exceeded = store.data().limiter.exceeded;
                let (kind, message) = classify(stage, &err, memory_exceeded, limits);
                failed(kind, message, stderr)
            }
        }
    }
}

/// The clocks of a task not granted the host's: both stand at 0, the Unix epoch, so a
/// module cannot time anything on the node (or learn when it runs) unless it is allowed to.
struct StoppedClock;

impl HostWallClock for StoppedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for StoppedClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }

    fn now(&self) -> u64 {
        0
    }
}

/// A compiled module with its imports resolved ([`Sandbox::prepare`]): what the agent keeps
/// in memory, so that a run only makes a store and instantiates. Cheap to clone.
#[derive(Clone)]
pub struct Prepared {
    module: Module,
    pre: InstancePre<TaskState>,
}

impl Prepared {
    /// The compiled module, as the disk cache keeps it.
    pub fn module(&self) -> &Module {
        &self.module
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").finish_non_exhaustive()
    }
}

/// How a run ended, and what it used. `usage.module_sha256` is left for the caller, which
/// knows the module by its digest.
#[derive(Debug)]
pub struct Run {
    pub outcome: Outcome,
    pub usage: RunUsage,
    /// The run's instance, given back to its pool when this is dropped.
    pub spent: Spent,
}

impl Run {
    /// A run that ended before its module started: nothing was used.
    pub fn not_started(outcome: Outcome) -> Self {
        Self {
            outcome,
            usage: RunUsage::default(),
            spent: Spent(None),
        }
    }
}

/// What is left of a run's instance. Dropping it gives the instance back to its pool, which
/// resets its memory then: a few microseconds that the agent spends after the run's result
/// is on its way rather than before (docs/BENCHMARKS.md).
pub struct Spent(Option<Store<TaskState>>);

impl std::fmt::Debug for Spent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Spent(instance)"
        } else {
            "Spent(none)"
        })
    }
}

/// Why a run was stopped from outside.
#[derive(Debug, thiserror::Error)]
#[error("the run was stopped from outside")]
struct Stopped;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Instantiate,
    FindStart,
    Run,
}

fn deadline_ticks(timeout_ms: u64) -> u64 {
    let tick_ms = u64::try_from(EPOCH_TICK.as_millis()).unwrap_or(1).max(1);
    timeout_ms.div_ceil(tick_ms).max(1)
}

/// Turns a wasmtime error into the task error kind a user can act on.
fn classify(
    stage: Stage,
    err: &wasmtime::Error,
    memory_exceeded: bool,
    limits: &Limits,
) -> (TaskErrorKind, String) {
    if memory_exceeded || err.downcast_ref::<MemoryLimitExceeded>().is_some() {
        return (TaskErrorKind::MemoryLimit, format!("{err:#}"));
    }
    match stage {
        // The node's pool of instances is full (runs given up on still hold theirs): the
        // node's trouble, not the module's.
        Stage::Instantiate
            if err
                .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
                .is_some() =>
        {
            return (
                TaskErrorKind::Internal,
                format!("this node has no free instance slot: {err:#}"),
            );
        }
        Stage::Instantiate => {
            return (
                TaskErrorKind::InvalidModule,
                format!("cannot instantiate the module: {err:#}"),
            );
        }
        Stage::FindStart => {
            return (
                TaskErrorKind::InvalidModule,
                format!("the module is not a WASI command (no `_start` export): {err:#}"),
            );
        }
        Stage::Run => {}
    }
    if err.downcast_ref::<Stopped>().is_some() {
        return (
            TaskErrorKind::Cancelled,
            "the run was stopped: the task was cancelled or handed back".into(),
        );
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => (
            TaskErrorKind::Timeout,
            format!(
                "the task ran longer than its {} ms limit",
                limits.timeout_ms
            ),
        ),
        Some(Trap::OutOfFuel) => (
            TaskErrorKind::FuelExhausted,
            format!(
                "the task used up its fuel budget of {}",
                limits.fuel.unwrap_or(u64::MAX)
            ),
        ),
        Some(trap) => (TaskErrorKind::Trap, format!("the module trapped: {trap}")),
        None => (TaskErrorKind::Trap, format!("the module failed: {err:#}")),
    }
}

fn completed(exit_code: i32, stdout: &CappedOutput, stderr: &CappedOutput) -> Outcome {
    Outcome::Completed {
        exit_code,
        stdout: Payload(stdout.contents()),
        stderr: Payload(stderr.contents()),
    }
}

/// A run that failed before the module started: nothing was used.
fn not_started(kind: TaskErrorKind, message: String, stderr: &CappedOutput) -> Run {
    Run::not_started(failed(kind, message, stderr))
}

fn failed(kind: TaskErrorKind, message: String, stderr: &CappedOutput) -> Outcome {
    Outcome::Failed {
        error: TaskError::new(kind, message),
        stderr: Payload(stderr.contents()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox() -> Sandbox {
        Sandbox::new().expect("sandbox")
    }

    fn module(sandbox: &Sandbox, wat: &str) -> Module {
        sandbox
            .compile(&wat::parse_str(wat).expect("valid wat"))
            .expect("compiles")
    }

    /// A WASI command that copies stdin to stdout, byte for byte through one buffer.
    const ECHO: &str = r#"
        (module
          (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 64))   ;; iovec.buf
            (i32.store (i32.const 4) (i32.const 1024)) ;; iovec.len
            (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
            (i32.store (i32.const 4) (i32.load (i32.const 8)))
            (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
    "#;

    /// A WASI command that never returns.
    const SPIN_FOREVER: &str = r#"(module (memory (export "memory") 1)
        (func (export "_start") (loop (br 0))))"#;

    #[tokio::test]
    async fn runs_a_command_with_stdin_and_stdout() {
        let sandbox = sandbox();
        let module = module(&sandbox, ECHO);
        let outcome = sandbox
            .run(&module, Bytes::from_static(b"hello"), &Limits::default())
            .await
            .outcome;
        assert_eq!(
            outcome,
            Outcome::Completed {
                exit_code: 0,
                stdout: Payload::from("hello"),
                stderr: Payload::default(),
            }
        );
    }

    #[tokio::test]
    async fn reports_the_exit_code() {
        let sandbox = sandbox();
        let module = module(
            &sandbox,
            r#"(module
                 (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                 (memory (export "memory") 1)
                 (func (export "_start") (call $exit (i32.const 3))))"#,
        );
        match sandbox
            .run(&module, Bytes::new(), &Limits::default())
            .await
            .outcome
        {
            Outcome::Completed { exit_code, .. } => assert_eq!(exit_code, 3),
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    #[tokio::test]
    async fn random_bytes_are_an_invalid_module() {
        let err = sandbox().compile(&[0x13, 0x37, 0xde, 0xad]).unwrap_err();
        assert_eq!(err.kind, TaskErrorKind::InvalidModule);
    }

    /// Compiles `wat`, runs it with `input` under `limits`, and returns how it failed.
    async fn fails_with(wat: &str, input: &'static [u8], limits: Limits) -> TaskErrorKind {
        let sandbox = sandbox();
        let module = module(&sandbox, wat);
        failure_kind(
            sandbox
                .run(&module, Bytes::from_static(input), &limits)
                .await
                .outcome,
        )
    }

    fn failure_kind(outcome: Outcome) -> TaskErrorKind {
        match outcome {
            Outcome::Failed { error, .. } => error.kind,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_endless_loop_times_out() {
        let limits = Limits {
            timeout_ms: 50,
            ..Limits::default()
        };
        assert_eq!(
            fails_with(SPIN_FOREVER, b"", limits).await,
            TaskErrorKind::Timeout
        );
    }

    #[tokio::test]
    async fn a_stop_from_another_thread_ends_an_endless_loop_as_cancelled() {
        let sandbox = Arc::new(sandbox());
        let module = module(
            &sandbox,
            r#"(module (memory (export "memory") 1)
                 (func (export "_start") (loop (br 0))))"#,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let running = {
            let (sandbox, stop) = (sandbox.clone(), stop.clone());
            std::thread::spawn(move || {
                let limits = Limits {
                    timeout_ms: 600_000,
                    ..Limits::default()
                };
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime
                    .block_on(sandbox.run_stoppable(
                        &module,
                        Bytes::new(),
                        &limits,
                        &Grants::default(),
                        &stop,
                    ))
                    .outcome
            })
        };
        stop.store(true, Ordering::Relaxed);
        let outcome = running.join().unwrap();
        assert_eq!(failure_kind(outcome), TaskErrorKind::Cancelled);
    }

    #[tokio::test]
    async fn fuel_bounds_cpu() {
        let limits = Limits {
            fuel: Some(10_000),
            ..Limits::default()
        };
        assert_eq!(
            fails_with(SPIN_FOREVER, b"", limits).await,
            TaskErrorKind::FuelExhausted
        );
    }

    #[tokio::test]
    async fn memory_growth_past_the_limit_fails() {
        let limits = Limits {
            max_memory_bytes: 2 * 65536,
            ..Limits::default()
        };
        assert_eq!(
            fails_with(
                r#"(module (memory (export "memory") 1)
                 (func (export "_start") (drop (memory.grow (i32.const 100)))))"#,
                b"",
                limits
            )
            .await,
            TaskErrorKind::MemoryLimit
        );
    }

    #[tokio::test]
    async fn a_pooled_sandbox_runs_one_module_after_another_with_the_same_limits() {
        let sandbox = Sandbox::pooled(2, 64 * 1024 * 1024).expect("pooled sandbox");
        let echo = module(&sandbox, ECHO);
        // More runs than the pool has slots: each gives its slot back.
        for round in 0..5 {
            let input = format!("round {round}");
            match sandbox
                .run(&echo, Bytes::from(input.clone()), &Limits::default())
                .await
                .outcome
            {
                Outcome::Completed { stdout, .. } => assert_eq!(stdout.0, input.as_bytes()),
                other => panic!("expected the echo, got {other:?}"),
            }
        }
        let bomb = module(
            &sandbox,
            r#"(module (memory (export "memory") 1)
             (func (export "_start") (drop (memory.grow (i32.const 100)))))"#,
        );
        let limits = Limits {
            max_memory_bytes: 2 * 65536,
            ..Limits::default()
        };
        assert_eq!(
            failure_kind(sandbox.run(&bomb, Bytes::new(), &limits).await.outcome),
            TaskErrorKind::MemoryLimit
        );
    }

    #[tokio::test]
    async fn output_past_the_limit_fails() {
        let sandbox = sandbox();
        let module = module(&sandbox, ECHO);
        let limits = Limits {
            max_output_bytes: 4,
            ..Limits::default()
        };
        assert_eq!(
            failure_kind(
                sandbox
                    .run(&module, Bytes::from_static(b"too long"), &limits)
                    .await
                    .outcome
            ),
            TaskErrorKind::OutputLimit
        );
    }

    #[tokio::test]
    async fn a_flood_that_ignores_failed_writes_ends_at_its_output_limit() {
        // 64 KiB per write, for ever, never looking at a write's result. Its fuel lasts
        // about a million writes and its timeout is far away: spinning on failed writes it
        // would end as `fuel_exhausted`; stopped at the limit, it ends as `output_limit`.
        let flood = r#"(module
            (import "wasi_snapshot_preview1" "fd_write"
              (func $write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 2)
            (func (export "_start")
              (i32.store (i32.const 0) (i32.const 65536))
              (i32.store (i32.const 4) (i32.const 65536))
              (loop
                (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
                (br 0))))"#;
        let sandbox = sandbox();
        let module = module(&sandbox, flood);
        let limits = Limits {
            timeout_ms: 600_000,
            fuel: Some(5_000_000),
            max_output_bytes: 1024 * 1024,
            ..Limits::default()
        };
        match sandbox.run(&module, Bytes::new(), &limits).await.outcome {
            Outcome::Failed { error, .. } => {
                assert_eq!(error.kind, TaskErrorKind::OutputLimit, "{}", error.message)
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn stderr_is_kept_up_to_the_limit_when_it_is_passed() {
        let stderr_flood = r#"(module
            (import "wasi_snapshot_preview1" "fd_write"
              (func $write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 100) "0123456789")
            (func (export "_start")
              (i32.store (i32.const 0) (i32.const 100))
              (i32.store (i32.const 4) (i32.const 10))
              (loop
                (drop (call $write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
                (br 0))))"#;
        let sandbox = sandbox();
        let module = module(&sandbox, stderr_flood);
        let limits = Limits {
            max_output_bytes: 25,
            ..Limits::default()
        };
        match sandbox.run(&module, Bytes::new(), &limits).await.outcome {
            Outcome::Failed { error, stderr } => {
                assert_eq!(error.kind, TaskErrorKind::OutputLimit);
                assert_eq!(&stderr.0[..], b"0123456789012345678901234");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// A module with no imports that loops 1,000 times and grows its memory by two pages:
    /// its fuel and peak memory are the same in any wasmtime store.
    const COUNT_AND_GROW: &str = r#"(module
        (memory (export "memory") 1)
        (func (export "_start")
          (local $i i32)
          (loop
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br_if 0 (i32.lt_u (local.get $i) (i32.const 1000))))
          (drop (memory.grow (i32.const 2)))))"#;

    #[tokio::test]
    async fn a_run_reports_the_fuel_and_peak_memory_wasmtime_counts() {
        let sandbox = sandbox();
        let module = module(&sandbox, COUNT_AND_GROW);
        let run = sandbox.run(&module, Bytes::new(), &Limits::default()).await;
        assert!(matches!(
            run.outcome,
            Outcome::Completed { exit_code: 0, .. }
        ));

        // The same module in a plain store of its own engine, metered the same way.
        let mut config = Config::new();
        config.consume_fuel(true);
        let engine = Engine::new(&config).unwrap();
        let plain = Module::new(&engine, wat::parse_str(COUNT_AND_GROW).unwrap()).unwrap();
        let mut store = Store::new(&engine, ());
        store.set_fuel(u64::MAX).unwrap();
        let instance = wasmtime::Instance::new(&mut store, &plain, &[]).unwrap();
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .unwrap();
        start.call(&mut store, ()).unwrap();
        let fuel = u64::MAX - store.get_fuel().unwrap();
        let memory = instance.get_memory(&mut store, "memory").unwrap();

        assert!(fuel > 1_000, "a thousand iterations cost more than {fuel}");
        assert_eq!(run.usage.fuel_consumed, fuel);
        assert_eq!(run.usage.peak_memory_bytes, memory.data_size(&store) as u64);
        assert_eq!(run.usage.peak_memory_bytes, 3 * 65_536);
        assert!(run.usage.wall_time_us > 0);
    }

    #[tokio::test]
    async fn a_run_reports_its_output_and_whether_it_was_cut() {
        let sandbox = sandbox();
        let module = module(&sandbox, ECHO);
        let run = sandbox
            .run(&module, Bytes::from_static(b"hello"), &Limits::default())
            .await;
        assert_eq!((run.usage.stdout_bytes, run.usage.stdout_cut), (5, false));
        assert_eq!((run.usage.stderr_bytes, run.usage.stderr_cut), (0, false));

        let limits = Limits {
            max_output_bytes: 4,
            ..Limits::default()
        };
        let run = sandbox
            .run(&module, Bytes::from_static(b"hello"), &limits)
            .await;
        assert_eq!(failure_kind(run.outcome), TaskErrorKind::OutputLimit);
        assert_eq!((run.usage.stdout_bytes, run.usage.stdout_cut), (4, true));
    }

    #[tokio::test]
    async fn a_run_out_of_fuel_consumed_all_of_it() {
        let sandbox = sandbox();
        let module = module(&sandbox, SPIN_FOREVER);
        let limits = Limits {
            fuel: Some(10_000),
            ..Limits::default()
        };
        let run = sandbox.run(&module, Bytes::new(), &limits).await;
        assert_eq!(failure_kind(run.outcome), TaskErrorKind::FuelExhausted);
        assert_eq!(run.usage.fuel_consumed, 10_000);
    }

    /// `wasm-tasks/probes/grants.wat`: prints argc, the number of environment variables,
    /// and whether the wall and monotonic clocks read anything but 0.
    const GRANTS_PROBE: &str = include_str!("../../../wasm-tasks/probes/grants.wat");

    async fn probe(grants: &Grants) -> String {
        let sandbox = sandbox();
        let module = module(&sandbox, GRANTS_PROBE);
        let run = sandbox
            .run_stoppable(
                &module,
                Bytes::new(),
                &Limits::default(),
                grants,
                &Arc::new(AtomicBool::new(false)),
            )
            .await;
        match run.outcome {
            Outcome::Completed { stdout, .. } => String::from_utf8(stdout.0.to_vec()).unwrap(),
            other => panic!("the probe failed: {other:?}"),
        }
    }

    #[tokio::test]
    async fn without_grants_a_module_sees_its_name_no_environment_and_stopped_clocks() {
        assert_eq!(probe(&Grants::default()).await, "1000");
    }

    #[tokio::test]
    async fn granted_arguments_environment_and_clock_are_seen() {
        let grants = Grants {
            args: vec!["--fast".into(), "file.txt".into()],
            env: [("LANG".to_owned(), "C".to_owned())].into(),
            clock: true,
            ..Grants::default()
        };
        let seen = probe(&grants).await;
        assert_eq!(&seen[..3], "311", "argc, env count, wall clock: {seen}");
    }

    #[tokio::test]
    async fn a_trap_is_reported_as_such() {
        assert_eq!(
            fails_with(
                r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#,
                b"",
                Limits::default()
            )
            .await,
            TaskErrorKind::Trap
        );
    }

    #[tokio::test]
    async fn a_module_without_start_is_invalid() {
        let sandbox = sandbox();
        let module = module(&sandbox, r#"(module (memory (export "memory") 1))"#);
        assert_eq!(
            failure_kind(
                sandbox
                    .run(&module, Bytes::new(), &Limits::default())
                    .await
                    .outcome
            ),
            TaskErrorKind::InvalidModule
        );
    }

    #[tokio::test]
    async fn unknown_imports_are_an_invalid_module() {
        assert_eq!(
            fails_with(
                r#"(module (import "env" "launch_missiles" (func))
                 (memory (export "memory") 1) (func (export "_start")))"#,
                b"",
                Limits::default()
            )
            .await,
            TaskErrorKind::InvalidModule
        );
    }
}
