//! What the agent reports about its host: the [`Inventory`] (hardware, services, runtime),
//! gathered once at start and sent at registration, and live metrics in every heartbeat
//! ([`MetricsSampler`]).
//!
//! `apiary-agent detect` prints the same inventory ([`detect`]) without connecting anywhere,
//! so an operator can see what a node will report before it joins.
//!
//! Nothing here fails: a fact the host does not give is reported as unknown (zero, empty),
//! and a host without NVIDIA's driver has no GPUs (see [`gpu`]).

pub mod gpu;
mod metrics;
pub mod services;

use std::collections::{BTreeMap, BTreeSet};

use apiary_proto::NodeId;
use apiary_proto::inventory::{
    CpuInfo, DiskInfo, HostInfo, Inventory, IpAddress, MemoryInfo, RuntimeInfo,
};
use apiary_proto::message::NodeInfo;
use serde::Serialize;
use sysinfo::{Disks, Networks, System};

use crate::config::{AgentConfig, NodeLimits};

pub use gpu::{GpuUnavailable, Gpus};
pub use metrics::MetricsSampler;
pub use services::Probes;

/// The version of wasmtime this agent was built with, read from `Cargo.lock` by the build
/// script.
pub const WASMTIME_VERSION: &str = env!("APIARY_WASMTIME_VERSION");

/// The WASI interface tasks are linked against (see [`crate::sandbox`]).
pub const WASI: &str = "preview1";

/// Gathers the inventory of this host for an agent configured by `config`, with the GPUs of
/// `gpus` (`None`: this host has none). Takes as long as its probes: reading `/proc` and
/// `/sys`, and at most [`services::CONNECT_TIMEOUT`] for a port.
pub fn gather(config: &AgentConfig, gpus: Option<&Gpus>) -> Inventory {
    let system = System::new().ok().map(|mut system| {
        system.refresh_memory();
        system.refresh_cpu_all();
        system
    });
    let cpu = cpu_info(system.as_ref());
    let limits = NodeLimits::from(config);
    Inventory {
        host: host_info(),
        memory: MemoryInfo {
            total_bytes: system.as_ref().map_or(0, System::total_memory),
            swap_total_bytes: system.as_ref().map_or(0, System::total_swap),
        },
        disks: disks(),
        gpus: gpus.map(Gpus::inventory).unwrap_or_default(),
        services: Probes::of_this_host().detect(),
        runtime: RuntimeInfo {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            wasmtime_version: WASMTIME_VERSION.into(),
            wasi: WASI.into(),
            slots: slots(config, cpu.available_cores),
            max_task_memory_bytes: limits.max_memory_bytes,
            max_task_timeout_ms: limits.max_timeout_ms,
        },
        cpu,
    }
}

/// The tasks run at once: as configured, else one per usable core; never 0.
fn slots(config: &AgentConfig, available_cores: u32) -> u32 {
    config.slots.unwrap_or(available_cores).max(1)
}

fn cpu_info(system: Option<&System>) -> CpuInfo {
    let available_cores = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let cpus = system.map_or(&[][..], System::cpus);
    let first = cpus.first();
    CpuInfo {
        model: first
            .map(|cpu| cpu.brand().trim().to_owned())
            .unwrap_or_default(),
        vendor: first
            .map(|cpu| cpu.vendor_id().trim().to_owned())
            .unwrap_or_default(),
        arch: std::env::consts::ARCH.into(),
        physical_cores: System::physical_core_count()
            .ok()
            .and_then(|count| u32::try_from(count).ok()),
        logical_cores: match u32::try_from(cpus.len()) {
            Ok(0) | Err(_) => available_cores,
            Ok(count) => count,
        },
        available_cores,
        frequency_mhz: first.map_or(0, sysinfo::Cpu::frequency),
    }
}

fn host_info() -> HostInfo {
    HostInfo {
        hostname: System::host_name().unwrap_or_else(|_| "unknown".into()),
        os: System::long_os_version().unwrap_or_else(|_| std::env::consts::OS.into()),
        kernel: System::kernel_version().unwrap_or_default(),
        ip_addresses: ip_addresses(),
    }
}

/// Every interface's addresses but loopback and IPv6 link-local ones, which no other host
/// can reach this one at; sorted, so the record does not change between starts for nothing.
fn ip_addresses() -> Vec<IpAddress> {
    let Ok(networks) = Networks::new_with_refreshed_list() else {
        return Vec::new();
    };
    let mut addresses: Vec<IpAddress> = networks
        .iter()
        .flat_map(|(interface, data)| {
            data.ip_networks().iter().filter_map(move |network| {
                let ip = network.addr;
                let link_local = match ip {
                    std::net::IpAddr::V4(_) => false,
                    std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
                };
                (!ip.is_loopback() && !ip.is_unspecified() && !link_local).then(|| IpAddress {
                    interface: interface.to_string_lossy().into_owned(),
                    address: ip.to_string(),
                    prefix: network.prefix,
                })
            })
        })
        .collect();
    addresses.sort_by(|a, b| (&a.interface, &a.address).cmp(&(&b.interface, &b.address)));
    addresses
}

/// Filesystems on storage, by mount point. sysinfo already leaves out pseudo filesystems;
/// files bind-mounted into a container (`/etc/hosts`) are left out here.
fn disks() -> Vec<DiskInfo> {
    let Ok(disks) = Disks::new_with_refreshed_list() else {
        return Vec::new();
    };
    let mut found: Vec<DiskInfo> = disks
        .iter()
        .filter(|disk| disk.total_space() > 0 && disk.mount_point().is_dir())
        .map(|disk| DiskInfo {
            mount: disk.mount_point().display().to_string(),
            filesystem: disk.file_system().to_string_lossy().into_owned(),
            total_bytes: disk.total_space(),
            free_bytes: disk.available_space(),
            removable: disk.is_removable(),
        })
        .collect();
    found.sort_by(|a, b| a.mount.cmp(&b.mount));
    found
}

/// The registration record of this node, with a fresh incarnation id: call it once per start
/// of the agent. The flat fields that placement and the node table read are copied from the
/// inventory. `public_key` is the node key's public half.
pub fn node_info(
    node_id: NodeId,
    public_key: String,
    inventory: Inventory,
    config: &AgentConfig,
) -> NodeInfo {
    NodeInfo {
        node_id,
        hostname: inventory.host.hostname.clone(),
        arch: inventory.cpu.arch.clone(),
        os: inventory.host.os.clone(),
        cpu_cores: inventory.cpu.available_cores,
        cpu_model: inventory.cpu.model.clone(),
        memory_bytes: inventory.memory.total_bytes,
        slots: inventory.runtime.slots,
        agent_version: inventory.runtime.agent_version.clone(),
        labels: config.labels.clone(),
        incarnation: nuid::next().to_string(),
        public_key,
        inventory,
        roles: config.roles.clone(),
    }
}

/// What `apiary-agent detect` prints: the inventory, with the labels and roles the agent
/// would register with.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Detected {
    #[serde(flatten)]
    pub inventory: Inventory,
    pub labels: BTreeMap<String, String>,
    pub roles: BTreeSet<String>,
}

/// The inventory an agent configured by `config` would report, gathered as the agent does
/// at start (NVML included), without connecting to NATS.
pub fn detect(config: &AgentConfig) -> Detected {
    let gpus = Gpus::probe(config.nvml_library.as_deref());
    Detected {
        inventory: gather(config, gpus.as_ref()),
        labels: config.labels.clone(),
        roles: config.roles.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A configuration whose NVML library does not exist, as on a host without the driver.
    fn without_nvml() -> AgentConfig {
        AgentConfig {
            nvml_library: Some(PathBuf::from("/nonexistent/apiary-test/libnvidia-ml.so.1")),
            ..AgentConfig::default()
        }
    }

    #[test]
    fn the_inventory_describes_this_machine() {
        let inventory = gather(&without_nvml(), None);
        assert!(inventory.cpu.available_cores >= 1);
        assert!(inventory.cpu.logical_cores >= inventory.cpu.available_cores);
        assert_eq!(inventory.cpu.arch, std::env::consts::ARCH);
        assert!(inventory.memory.total_bytes > 0);
        assert!(!inventory.host.hostname.is_empty());
        assert_eq!(inventory.runtime.wasi, "preview1");
        assert!(
            inventory.runtime.wasmtime_version.starts_with("48."),
            "{}",
            inventory.runtime.wasmtime_version
        );
        assert_eq!(inventory.runtime.slots, inventory.cpu.available_cores);
        assert_eq!(inventory.runtime.max_task_memory_bytes, 1 << 30);
    }

    #[test]
    fn detect_on_a_host_without_nvml_reports_no_gpus_and_the_configuration() {
        let mut config = without_nvml();
        config.slots = Some(3);
        config.max_task_memory = 256 << 20;
        config.labels.insert("zone".into(), "attic".into());
        config.roles.insert("dns".into());
        let detected = detect(&config);
        assert!(detected.inventory.gpus.is_empty());
        assert_eq!(detected.inventory.runtime.slots, 3);
        assert_eq!(detected.inventory.runtime.max_task_memory_bytes, 256 << 20);

        let json = serde_json::to_value(&detected).unwrap();
        for key in [
            "cpu", "memory", "disks", "gpus", "services", "runtime", "host",
        ] {
            assert!(json.get(key).is_some(), "no {key} in {json}");
        }
        assert_eq!(json["gpus"], serde_json::json!([]));
        assert_eq!(json["labels"]["zone"], "attic");
        assert_eq!(json["roles"], serde_json::json!(["dns"]));
    }

    #[test]
    fn node_info_repeats_the_inventory_in_its_flat_fields() {
        let mut config = AgentConfig::default();
        config.roles.insert("host".into());
        let inventory = gather(&config, None);
        let info = node_info(
            NodeId::new("n").unwrap(),
            String::new(),
            inventory.clone(),
            &config,
        );
        assert_eq!(info.cpu_cores, inventory.cpu.available_cores);
        assert_eq!(info.memory_bytes, inventory.memory.total_bytes);
        assert_eq!(info.slots, inventory.runtime.slots);
        assert_eq!(info.arch, inventory.cpu.arch);
        assert_eq!(info.hostname, inventory.host.hostname);
        assert!(info.roles.contains("host"));
        assert_eq!(info.inventory, inventory);
        let again = node_info(NodeId::new("n").unwrap(), String::new(), inventory, &config);
        assert_ne!(info.incarnation, again.incarnation);
    }
}
