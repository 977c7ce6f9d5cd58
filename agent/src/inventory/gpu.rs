//! NVIDIA GPUs through NVML.
//!
//! `nvml-wrapper` loads the NVIDIA management library (`libnvidia-ml.so.1`) at run time, so
//! the agent builds and runs without it. Most apiary hosts (Raspberry Pis, small servers) have
//! no NVIDIA driver: for them [`Gpus::open`] returns a typed [`GpuUnavailable`], the agent
//! logs it at debug level and reports `gpus: []`. A statically linked agent cannot load
//! libraries at all and takes the same path.
//!
//! An agent built without the `nvml` feature (the static builds, which could not load the
//! library anyway) has no NVML code at all: it reports no GPUs, for
//! [`GpuUnavailable::NotBuiltIn`].
//!
//! The library is opened once per process (starting NVML is slow on some hosts) and the
//! handle kept for the heartbeat's live figures.

use std::path::Path;

#[cfg(feature = "nvml")]
use apiary_proto::inventory::ComputeCapability;
use apiary_proto::inventory::{GpuInfo, GpuMetrics};
#[cfg(feature = "nvml")]
use nvml_wrapper::{Nvml, error::NvmlError};

/// The library `nvml-wrapper` loads when no other is configured: the one the NVIDIA driver
/// installs (the unversioned `.so` comes only with development packages).
#[cfg(not(windows))]
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";
#[cfg(windows)]
pub const DEFAULT_LIBRARY: &str = "nvml.dll";

/// Why this host reports no GPUs.
#[derive(Debug, thiserror::Error)]
pub enum GpuUnavailable {
    /// The NVIDIA management library is not installed (or cannot be loaded): no NVIDIA driver.
    /// The usual case on hosts without an NVIDIA GPU.
    #[error("no NVIDIA driver library ({library}): {reason}")]
    NoLibrary { library: String, reason: String },
    /// The library is installed but its kernel driver is not running.
    #[error("the NVIDIA driver is installed but not loaded")]
    DriverNotLoaded,
    /// The driver refused this user.
    #[error("no permission to talk to the NVIDIA driver")]
    NoPermission,
    /// NVML failed to start for another reason.
    #[cfg(feature = "nvml")]
    #[error("NVML failed to start: {0}")]
    Init(#[source] NvmlError),
    /// This agent was built without NVML (the `nvml` feature), as the static builds are.
    #[cfg(not(feature = "nvml"))]
    #[error("this agent was built without NVML support (the `nvml` feature)")]
    NotBuiltIn,
}

/// An open NVML handle: the GPUs of this host.
#[derive(Debug)]
pub struct Gpus {
    #[cfg(feature = "nvml")]
    nvml: Nvml,
    /// Without NVML there is never a handle.
    #[cfg(not(feature = "nvml"))]
    never: std::convert::Infallible,
}

impl Gpus {
    /// Without NVML built in, there are never GPUs to open.
    #[cfg(not(feature = "nvml"))]
    pub fn open(_library: Option<&Path>) -> Result<Self, GpuUnavailable> {
        Err(GpuUnavailable::NotBuiltIn)
    }

    /// Loads NVML from `library` (a path, or a file name the dynamic loader searches for), or
    /// from [`DEFAULT_LIBRARY`] when `None`, and starts it.
    #[cfg(feature = "nvml")]
    pub fn open(library: Option<&Path>) -> Result<Self, GpuUnavailable> {
        let mut builder = Nvml::builder();
        if let Some(library) = library {
            builder.lib_path(library.as_os_str());
        }
        let library_name = library.map_or_else(
            || DEFAULT_LIBRARY.to_owned(),
            |path| path.display().to_string(),
        );
        match builder.init() {
            Ok(nvml) => Ok(Self { nvml }),
            Err(
                err @ (NvmlError::LibloadingError(_)
                | NvmlError::FailedToLoadSymbol(_)
                | NvmlError::LibraryNotFound),
            ) => Err(GpuUnavailable::NoLibrary {
                library: library_name,
                reason: err.to_string(),
            }),
            Err(NvmlError::DriverNotLoaded) => Err(GpuUnavailable::DriverNotLoaded),
            Err(NvmlError::NoPermission) => Err(GpuUnavailable::NoPermission),
            Err(err) => Err(GpuUnavailable::Init(err)),
        }
    }

    /// [`Gpus::open`], with the reason for no GPUs logged at debug level: a host without
    /// NVIDIA hardware is normal, not something to warn about.
    pub fn probe(library: Option<&Path>) -> Option<Self> {
        match Self::open(library) {
            Ok(gpus) => Some(gpus),
            Err(reason) => {
                tracing::debug!(%reason, "no GPUs");
                None
            }
        }
    }

    #[cfg(not(feature = "nvml"))]
    pub fn inventory(&self) -> Vec<GpuInfo> {
        match self.never {}
    }

    #[cfg(not(feature = "nvml"))]
    pub fn metrics(&self) -> Vec<GpuMetrics> {
        match self.never {}
    }

    /// Describes every GPU NVML can open. A device that fails to answer is left out (and
    /// logged at debug level) rather than failing the whole inventory.
    #[cfg(feature = "nvml")]
    pub fn inventory(&self) -> Vec<GpuInfo> {
        let count = match self.nvml.device_count() {
            Ok(count) => count,
            Err(err) => {
                tracing::debug!(error = %err, "NVML cannot count the GPUs");
                return Vec::new();
            }
        };
        let driver_version = self.nvml.sys_driver_version().unwrap_or_default();
        let cuda_version = self
            .nvml
            .sys_cuda_driver_version()
            .map(|version| {
                format!(
                    "{}.{}",
                    nvml_wrapper::cuda_driver_version_major(version),
                    nvml_wrapper::cuda_driver_version_minor(version)
                )
            })
            .unwrap_or_default();
        (0..count)
            .filter_map(|index| match self.nvml.device_by_index(index) {
                Ok(device) => Some(GpuInfo {
                    index,
                    name: device.name().unwrap_or_default(),
                    uuid: device.uuid().unwrap_or_default(),
                    memory_total_bytes: device.memory_info().map_or(0, |memory| memory.total),
                    driver_version: driver_version.clone(),
                    cuda_version: cuda_version.clone(),
                    compute_capability: device.cuda_compute_capability().ok().and_then(
                        |capability| {
                            Some(ComputeCapability {
                                major: u32::try_from(capability.major).ok()?,
                                minor: u32::try_from(capability.minor).ok()?,
                            })
                        },
                    ),
                }),
                Err(err) => {
                    tracing::debug!(index, error = %err, "NVML cannot open a GPU; leaving it out");
                    None
                }
            })
            .collect()
    }

    /// Each GPU's utilisation and memory use now. A figure the device does not give is 0.
    #[cfg(feature = "nvml")]
    pub fn metrics(&self) -> Vec<GpuMetrics> {
        let count = self.nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let device = self.nvml.device_by_index(index).ok()?;
                let memory = device.memory_info().ok();
                Some(GpuMetrics {
                    index,
                    utilization_percent: device.utilization_rates().map_or(0, |rates| rates.gpu),
                    memory_used_bytes: memory.as_ref().map_or(0, |memory| memory.used),
                    memory_total_bytes: memory.as_ref().map_or(0, |memory| memory.total),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "nvml")]
    #[test]
    fn a_host_without_the_driver_library_has_no_gpus_for_a_typed_reason() {
        let missing = Path::new("/nonexistent/apiary-test/libnvidia-ml.so.1");
        match Gpus::open(Some(missing)) {
            Err(GpuUnavailable::NoLibrary { library, reason }) => {
                assert_eq!(library, missing.to_string_lossy());
                assert!(!reason.is_empty());
            }
            other => panic!("expected NoLibrary, got {other:?}"),
        }
        assert!(Gpus::probe(Some(missing)).is_none());
    }

    #[cfg(not(feature = "nvml"))]
    #[test]
    fn an_agent_built_without_nvml_has_no_gpus_and_says_why() {
        assert!(matches!(Gpus::open(None), Err(GpuUnavailable::NotBuiltIn)));
        assert!(Gpus::probe(None).is_none());
    }
}
