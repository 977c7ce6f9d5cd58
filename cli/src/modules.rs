//! `apiary module push|ls|rm`: the cluster's module store.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use apiary_sdk::{Client, module_ref};
use clap::Subcommand;

use crate::output;

/// `apiary module …`.
#[derive(Debug, Subcommand)]
pub enum ModuleCommand {
    /// Store a module (if the store does not have it yet) and print its digest, which
    /// `task submit` and the SDK's `Task::stored` use.
    Push { path: PathBuf },
    /// List the stored modules.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a stored module by digest.
    Rm { sha256: String },
    /// Store a module and, for runtime-only agents (built without the compiler), the module
    /// compiled for each target's platform; print the digest, then one line per platform.
    Compile {
        path: PathBuf,
        /// A target triple to compile for (repeat for more): `aarch64-unknown-linux-musl`,
        /// `x86_64-unknown-linux-gnu`, … (default: this host's). Compiled for the
        /// architecture's baseline, so the result runs on every host of the platform.
        #[arg(long = "target", value_name = "TRIPLE")]
        targets: Vec<String>,
    },
}

/// Runs `apiary module …`.
pub async fn module(
    client: &Client,
    command: ModuleCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let modules = client.modules();
    match command {
        ModuleCommand::Push { path } => {
            let bytes = std::fs::read(&path)
                .with_context(|| format!("failed to read module {}", path.display()))?;
            // A spinner on stderr while the module goes up (hidden when stderr is not a
            // terminal): the object store takes it in chunks, without progress to report.
            let spinner = indicatif::ProgressBar::new_spinner().with_message(format!(
                "uploading {} ({} bytes)",
                path.display(),
                bytes.len()
            ));
            spinner.enable_steady_tick(std::time::Duration::from_millis(100));
            let reference = modules.put(&bytes).await;
            spinner.finish_and_clear();
            let reference = reference?;
            writeln!(out, "{}", reference.sha256)?;
        }
        ModuleCommand::Ls { json } => {
            let list = modules.ls().await?;
            if json {
                let list: Vec<_> = list
                    .iter()
                    .map(|module| {
                        serde_json::json!({
                            "sha256": module.sha256,
                            "size": module.size,
                            "stored_at_ms": module.stored_at_ms,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let now = apiary_proto::now_ms();
                let rows = list.iter().map(|module| {
                    vec![
                        module.sha256.clone(),
                        module.size.to_string(),
                        output::time_ago(module.stored_at_ms, now),
                    ]
                });
                writeln!(
                    out,
                    "{}",
                    output::table(&["SHA256", "BYTES", "STORED"], rows)
                )?;
            }
        }
        ModuleCommand::Rm { sha256 } => {
            modules.rm(&module_ref(&sha256)?).await?;
            writeln!(out, "removed module {sha256}")?;
        }
        ModuleCommand::Compile { path, targets } => {
            let bytes = std::fs::read(&path)
                .with_context(|| format!("failed to read module {}", path.display()))?;
            let targets = if targets.is_empty() {
                vec![target_lexicon::HOST.to_string()]
            } else {
                targets
            };
            let compiled = compile(&bytes, &targets)?;
            let reference = modules.put(&bytes).await?;
            writeln!(out, "{}", reference.sha256)?;
            for artifact in compiled {
                modules
                    .put_precompiled(&reference, &artifact.platform, &artifact.bytes)
                    .await?;
                writeln!(
                    out,
                    "{}\t{}\t{} bytes",
                    artifact.platform,
                    artifact.target,
                    artifact.bytes.len()
                )?;
            }
        }
    }
    Ok(())
}

/// A module compiled for one target.
#[derive(Debug)]
pub struct Precompiled {
    /// The triple it was compiled for.
    pub target: String,
    /// The platform runtime-only agents know it by (`aarch64-linux`).
    pub platform: String,
    pub bytes: Vec<u8>,
}

/// Checks that `module` runs in apiary's sandbox (it compiles and its imports are all
/// given), then compiles it for each of `targets`.
pub fn compile(module: &[u8], targets: &[String]) -> anyhow::Result<Vec<Precompiled>> {
    let sandbox = apiary_agent::sandbox::Sandbox::new()?;
    let compiled = sandbox
        .compile(module)
        .map_err(|err| anyhow::anyhow!(err))?;
    sandbox
        .prepare(compiled)
        .map_err(|err| anyhow::anyhow!(err))
        .context("the module cannot run on an apiary agent")?;
    targets
        .iter()
        .map(|target| {
            let triple: target_lexicon::Triple = target
                .parse()
                .map_err(|err| anyhow::anyhow!("{target} is not a target triple: {err}"))?;
            let bytes = apiary_agent::sandbox::precompile(module, target)?;
            Ok(Precompiled {
                target: target.clone(),
                platform: platform(&triple),
                bytes,
            })
        })
        .collect()
}

/// The platform of a triple, named as an agent names its own
/// (`apiary_proto::topology::host_platform`, from Rust's `std::env::consts`).
pub fn platform(triple: &target_lexicon::Triple) -> String {
    let os = match triple.operating_system {
        target_lexicon::OperatingSystem::Darwin(_) | target_lexicon::OperatingSystem::MacOSX(_) => {
            "macos".to_owned()
        }
        other => other.to_string(),
    };
    format!("{}-{os}", triple.architecture)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_hosts_platform_is_named_as_its_agents_name_it() {
        assert_eq!(
            platform(&target_lexicon::HOST),
            apiary_proto::topology::host_platform()
        );
        let pi: target_lexicon::Triple = "aarch64-unknown-linux-musl".parse().unwrap();
        assert_eq!(platform(&pi), "aarch64-linux");
    }

    #[test]
    fn a_module_compiles_for_a_raspberry_pi_and_a_pc_and_a_bad_one_is_refused() {
        let module =
            wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)
                .unwrap();
        let targets = [
            "aarch64-unknown-linux-musl".to_owned(),
            "x86_64-unknown-linux-gnu".to_owned(),
        ];
        let compiled = compile(&module, &targets).expect("compiles");
        let platforms: Vec<_> = compiled.iter().map(|c| c.platform.as_str()).collect();
        assert_eq!(platforms, ["aarch64-linux", "x86_64-linux"]);
        assert!(compiled.iter().all(|c| !c.bytes.is_empty()));

        let missing_import =
            wat::parse_str(r#"(module (import "nowhere" "f" (func)) (func (export "_start")))"#)
                .unwrap();
        let err = compile(&missing_import, &targets).expect_err("cannot run on an agent");
        assert!(format!("{err:#}").contains("cannot run"), "{err:#}");
    }
}
