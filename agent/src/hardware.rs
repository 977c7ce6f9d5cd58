//! What the agent reports about its host: static facts at registration, live metrics in every
//! heartbeat.

use std::collections::BTreeMap;

use apiary_proto::NodeId;
use apiary_proto::message::{NodeInfo, NodeMetrics};
use sysinfo::System;

/// Static facts about this host.
#[derive(Clone, Debug)]
pub struct HostFacts {
    pub hostname: String,
    pub arch: String,
    pub os: String,
    pub cpu_cores: u32,
    pub cpu_model: String,
    pub memory_bytes: u64,
}

/// Reads the host's static facts. Never fails: an unreadable fact is reported as unknown.
pub fn host_facts() -> HostFacts {
    let system = System::new().ok().map(|mut system| {
        system.refresh_memory();
        system.refresh_cpu_all();
        system
    });
    let cpu_cores = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    HostFacts {
        hostname: System::host_name().unwrap_or_else(|_| "unknown".into()),
        arch: std::env::consts::ARCH.into(),
        os: System::long_os_version().unwrap_or_else(|_| std::env::consts::OS.into()),
        cpu_cores,
        cpu_model: system
            .as_ref()
            .and_then(|system| system.cpus().first())
            .map(|cpu| cpu.brand().trim().to_owned())
            .unwrap_or_default(),
        memory_bytes: system.as_ref().map_or(0, System::total_memory),
    }
}

/// The registration record of this node, with a fresh incarnation id: call it once per start
/// of the agent.
pub fn node_info(
    node_id: NodeId,
    facts: &HostFacts,
    slots: u32,
    labels: BTreeMap<String, String>,
) -> NodeInfo {
    NodeInfo {
        node_id,
        hostname: facts.hostname.clone(),
        arch: facts.arch.clone(),
        os: facts.os.clone(),
        cpu_cores: facts.cpu_cores,
        cpu_model: facts.cpu_model.clone(),
        memory_bytes: facts.memory_bytes,
        slots,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        labels,
        incarnation: nuid::next().to_string(),
        public_key: String::new(),
    }
}

/// Samples live metrics. CPU use is measured between two samples, so the sampler is kept for
/// the life of the heartbeat loop. On a platform sysinfo cannot read, host metrics are zero
/// and only the task counts are reported.
#[derive(Debug)]
pub struct MetricsSampler {
    system: Option<System>,
}

impl Default for MetricsSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsSampler {
    pub fn new() -> Self {
        let system = System::new().ok().map(|mut system| {
            system.refresh_cpu_usage();
            system.refresh_memory();
            system
        });
        Self { system }
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_describe_this_machine() {
        let facts = host_facts();
        assert!(facts.cpu_cores >= 1);
        assert!(facts.memory_bytes > 0);
        assert_eq!(facts.arch, std::env::consts::ARCH);
    }

    #[test]
    fn metrics_carry_task_counts() {
        let metrics = MetricsSampler::new().sample(1, 4, 9);
        assert_eq!(
            (
                metrics.running_tasks,
                metrics.slots,
                metrics.tasks_completed
            ),
            (1, 4, 9)
        );
        assert!(metrics.memory_total_bytes > 0);
    }
}
