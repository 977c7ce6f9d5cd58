//! Runtime-only agents: an agent that compiles nothing runs a module once `apiary module
//! compile` has stored it precompiled for the agent's platform, loads it from its own disk
//! cache after a restart, and refuses garbage in the artifact store with a typed error.
//!
//! The agent here is the full build told to run only precompiled modules
//! (`precompiled_only`), which takes the same path as one built without the compiler;
//! `scripts/test` also checks that the build without it compiles.

use apiary_agent::AgentConfig;
use apiary_cli::modules::{self, ModuleCommand};
use apiary_harness::{Stack, wasm};
use apiary_proto::message::ModuleRef;
use apiary_proto::topology;
use apiary_sdk::{Task, TaskErrorKind};

fn runtime_only(stack: &Stack) -> AgentConfig {
    AgentConfig {
        precompiled_only: true,
        ..stack.agent_config("pi-1")
    }
}

#[tokio::test]
async fn a_runtime_only_agent_runs_what_module_compile_stored_for_its_platform() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let agent = stack.spawn_agent_online_with(runtime_only(&stack)).await;
    let client = stack.client().await;
    let uppercase = wasm("uppercase");

    // Not precompiled yet: a typed refusal that says what to do.
    let err = stack
        .run(Task::new(uppercase.clone()).input("early"))
        .await
        .expect_err("nothing to run yet");
    let failure = err.task_failure().expect("a task failure");
    assert_eq!(failure.error.kind, TaskErrorKind::ModuleNotFound, "{err}");
    assert!(failure.error.message.contains("module compile"), "{err}");

    let file = tempfile::NamedTempFile::new().expect("a file");
    std::fs::write(file.path(), &uppercase).expect("write the module");
    let mut printed = Vec::new();
    modules::module(
        &client,
        ModuleCommand::Compile {
            path: file.path().to_owned(),
            targets: Vec::new(),
        },
        &mut printed,
    )
    .await
    .expect("module compile");
    let printed = String::from_utf8(printed).expect("text");
    assert!(
        printed.starts_with(&ModuleRef::for_bytes(&uppercase).sha256),
        "{printed}"
    );
    assert!(printed.contains(&topology::host_platform()), "{printed}");

    let output = stack
        .run(Task::new(uppercase.clone()).input("hello"))
        .await
        .expect("runs precompiled");
    assert_eq!(output.stdout.as_ref(), b"HELLO");
    let stats = stack.agent_status("pi-1").await.modules;
    assert!(!stats.compiles);
    assert_eq!((stats.compiled, stats.precompiled), (0, 1));

    agent.crash().await;
    let _restarted = stack.spawn_agent_online_with(runtime_only(&stack)).await;
    let output = stack
        .run(Task::new(uppercase).input("again"))
        .await
        .expect("runs from the disk cache");
    assert_eq!(output.stdout.as_ref(), b"AGAIN");
    let stats = stack.agent_status("pi-1").await.modules;
    assert_eq!(
        (stats.compiled, stats.precompiled, stats.disk_loads),
        (0, 0, 1)
    );
}

#[tokio::test]
async fn garbage_in_the_artifact_store_is_an_invalid_module_and_the_agent_carries_on() {
    let stack = Stack::start().await;
    let _scheduler = stack.spawn_scheduler().await;
    let agent = stack.spawn_agent_online_with(runtime_only(&stack)).await;
    let client = stack.client().await;
    let module = wasm("wordcount");
    let reference = ModuleRef::for_bytes(&module);
    client
        .modules()
        .put_precompiled(
            &reference,
            &topology::host_platform(),
            b"\x7fELF not really machine code",
        )
        .await
        .expect("store the garbage");

    let err = stack
        .run(Task::new(module).input("a b"))
        .await
        .expect_err("garbage does not load");
    let failure = err.task_failure().expect("a task failure");
    assert_eq!(failure.error.kind, TaskErrorKind::InvalidModule, "{err}");
    assert!(failure.error.message.contains("does not load"), "{err}");
    assert!(!agent.is_finished(), "the agent stopped");
}
