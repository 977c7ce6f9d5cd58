//! What a run used, in every result: the node's figures against wasmtime's own for the same
//! module, through the SDK and through `apiary task submit --json`; and where the module came
//! from (compiled, memory, the disk cache), in the agent's status.

use apiary_cli::commands::{self, Output, SubmitOptions};
use apiary_harness::{PATIENCE, Stack, hostile, wasm};
use apiary_proto::message::{Limits, ModuleRef};
use apiary_sdk::{Task, TaskErrorKind};

/// A WASI command that loops 1,000 times, grows its memory by two pages and writes 5 bytes.
const COUNT_GROW_AND_SAY: &str = r#"(module
    (import "wasi_snapshot_preview1" "fd_write"
      (func $fd_write (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (data (i32.const 100) "hello")
    (func (export "_start")
      (local $i i32)
      (loop
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br_if 0 (i32.lt_u (local.get $i) (i32.const 1000))))
      (drop (memory.grow (i32.const 2)))
      (i32.store (i32.const 0) (i32.const 100))
      (i32.store (i32.const 4) (i32.const 5))
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// The fuel and final memory size of the same module in a plain wasmtime store, with
/// `fd_write` answered by a host function that does nothing (a host call costs the guest
/// the same fuel whatever the host does).
fn wasmtime_reference(wat: &str) -> (u64, u64) {
    let mut config = wasmtime::Config::new();
    config.consume_fuel(true);
    let engine = wasmtime::Engine::new(&config).expect("engine");
    let module = wasmtime::Module::new(&engine, wat::parse_str(wat).expect("wat")).expect("module");
    let mut linker = wasmtime::Linker::new(&engine);
    linker
        .func_wrap(
            "wasi_snapshot_preview1",
            "fd_write",
            |_: i32, _: i32, _: i32, _: i32| -> i32 { 0 },
        )
        .expect("fd_write");
    let mut store = wasmtime::Store::new(&engine, ());
    store.set_fuel(u64::MAX).expect("fuel");
    let instance = linker.instantiate(&mut store, &module).expect("instance");
    instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .expect("_start")
        .call(&mut store, ())
        .expect("runs");
    let memory = instance.get_memory(&mut store, "memory").expect("memory");
    (
        u64::MAX - store.get_fuel().expect("fuel"),
        memory.data_size(&store) as u64,
    )
}

#[tokio::test]
async fn every_result_carries_what_its_run_used_as_wasmtime_counts_it() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    let module = wat::parse_str(COUNT_GROW_AND_SAY).expect("wat");

    let output = client
        .submit(Task::new(module.clone()))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect("the task runs");
    assert_eq!(output.stdout.as_ref(), b"hello");
    let usage = output.usage.expect("the node reports what the run used");
    let (fuel, memory) = wasmtime_reference(COUNT_GROW_AND_SAY);
    assert_eq!(usage.fuel_consumed, fuel);
    assert_eq!(usage.peak_memory_bytes, memory);
    assert_eq!(usage.peak_memory_bytes, 3 * 65_536);
    assert_eq!((usage.stdout_bytes, usage.stdout_cut), (5, false));
    assert_eq!((usage.stderr_bytes, usage.stderr_cut), (0, false));
    assert_eq!(usage.module_sha256, ModuleRef::for_bytes(&module).sha256);
    assert!(usage.wall_time_us > 0);

    // A failed run is accounted too: the flood's output was cut at its limit.
    let err = client
        .submit(Task::new(hostile("stdout-flood")).limits(Limits {
            max_output_bytes: 100_000,
            ..Limits::default()
        }))
        .await
        .expect("submit")
        .result_within(PATIENCE)
        .await
        .expect_err("the flood fails");
    let failure = err.task_failure().expect("a task failure");
    assert_eq!(failure.error.kind, TaskErrorKind::OutputLimit);
    let usage = failure.usage.as_ref().expect("a failed run is accounted");
    assert_eq!((usage.stdout_bytes, usage.stdout_cut), (100_000, true));
    assert!(usage.fuel_consumed > 0);
}

#[tokio::test]
async fn task_submit_json_shows_what_the_run_used() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = commands::connect(stack.url()).await.expect("connect");
    let mut out = Output {
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    let module = wasm("uppercase").to_vec();
    let options = SubmitOptions {
        json: true,
        ..SubmitOptions::new(module.clone(), b"abc".to_vec())
    };
    let code = commands::task_submit(&client, options, &mut out)
        .await
        .expect("the command runs");
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let usage = &report["usage"];
    assert_eq!(usage["stdout_bytes"], 3, "{report:#}");
    assert_eq!(usage["stdout_cut"], false);
    assert_eq!(usage["module_sha256"], ModuleRef::for_bytes(&module).sha256);
    assert!(usage["fuel_consumed"].as_u64().expect("a number") > 0);
    assert!(usage["peak_memory_bytes"].as_u64().expect("a number") > 0);
    assert!(usage["wall_time_us"].is_u64());
}

#[tokio::test]
async fn a_module_is_compiled_once_then_comes_from_memory_and_after_a_restart_from_disk() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let agent = stack.spawn_agent_online("node-a").await;
    let client = stack.client().await;
    let run = |input: &'static str| {
        let client = client.clone();
        async move {
            client
                .submit(Task::new(wasm("uppercase")).input(input))
                .await
                .expect("submit")
                .result_within(PATIENCE)
                .await
                .expect("the task runs")
        }
    };

    assert_eq!(run("one").await.stdout.as_ref(), b"ONE");
    assert_eq!(run("two").await.stdout.as_ref(), b"TWO");
    let stats = stack.agent_status("node-a").await.modules;
    assert_eq!(
        (stats.compiled, stats.memory_hits, stats.disk_loads),
        (1, 1, 0)
    );
    assert!(stats.disk_bytes > 0, "the compiled module is kept on disk");

    // Killed, not stopped: the artifact was on disk before the first run.
    agent.crash().await;
    let _restarted = stack.spawn_agent_online("node-a").await;
    assert_eq!(run("three").await.stdout.as_ref(), b"THREE");
    let stats = stack.agent_status("node-a").await.modules;
    assert_eq!(
        (stats.compiled, stats.memory_hits, stats.disk_loads),
        (0, 0, 1),
        "the restarted agent compiled the module again"
    );
}

#[tokio::test]
async fn a_corrupted_module_in_the_store_is_refused_by_its_digest() {
    let (stack, _running) = Stack::with_one_node().await;
    let client = stack.client().await;
    let reference = client
        .upload_module(&wasm("uppercase"))
        .await
        .expect("upload");
    // Another valid module under uppercase's name, as a botched hand upload or a tampered
    // store leaves it: it would run, and answer for the wrong module.
    stack
        .put_module_object(&reference.sha256, &wasm("wordcount"))
        .await;

    let failure = stack
        .run_expecting_failure(
            Task::stored(reference).input("not run"),
            TaskErrorKind::ModuleDigestMismatch,
        )
        .await;
    assert!(failure.error.message.contains("do not hash"), "{failure}");
    let stats = stack.agent_status("node-a").await.modules;
    assert_eq!(stats.compiled, 0, "the wrong module was compiled");
}
