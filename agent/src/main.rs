//! `apiary-agent`: runs the agent until SIGINT or SIGTERM; `apiary-agent detect` prints what
//! it would report about this host and exits.

use anyhow::Context as _;
use apiary_agent::{AgentConfig, AgentFlags};
use apiary_bin_support::ComponentArgs;
use clap::{Parser, Subcommand};

/// The apiary node agent. Configured by a TOML file (--config), then `APIARY_*` environment
/// variables (APIARY_NATS_URL, APIARY_NODE_ID, APIARY_TOKEN, APIARY_SLOTS, APIARY_LABELS,
/// APIARY_ROLES, …), then the flags below, each overriding the one before.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: ComponentArgs,
    #[command(flatten)]
    flags: AgentFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print this host's inventory (CPU, memory, disks, GPUs, services, runtime) as JSON, as
    /// the agent would report it, and exit without connecting to NATS.
    Detect,
}

/// musl's allocator makes zeroed memory resident at once; see `apiary_agent::alloc`.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: apiary_agent::alloc::LargeBlocksMapped = apiary_agent::alloc::LargeBlocksMapped;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // A refusal exits with its own status, which the systemd unit does not restart.
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(apiary_agent::exit_status(&err))
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        None => {
            apiary_bin_support::run_component_with(args.common, &args.flags, apiary_agent::run)
                .await
        }
        Some(Command::Detect) => {
            // Warnings only by default: stdout carries the JSON, and a host without GPUs is
            // not worth a line (APIARY_LOG=debug says why there are none).
            apiary_bin_support::init_tracing(args.common.log_format, "warn");
            let config: AgentConfig =
                apiary_bin_support::load_config_with(args.common.config.as_deref(), &args.flags)
                    .map_err(|err| anyhow::anyhow!("failed to load configuration: {err}"))?;
            let detected = apiary_agent::inventory::detect(&config);
            let json = serde_json::to_string_pretty(&detected)
                .context("failed to write the inventory as JSON")?;
            println!("{json}");
            Ok(())
        }
    }
}
