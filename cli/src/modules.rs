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
    }
    Ok(())
}
