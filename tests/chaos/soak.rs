//! The soak scenario's memory samples: every scheduler's and agent's resident set every
//! [`SAMPLE_EVERY`], and the slope of each over the run (a least-squares fit), so that growth
//! shows as a number rather than as a feeling about a graph.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often each process's memory is read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// One process's samples: seconds since the first, and resident bytes.
#[derive(Debug, Default)]
pub struct Samples {
    pub name: String,
    pub points: Vec<(f64, u64)>,
}

/// Samples the processes `pids` (name, pid) every [`SAMPLE_EVERY`] until `until`.
pub fn sample(pids: Vec<(String, u32)>, until: Instant) -> JoinHandle<Vec<Samples>> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut samples: Vec<Samples> = pids
            .iter()
            .map(|(name, _)| Samples {
                name: name.clone(),
                points: Vec::new(),
            })
            .collect();
        let mut ticker = tokio::time::interval(SAMPLE_EVERY);
        loop {
            let tick = ticker.tick().await;
            if tick > until {
                return samples;
            }
            let at = started.elapsed().as_secs_f64();
            for ((_, pid), series) in pids.iter().zip(&mut samples) {
                if let Some(rss) = rss_bytes(*pid) {
                    series.points.push((at, rss));
                }
            }
        }
    })
}

/// The resident set of process `pid`, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The least-squares slope of `points`, in bytes per second; `None` for fewer than two.
pub fn slope(points: &[(f64, u64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mean_t = points.iter().map(|(t, _)| t).sum::<f64>() / n;
    let mean_y = points.iter().map(|(_, y)| *y as f64).sum::<f64>() / n;
    let covariance: f64 = points
        .iter()
        .map(|(t, y)| (t - mean_t) * (*y as f64 - mean_y))
        .sum();
    let variance: f64 = points.iter().map(|(t, _)| (t - mean_t).powi(2)).sum();
    (variance > 0.0).then(|| covariance / variance)
}

/// One table: each process's first, last, lowest and highest sample, and its slope.
pub fn report(samples: &[Samples]) -> String {
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    let mut out = format!(
        "memory, sampled every {SAMPLE_EVERY:?}\nprocess  samples  first MiB  last MiB  min MiB  max MiB  slope MiB/min\n"
    );
    for series in samples {
        let values = series.points.iter().map(|(_, rss)| *rss);
        let (Some(min), Some(max)) = (values.clone().min(), values.max()) else {
            continue;
        };
        let first = series.points.first().map_or(0, |(_, rss)| *rss);
        let last = series.points.last().map_or(0, |(_, rss)| *rss);
        let slope = slope(&series.points).map_or("–".to_owned(), |per_second| {
            format!("{:+.3}", mib(per_second * 60.0))
        });
        out.push_str(&format!(
            "{}  {}  {:.1}  {:.1}  {:.1}  {:.1}  {slope}\n",
            series.name,
            series.points.len(),
            mib(first as f64),
            mib(last as f64),
            mib(min as f64),
            mib(max as f64),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_of_a_line_is_its_gradient_and_of_a_flat_series_zero() {
        let line: Vec<(f64, u64)> = (0..10).map(|t| (t as f64, 100 + 3 * t)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        let flat: Vec<(f64, u64)> = (0..10).map(|t| (t as f64, 7)).collect();
        assert_eq!(slope(&flat), Some(0.0));
        assert_eq!(slope(&[(0.0, 1)]), None);
    }
}
