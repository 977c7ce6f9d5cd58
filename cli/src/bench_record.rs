//! `apiary bench --record FILE`: each run appends a dated entry to a benchmarks file (the
//! project keeps docs/BENCHMARKS.md): when, on what machine, against which server version, the
//! exact command, and the report as printed. Figures without these are not comparable.

use std::io::Write as _;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Context as _;

use crate::bench::{Figure, report};

/// What an entry says about the run besides its figures.
#[derive(Clone, Debug)]
pub struct RunContext {
    pub at: SystemTime,
    pub machine: String,
    pub server_version: String,
    pub command: String,
}

impl RunContext {
    /// This run: now, this machine, and the command line as it was given.
    pub fn here(server_version: String) -> Self {
        Self {
            at: SystemTime::now(),
            machine: machine(),
            server_version,
            command: std::env::args().collect::<Vec<_>>().join(" "),
        }
    }
}

/// The server's version, as it announces itself to a client.
pub async fn server_version(url: &str) -> anyhow::Result<String> {
    Ok(crate::bench::connect(url).await?.server_info().version)
}

/// This machine, as far as the entry needs it: CPU model, cores, memory, OS and architecture.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|line| line.starts_with("MemTotal:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!(", {:.1} GiB memory", kib / (1024.0 * 1024.0)))
        })
        .unwrap_or_default();
    format!(
        "{cpu}, {cores} cores{memory}, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// The entry for `figures`, in Markdown.
pub fn dated_entry(figures: &[Figure], run: &RunContext) -> String {
    format!(
        "\n## {}, `apiary bench`\n\n- Machine: {}\n- nats-server: {}\n- Command: `{}`\n\n```text\n{}\n```\n",
        humantime::format_rfc3339_seconds(run.at),
        run.machine,
        run.server_version,
        run.command,
        report(figures).trim_end(),
    )
}

/// Appends the entry for `figures` to `file`.
pub fn append(file: &Path, figures: &[Figure], run: &RunContext) -> anyhow::Result<()> {
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .with_context(|| format!("failed to open {}", file.display()))?;
    out.write_all(dated_entry(figures, run).as_bytes())
        .with_context(|| format!("failed to append to {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_names_its_date_machine_server_command_and_figures() {
        let run = RunContext {
            at: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400),
            machine: "a test machine".into(),
            server_version: "2.12.8".into(),
            command: "apiary bench --local".into(),
        };
        let figures = [Figure {
            name: "raw JetStream publish + ack".into(),
            p50_us: Some(120.0),
            p99_us: Some(280.0),
            per_second: None,
        }];
        let entry = dated_entry(&figures, &run);
        assert!(
            entry.contains("## 1970-01-02T00:00:00Z, `apiary bench`"),
            "{entry}"
        );
        assert!(entry.contains("- Machine: a test machine"), "{entry}");
        assert!(entry.contains("- nats-server: 2.12.8"), "{entry}");
        assert!(
            entry.contains("- Command: `apiary bench --local`"),
            "{entry}"
        );
        assert!(entry.contains("raw JetStream publish + ack"), "{entry}");
        assert!(entry.contains("120 µs"), "{entry}");
    }
}
