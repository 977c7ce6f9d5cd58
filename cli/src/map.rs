//! `apiary task map`: one module over many inputs (one per line), submitted together with a
//! bound on how many are in flight, with a progress bar for a person watching.

use std::io::Write;
use std::time::Duration;

use apiary_proto::Payload;
use apiary_sdk::{Client, Task};
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};

/// What `apiary task map` runs.
#[derive(Debug, Clone)]
pub struct MapOptions {
    pub module: Vec<u8>,
    /// One task per input.
    pub inputs: Vec<Vec<u8>>,
    /// Tasks submitted and not yet ended, at most.
    pub in_flight: usize,
    /// The longest each task may run.
    pub timeout: Duration,
    /// One JSON object per task as it ends, instead of the outputs in input order.
    pub json: bool,
    /// Show a progress bar (on stderr, and only on a terminal).
    pub progress: bool,
}

/// Runs the map and writes the outputs; returns how many tasks failed.
pub async fn map(
    client: &Client,
    options: MapOptions,
    out: &mut impl Write,
) -> anyhow::Result<usize> {
    let total = options.inputs.len();
    let bar = if options.progress {
        // Drawn on stderr, and hidden by indicatif when stderr is not a terminal.
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tasks  {per_sec}  eta {eta}")
            .expect("a valid progress template"),
    );
    let module = client.modules().put(&options.module).await?;
    let tasks: Vec<Task> = options
        .inputs
        .into_iter()
        .map(|input| {
            Task::stored(module.clone())
                .input(input)
                .timeout(options.timeout)
        })
        .collect();
    let mut results = client.submit_batch(tasks, options.in_flight);
    let mut ordered: Vec<Option<Result<Vec<u8>, String>>> = vec![None; total];
    let mut failed = 0;
    while let Some(item) = results.next().await {
        bar.inc(1);
        let outcome = item
            .outcome
            .map(|output| output.stdout.to_vec())
            .map_err(|err| format!("{err:#}"));
        failed += usize::from(outcome.is_err());
        if options.json {
            let line = match &outcome {
                Ok(stdout) => serde_json::json!({
                    "index": item.index,
                    "task_id": item.id,
                    "stdout": Payload(stdout.clone().into()),
                }),
                Err(error) => serde_json::json!({
                    "index": item.index,
                    "task_id": item.id,
                    "error": error,
                }),
            };
            bar.suspend(|| writeln!(out, "{line}"))?;
        } else {
            ordered[item.index] = Some(outcome);
        }
    }
    bar.finish_and_clear();
    for (index, outcome) in ordered.into_iter().enumerate() {
        match outcome {
            Some(Ok(stdout)) => {
                out.write_all(&stdout)?;
                if !stdout.ends_with(b"\n") {
                    writeln!(out)?;
                }
            }
            Some(Err(error)) => writeln!(out, "[input {index} failed: {error}]")?,
            None => {}
        }
    }
    Ok(failed)
}
