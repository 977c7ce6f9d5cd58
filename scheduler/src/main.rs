//! `apiary-scheduler`: runs one scheduler replica until SIGINT or SIGTERM. Run as many
//! replicas as you like.

use apiary_bin_support::ComponentArgs;
use clap::Parser;

/// The apiary scheduler. Configured by `APIARY_*` environment variables (APIARY_NATS_URL,
/// APIARY_HEARTBEAT_INTERVAL, APIARY_MAX_IN_FLIGHT) and an optional TOML file.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: ComponentArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    apiary_bin_support::run_component(Args::parse().common, apiary_scheduler::run).await
}
