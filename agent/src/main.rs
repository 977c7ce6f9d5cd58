//! `apiary-agent`: runs the agent until SIGINT or SIGTERM.

use apiary_bin_support::ComponentArgs;
use clap::Parser;

/// The apiary node agent. Configured by `APIARY_*` environment variables (APIARY_NATS_URL,
/// APIARY_NODE_ID, APIARY_TOKEN, APIARY_SLOTS, APIARY_LABELS, …) and an optional TOML file.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: ComponentArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match apiary_bin_support::run_component(Args::parse().common, apiary_agent::run).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // A refusal exits with its own status, which the systemd unit does not restart.
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(apiary_agent::exit_status(&err))
        }
    }
}
