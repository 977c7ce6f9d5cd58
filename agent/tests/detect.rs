//! `apiary-agent detect`, run as the built binary: what it prints, from which settings, on a
//! host without NVIDIA's driver.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

/// A library path where NVML is not, so the test sees a host without the NVIDIA driver even
/// on a machine that has one.
const NO_NVML: &str = "/nonexistent/apiary-test/libnvidia-ml.so.1";

/// Runs the agent binary with only the given environment.
fn agent(args: &[&str], env: &[(&str, &str)], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_apiary-agent"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .expect("the agent binary runs")
}

fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "detect failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON document")
}

#[test]
fn detect_prints_the_inventory_of_a_host_without_nvml_and_says_why_only_at_debug_level() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    // A NATS URL nothing answers at: detect must not need it.
    let env = [
        ("APIARY_NVML_LIBRARY", NO_NVML),
        ("APIARY_NATS_URL", "nats://127.0.0.1:1"),
    ];

    let quiet = agent(&["detect"], &env, dir.path());
    let inventory = json_of(&quiet);
    for key in ["cpu", "memory", "disks", "gpus", "services", "runtime"] {
        assert!(inventory.get(key).is_some(), "no {key} in {inventory}");
    }
    assert_eq!(inventory["gpus"], json!([]));
    assert!(inventory["cpu"]["logical_cores"].as_u64() >= Some(1));
    assert!(inventory["memory"]["total_bytes"].as_u64() > Some(0));
    assert_eq!(inventory["runtime"]["wasi"], "preview1");
    assert!(
        quiet.stderr.is_empty(),
        "a host without GPUs is not worth a log line by default: {}",
        String::from_utf8_lossy(&quiet.stderr)
    );

    let debug = agent(
        &["detect"],
        &[env[0], env[1], ("APIARY_LOG", "debug")],
        dir.path(),
    );
    assert_eq!(json_of(&debug)["gpus"], json!([]));
    let stderr = String::from_utf8_lossy(&debug.stderr);
    assert!(
        stderr.contains("no GPUs") && stderr.contains(NO_NVML) && stderr.contains("DEBUG"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("WARN") && !stderr.contains("ERROR"),
        "{stderr}"
    );
}

#[test]
fn detect_takes_its_settings_from_the_file_then_the_environment_then_the_flags() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(
        dir.path().join("agent.toml"),
        r#"
        slots = 2
        max_task_memory = 1000
        max_task_timeout = "10m"
        roles = ["from-file"]
        [labels]
        zone = "file"
        rack = "file"
        "#,
    )
    .expect("write the configuration file");
    let env = [
        ("APIARY_NVML_LIBRARY", NO_NVML),
        ("APIARY_SLOTS", "3"),
        ("APIARY_MAX_TASK_MEMORY", "2000"),
        ("APIARY_LABELS", r#"{zone="env"}"#),
    ];

    let file_and_env = json_of(&agent(
        &["--config", "agent.toml", "detect"],
        &env,
        dir.path(),
    ));
    assert_eq!(file_and_env["runtime"]["slots"], 3);
    assert_eq!(file_and_env["runtime"]["max_task_memory_bytes"], 2000);
    assert_eq!(file_and_env["runtime"]["max_task_timeout_ms"], 600_000);
    assert_eq!(file_and_env["roles"], json!(["from-file"]));
    assert_eq!(
        file_and_env["labels"],
        json!({"zone": "env", "rack": "file"})
    );

    // Flags go before or after the subcommand alike.
    let all_three = json_of(&agent(
        &[
            "--config",
            "agent.toml",
            "--slots",
            "5",
            "detect",
            "--role",
            "dns",
            "--label",
            "rack=flag",
        ],
        &env,
        dir.path(),
    ));
    assert_eq!(all_three["runtime"]["slots"], 5);
    assert_eq!(all_three["runtime"]["max_task_memory_bytes"], 2000);
    assert_eq!(all_three["roles"], json!(["dns"]));
    assert_eq!(all_three["labels"], json!({"zone": "env", "rack": "flag"}));
}

#[test]
fn a_bad_flag_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let output = agent(&["detect", "--label", "no-value"], &[], dir.path());
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("KEY=VALUE"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
