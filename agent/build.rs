//! Tells the agent which wasmtime it is built with (wasmtime exports no version constant),
//! so that its inventory can report it: `APIARY_WASMTIME_VERSION`, read from the workspace's
//! `Cargo.lock`, or `unknown` when there is none (a build outside the workspace).

use std::path::Path;

fn main() {
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    println!("cargo::rerun-if-changed={}", lock.display());
    let version = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|lock| locked_version(&lock, "wasmtime"))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo::rustc-env=APIARY_WASMTIME_VERSION={version}");
}

/// The version of package `name` in a `Cargo.lock`: the `version` line after its `name` line.
fn locked_version(lock: &str, name: &str) -> Option<String> {
    let name_line = format!("name = \"{name}\"");
    let mut lines = lock.lines();
    lines.find(|line| line.trim() == name_line)?;
    let version = lines.next()?.trim().strip_prefix("version = \"")?;
    Some(version.trim_end_matches('"').to_owned())
}
