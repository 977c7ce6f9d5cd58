//! Live metrics for every heartbeat: CPU, memory, GPUs, and the free disk under the state
//! directory.

use std::path::{Path, PathBuf};

use apiary_proto::message::NodeMetrics;
use sysinfo::System;

use super::gpu::Gpus;

/// Samples live metrics. CPU use is measured between two samples, and NVML is costly to
/// start, so the sampler is kept for the life of the agent. On a platform sysinfo cannot
/// read, host metrics are zero and only the task counts are reported.
#[derive(Debug)]
pub struct MetricsSampler {
    system: Option<System>,
    gpus: Option<Gpus>,
    /// The directory whose filesystem's free space is reported.
    disk: Option<PathBuf>,
}

impl MetricsSampler {
    /// A sampler reporting `gpus` (if this host has any) and the free space of the filesystem
    /// that holds `disk` (the agent's state directory).
    pub fn new(gpus: Option<Gpus>, disk: Option<&Path>) -> Self {
        let system = System::new().ok().map(|mut system| {
            system.refresh_cpu_usage();
            system.refresh_memory();
            system
        });
        Self {
            system,
            gpus,
            disk: disk.map(Path::to_owned),
        }
    }

    pub fn sample(&mut self, running_tasks: u32, slots: u32, tasks_completed: u64) -> NodeMetrics {
        let (cpu_percent, memory_used_bytes, memory_total_bytes) = match &mut self.system {
            Some(system) => {
                system.refresh_cpu_usage();
                system.refresh_memory();
                (
                    system.global_cpu_usage(),
                    system.used_memory(),
                    system.total_memory(),
                )
            }
            None => (0.0, 0, 0),
        };
        NodeMetrics {
            cpu_percent,
            memory_used_bytes,
            memory_total_bytes,
            running_tasks,
            slots,
            tasks_completed,
            gpus: self.gpus.as_ref().map(Gpus::metrics).unwrap_or_default(),
            disk_free_bytes: self.disk.as_deref().and_then(free_bytes),
        }
    }
}

/// Bytes an unprivileged process can still write on the filesystem that holds `path`; `None`
/// where that cannot be read.
#[cfg(unix)]
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    let stats = rustix::fs::statvfs(path).ok()?;
    Some(stats.f_bavail.saturating_mul(stats.f_frsize))
}

#[cfg(not(unix))]
pub(crate) fn free_bytes(_path: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_task_counts() {
        let metrics = MetricsSampler::new(None, None).sample(1, 4, 9);
        assert_eq!(
            (
                metrics.running_tasks,
                metrics.slots,
                metrics.tasks_completed
            ),
            (1, 4, 9)
        );
        assert!(metrics.memory_total_bytes > 0);
        assert!(metrics.gpus.is_empty());
        assert_eq!(metrics.disk_free_bytes, None);
    }

    #[cfg(unix)]
    #[test]
    fn metrics_report_the_free_space_under_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let free = MetricsSampler::new(None, Some(dir.path()))
            .sample(0, 1, 0)
            .disk_free_bytes
            .expect("a free-space figure");
        // Whatever else runs on the machine, the figure is that of this filesystem: no more
        // than its size.
        let total = rustix::fs::statvfs(dir.path()).unwrap();
        assert!(free <= total.f_blocks * total.f_frsize);
        assert!(free > 0);
        assert_eq!(free_bytes(&dir.path().join("missing")), None);
    }
}
