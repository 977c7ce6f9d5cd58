//! What a node is: the hardware, services and runtime an agent finds on its host.
//!
//! An agent gathers its [`Inventory`] once when it starts and sends it in
//! [`NodeInfo::inventory`](crate::message::NodeInfo::inventory); `apiary-agent detect` prints
//! the same value as JSON. What changes from moment to moment (GPU use, free disk) travels in
//! each heartbeat's [`NodeMetrics`](crate::message::NodeMetrics) instead.
//!
//! Every struct defaults field by field, so a record from an agent that predates a field (or
//! predates the inventory altogether) reads as "unknown": zeros, empty strings and lists.

use serde::{Deserialize, Serialize};

/// Everything an agent knows about its host, gathered once at start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Inventory {
    pub host: HostInfo,
    pub cpu: CpuInfo,
    pub memory: MemoryInfo,
    /// Mounted filesystems backed by storage (no `/proc`, `/sys`, tmpfs or snap images).
    pub disks: Vec<DiskInfo>,
    /// NVIDIA GPUs seen through NVML; empty on a host without the NVIDIA driver.
    pub gpus: Vec<GpuInfo>,
    /// Services found on the host, by their sockets, binaries or ports.
    pub services: Vec<ServiceInfo>,
    /// What this agent offers tasks.
    pub runtime: RuntimeInfo,
}

/// The operating system and the host's names on the network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostInfo {
    pub hostname: String,
    /// The operating system as people name it (`Linux (Debian GNU/Linux 13)`).
    pub os: String,
    /// The kernel release (`6.12.48+deb13-amd64`).
    pub kernel: String,
    /// The host's addresses, loopback and IPv6 link-local ones left out.
    pub ip_addresses: Vec<IpAddress>,
}

/// One address of one network interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IpAddress {
    pub interface: String,
    /// The address in its usual text form (`192.168.1.20`, `fd00::5`), which reads the same in
    /// MessagePack and JSON.
    pub address: String,
    /// The network prefix length (`24` for a /24).
    pub prefix: u8,
}

/// The processor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuInfo {
    /// The model name (`Cortex-A76`, `AMD EPYC 7B13`); empty when the host does not say.
    pub model: String,
    pub vendor: String,
    /// The architecture, as Rust names it (`x86_64`, `aarch64`, …), like `NodeInfo::arch`.
    pub arch: String,
    /// Physical cores; absent where the host does not tell them apart from logical ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub physical_cores: Option<u32>,
    /// Logical CPUs (hardware threads) of the host.
    pub logical_cores: u32,
    /// The CPUs this agent may use (its affinity mask and cgroup quota), which is what
    /// `NodeInfo::cpu_cores` reports and what default slots are counted from.
    pub available_cores: u32,
    /// The current frequency of the first CPU, in MHz; 0 when unknown.
    pub frequency_mhz: u64,
}

/// Main memory and swap, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryInfo {
    pub total_bytes: u64,
    pub swap_total_bytes: u64,
}

/// One mounted filesystem.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskInfo {
    /// Where it is mounted (`/`, `/mnt/usb`).
    pub mount: String,
    /// The filesystem type (`ext4`, `btrfs`, `vfat`).
    pub filesystem: String,
    pub total_bytes: u64,
    /// Bytes an unprivileged process can still write, when the agent started.
    pub free_bytes: u64,
    pub removable: bool,
}

/// One NVIDIA GPU, as NVML describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuInfo {
    /// NVML's index of the device, which is also the index of its [`GpuMetrics`].
    pub index: u32,
    /// The product name (`NVIDIA GeForce RTX 4090`); requirements match on a part of it.
    pub name: String,
    /// NVML's stable id of the device (`GPU-5c1a…`).
    pub uuid: String,
    pub memory_total_bytes: u64,
    /// The version of the kernel driver (`550.54.14`).
    pub driver_version: String,
    /// The newest CUDA version the driver supports (`12.4`).
    pub cuda_version: String,
    /// The CUDA compute capability (`8.9`); absent when NVML does not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<ComputeCapability>,
}

/// A CUDA compute capability, `major.minor`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeCapability {
    pub major: u32,
    pub minor: u32,
}

/// Live figures of one GPU, sent with every heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuMetrics {
    /// The [`GpuInfo::index`] of the device.
    pub index: u32,
    /// How busy the GPU was over NVML's last sample period, 0–100.
    pub utilization_percent: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

/// A service found on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceInfo {
    /// `docker`, `podman`, `containerd`, `ollama` or `nvidia-container-toolkit`; newer agents
    /// may report more, so readers must accept names they do not know.
    pub name: String,
    /// What gave it away (`socket /var/run/docker.sock`, `binary /usr/local/bin/ollama`,
    /// `port 127.0.0.1:11434`).
    pub detected_by: String,
}

/// What the agent offers the tasks it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeInfo {
    pub agent_version: String,
    /// The version of wasmtime the agent was built with.
    pub wasmtime_version: String,
    /// The WASI interface tasks get (`preview1`).
    pub wasi: String,
    /// Tasks run at once.
    pub slots: u32,
    /// The most linear memory one task may have, in bytes.
    pub max_task_memory_bytes: u64,
    /// The longest run one task may have, in milliseconds.
    pub max_task_timeout_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoding;

    fn sample() -> Inventory {
        Inventory {
            host: HostInfo {
                hostname: "pi-1".into(),
                os: "Linux (Debian GNU/Linux 13)".into(),
                kernel: "6.12.0".into(),
                ip_addresses: vec![IpAddress {
                    interface: "eth0".into(),
                    address: "192.168.1.20".into(),
                    prefix: 24,
                }],
            },
            cpu: CpuInfo {
                model: "Cortex-A76".into(),
                vendor: "ARM".into(),
                arch: "aarch64".into(),
                physical_cores: Some(4),
                logical_cores: 4,
                available_cores: 4,
                frequency_mhz: 2400,
            },
            memory: MemoryInfo {
                total_bytes: 8 << 30,
                swap_total_bytes: 0,
            },
            disks: vec![DiskInfo {
                mount: "/".into(),
                filesystem: "ext4".into(),
                total_bytes: 64 << 30,
                free_bytes: 20 << 30,
                removable: false,
            }],
            gpus: vec![GpuInfo {
                index: 0,
                name: "NVIDIA GeForce RTX 4090".into(),
                uuid: "GPU-1".into(),
                memory_total_bytes: 24 << 30,
                driver_version: "550.54.14".into(),
                cuda_version: "12.4".into(),
                compute_capability: Some(ComputeCapability { major: 8, minor: 9 }),
            }],
            services: vec![ServiceInfo {
                name: "docker".into(),
                detected_by: "socket /var/run/docker.sock".into(),
            }],
            runtime: RuntimeInfo {
                agent_version: "0.1.0".into(),
                wasmtime_version: "48.0.8".into(),
                wasi: "preview1".into(),
                slots: 4,
                max_task_memory_bytes: 1 << 30,
                max_task_timeout_ms: 3_600_000,
            },
        }
    }

    #[test]
    fn inventories_round_trip_in_both_encodings() {
        let inventory = sample();
        for encoding in [Encoding::MsgPack, Encoding::Json] {
            let bytes = encoding.encode(&inventory).unwrap();
            assert_eq!(encoding.decode::<Inventory>(&bytes).unwrap(), inventory);
        }
    }

    #[test]
    fn json_inventories_have_the_documented_top_level_keys() {
        let json: serde_json::Value = serde_json::to_value(sample()).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "cpu", "disks", "gpus", "host", "memory", "runtime", "services"
            ]
        );
        assert_eq!(json["gpus"][0]["compute_capability"]["minor"], 9);
    }

    #[test]
    fn missing_fields_read_as_unknown() {
        // An agent that knows only some of the sections, and of those only some fields.
        let inventory: Inventory =
            serde_json::from_str(r#"{"cpu": {"model": "Cortex-A53"}, "gpus": [{"name": "T4"}]}"#)
                .unwrap();
        assert_eq!(inventory.cpu.model, "Cortex-A53");
        assert_eq!(inventory.cpu.logical_cores, 0);
        assert_eq!(inventory.gpus[0].memory_total_bytes, 0);
        assert!(inventory.disks.is_empty());
        assert_eq!(inventory.runtime, RuntimeInfo::default());
    }
}
