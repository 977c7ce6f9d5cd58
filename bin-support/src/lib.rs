//! What every apiary binary does before it calls its crate's `run(config, shutdown)`: load
//! the configuration, install the one tracing subscriber, and turn SIGINT/SIGTERM into a
//! cancellation token.
//!
//! Libraries only emit spans and events; this crate is for `main` functions alone.

use std::future::Future;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The environment variable that filters log output, in `RUST_LOG` syntax
/// (`info,apiary_agent=debug`).
pub const LOG_ENV: &str = "APIARY_LOG";

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for journald or a log shipper.
    Json,
}

/// The options every component binary (`apiary-agent`, `apiary-scheduler`) takes; each
/// binary flattens them into its own parser, which carries its own help text.
#[derive(Debug, clap::Args)]
pub struct ComponentArgs {
    /// A TOML configuration file; APIARY_* environment variables override it.
    #[arg(long, env = "APIARY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// How log lines are written; APIARY_LOG filters them (RUST_LOG syntax).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// The whole `main` of a component: install logging, load the configuration, and call the
/// component's `run(config, shutdown)` with a token that SIGINT or SIGTERM cancels.
pub async fn run_component<C, F, Fut>(args: ComponentArgs, run: F) -> anyhow::Result<()>
where
    C: Default + Serialize + DeserializeOwned,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    run_component_with(args, &NoFlags {}, run).await
}

/// [`run_component`] for a component with settings on its command line: `flags` (a
/// serializable struct of the flags given) override the file and the environment.
pub async fn run_component_with<C, O, F, Fut>(
    args: ComponentArgs,
    flags: &O,
    run: F,
) -> anyhow::Result<()>
where
    C: Default + Serialize + DeserializeOwned,
    O: Serialize,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    init_tracing(args.log_format, "info");
    let config: C = load_config_with(args.config.as_deref(), flags)
        .map_err(|err| anyhow::anyhow!("failed to load configuration: {err}"))?;
    run(config, shutdown_on_signal()).await
}

/// No settings on the command line.
#[derive(Debug, Serialize)]
struct NoFlags {}

/// Installs the global subscriber: filtered by `APIARY_LOG` (default `default_filter`), written
/// to stderr so that stdout stays free for command output.
///
/// The filter is RUST_LOG's common form, comma-separated `level` and `target=level`
/// directives (`info,apiary_agent=debug`), without its span and field filters: those need a
/// regular-expression engine, which is a tenth of a runtime-only agent's binary. A filter
/// that does not parse is reported on stderr and the default used.
pub fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter = log_filter(std::env::var(LOG_ENV).ok().as_deref(), default_filter);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // A second call (a test that starts two binaries' mains in one process) keeps the first
    // subscriber, which is what we want.
    drop(result);
}

/// The filter for `APIARY_LOG`'s value `configured`, else for `default_filter`.
pub fn log_filter(configured: Option<&str>, default_filter: &str) -> Targets {
    if let Some(configured) = configured.filter(|text| !text.trim().is_empty()) {
        match configured.parse::<Targets>() {
            Ok(filter) => return filter,
            Err(err) => eprintln!(
                "warning: {LOG_ENV}={configured:?} is not a log filter ({err}); using {default_filter:?}"
            ),
        }
    }
    default_filter
        .parse()
        .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO))
}

/// A token that is cancelled on the first SIGINT (Ctrl-C) or SIGTERM (systemd's stop).
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Loads a component's configuration: its defaults, then the TOML `file` if one is given,
/// then `APIARY_*` environment variables (`APIARY_NATS_URL` sets `nats_url`), each layer
/// overriding the one before. Unknown keys are ignored, so one environment can serve every
/// component.
pub fn load_config<T>(file: Option<&Path>) -> Result<T, Box<figment::Error>>
where
    T: Default + Serialize + DeserializeOwned,
{
    load_config_with(file, &NoFlags {})
}

/// [`load_config`] with one more layer on top: `flags`, the settings given on the command
/// line, serialized with the configuration's field names. A field `flags` leaves out of its
/// serialization (`skip_serializing_if`) leaves the layers below alone; maps are merged key
/// by key (as the environment merges over the file), anything else is replaced.
pub fn load_config_with<T, O>(file: Option<&Path>, flags: &O) -> Result<T, Box<figment::Error>>
where
    T: Default + Serialize + DeserializeOwned,
    O: Serialize,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = file {
        figment = figment.merge(Toml::file_exact(file));
    }
    figment
        .merge(Env::prefixed("APIARY_"))
        .merge(Serialized::defaults(flags))
        .extract()
        .map_err(Box::new)
}

#[cfg(test)]
// figment's test jail returns its own large error type; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn log_filters_take_levels_and_targets_and_fall_back_to_the_default() {
        use tracing::Level;
        use tracing_subscriber::filter::LevelFilter;
        let filter = log_filter(Some("warn,apiary_agent=debug"), "info");
        assert!(filter.would_enable("apiary_agent::task", &Level::DEBUG));
        assert!(!filter.would_enable("async_nats", &Level::INFO));
        let fallback = log_filter(Some("apiary_agent[span{x=1}]=debug"), "info");
        assert!(fallback.would_enable("anything", &Level::INFO));
        assert!(!fallback.would_enable("anything", &Level::DEBUG));
        assert_eq!(
            log_filter(None, "warn").default_level(),
            Some(LevelFilter::WARN)
        );
    }
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default)]
    struct Sample {
        nats_url: String,
        node_id: Option<String>,
        slots: Option<u32>,
    }

    #[test]
    fn environment_overrides_file_and_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("agent.toml", "slots = 2\nnode_id = \"from-file\"")?;
            jail.set_env("APIARY_NODE_ID", "from-env");
            jail.set_env("APIARY_LOG", "debug");
            let config: Sample =
                load_config(Some(Path::new("agent.toml"))).map_err(|err| err.to_string())?;
            assert_eq!(config.slots, Some(2));
            assert_eq!(config.node_id.as_deref(), Some("from-env"));
            assert_eq!(config.nats_url, "");
            Ok(())
        });
    }

    #[derive(Debug, Default, Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        node_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        slots: Option<u32>,
    }

    #[test]
    fn flags_override_environment_which_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "agent.toml",
                "slots = 2\nnode_id = \"from-file\"\nnats_url = \"nats://file\"",
            )?;
            jail.set_env("APIARY_NODE_ID", "from-env");
            jail.set_env("APIARY_SLOTS", "3");
            let file = Some(Path::new("agent.toml"));

            // Each layer alone wins over the ones below it, and leaves the rest alone.
            let no_flags: Sample =
                load_config_with(file, &Flags::default()).map_err(|err| err.to_string())?;
            assert_eq!(no_flags.node_id.as_deref(), Some("from-env"));
            assert_eq!(no_flags.slots, Some(3));
            assert_eq!(no_flags.nats_url, "nats://file");

            let flags = Flags {
                slots: Some(5),
                ..Flags::default()
            };
            let config: Sample = load_config_with(file, &flags).map_err(|err| err.to_string())?;
            assert_eq!(config.slots, Some(5));
            assert_eq!(config.node_id.as_deref(), Some("from-env"));
            assert_eq!(config.nats_url, "nats://file");

            let flags = Flags {
                node_id: Some("from-flag".into()),
                ..Flags::default()
            };
            let config: Sample = load_config_with(file, &flags).map_err(|err| err.to_string())?;
            assert_eq!(config.node_id.as_deref(), Some("from-flag"));
            assert_eq!(config.slots, Some(3));
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_is_an_error() {
        figment::Jail::expect_with(|_| {
            assert!(load_config::<Sample>(Some(Path::new("nope.toml"))).is_err());
            Ok(())
        });
    }
}
