//! `apiary-scheduler`: loads its configuration and runs one scheduler replica until SIGINT or
//! SIGTERM. Run as many replicas as you like.

use std::path::PathBuf;

use anyhow::Context as _;
use apiary_bin_support::LogFormat;
use apiary_scheduler::SchedulerConfig;
use clap::Parser;

/// The apiary scheduler. Configured by `APIARY_*` environment variables (APIARY_NATS_URL,
/// APIARY_HEARTBEAT_INTERVAL, …) and an optional TOML file.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// A TOML configuration file; environment variables override it.
    #[arg(long, env = "APIARY_SCHEDULER_CONFIG")]
    config: Option<PathBuf>,
    /// How log lines are written; APIARY_LOG filters them (RUST_LOG syntax).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    apiary_bin_support::init_tracing(args.log_format, "info");
    let config: SchedulerConfig = apiary_bin_support::load_config(args.config.as_deref())
        .context("failed to load configuration")?;
    let shutdown = apiary_bin_support::shutdown_on_signal();
    apiary_scheduler::run(config, shutdown).await
}
