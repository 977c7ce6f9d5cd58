//! The module rows of `apiary bench`: what a node pays to get a module ready and run it,
//! measured on this machine with the agent's own sandbox and disk cache, no server involved.
//!
//! - **compile (cold)**: the bytes to a ready module, as the first run of a module on a node
//!   pays after its fetch.
//! - **load from the disk cache**: a restarted agent's first run of a module it compiled
//!   before (`apiary_agent::artifacts`).
//! - **run, warm**: a new store, instantiation, the call and the output, for a module
//!   already in memory: the part of a task's time on its node that is the sandbox's.
//! - **run, warm (pooling)**: the same, with instances, memories and tables taken from
//!   wasmtime's pooling allocator instead of mapped for each run.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use apiary_agent::artifacts::ArtifactCache;
use apiary_agent::sandbox::{Prepared, Sandbox};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use apiary_proto::message::{Grants, Limits};
use bytes::Bytes;

use crate::bench::{Figure, latency};

/// Slots of the pool in the pooled row: a node's worth.
const POOLED_INSTANCES: u32 = 16;

/// Compiles and loads are milliseconds each; this many give a steady median.
const COMPILE_SAMPLES: usize = 20;

/// The module rows for `module`, `samples` warm runs. Compiles and loads run right on the
/// benchmark's task: nothing else runs meanwhile.
pub async fn module_figures(module: Bytes, samples: usize) -> anyhow::Result<Vec<Figure>> {
    let module = &module[..];
    let sandbox = Sandbox::new()?;
    let timed = |run: &mut dyn FnMut() -> anyhow::Result<()>, count: usize| {
        let mut timings = Vec::with_capacity(count);
        for _ in 0..count {
            let started = Instant::now();
            run()?;
            timings.push(started.elapsed());
        }
        anyhow::Ok(timings)
    };

    let compile: Vec<Duration> = timed(
        &mut || {
            sandbox
                .compile(module)
                .map(drop)
                .map_err(|err| anyhow::anyhow!("{}", err.message))
        },
        COMPILE_SAMPLES,
    )?;

    let compiled = sandbox
        .compile(module)
        .map_err(|err| anyhow::anyhow!("{}", err.message))?;
    let dir = tempfile::tempdir().context("failed to make a directory for the disk cache")?;
    let cache = ArtifactCache::open(dir.path(), sandbox.engine(), 64 << 20)
        .context("failed to open the disk cache")?;
    let digest = apiary_proto::message::ModuleRef::for_bytes(module).sha256;
    cache.store(&digest, &compiled);
    let load: Vec<Duration> = timed(
        &mut || {
            cache
                .load(sandbox.engine(), &digest)
                .map(drop)
                .context("the disk cache lost the module")
        },
        COMPILE_SAMPLES,
    )?;

    // The agent keeps modules prepared (imports resolved), and runs them as here.
    let prepared = sandbox
        .prepare(compiled)
        .map_err(|err| anyhow::anyhow!("{}", err.message))?;
    let run = warm_runs(&sandbox, &prepared, samples).await;

    let pooled = Sandbox::pooled(POOLED_INSTANCES, Limits::default().max_memory_bytes)?;
    let prepared_in_pool = pooled
        .compile(module)
        .and_then(|compiled| pooled.prepare(compiled))
        .map_err(|err| anyhow::anyhow!("{}", err.message))?;
    let pooled_run = warm_runs(&pooled, &prepared_in_pool, samples).await;

    Ok(vec![
        latency("module: compile (cold)", compile),
        latency("module: load from the disk cache", load),
        latency("module: run, warm (store, instantiate, call)", run),
        latency("module: run, warm (pooling allocator)", pooled_run),
    ])
}

/// `samples` runs of a prepared module one after another, each timed: a store, the
/// instantiation, the call, the output, and the instance given back.
async fn warm_runs(sandbox: &Sandbox, prepared: &Prepared, samples: usize) -> Vec<Duration> {
    let input = Bytes::from_static(b"benchmark input");
    let (limits, grants) = (Limits::default(), Grants::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut timings = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        sandbox
            .run_prepared(prepared, input.clone(), &limits, &grants, &stop, None)
            .await;
        timings.push(started.elapsed());
    }
    timings
}
