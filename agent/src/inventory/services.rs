//! Services on the host that tasks or operators may care about: container engines, ollama,
//! the NVIDIA container toolkit.
//!
//! Found only by cheap probes, never by running their tools (`docker info` can take seconds,
//! or hang on a stuck daemon): a socket where the service listens, a binary on `PATH`, or a
//! local port that accepts a connection within a short timeout. A socket file left behind by
//! a daemon that has stopped still counts; what is reported is what was seen
//! ([`ServiceInfo::detected_by`]), so a reader can judge.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use apiary_proto::inventory::ServiceInfo;

/// Where ollama serves its API by default.
pub const OLLAMA_ADDRESS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 11434);

/// How long a port probe waits. A local port answers or refuses at once; this only bounds a
/// host whose firewall drops the connection silently.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// Where the probes look: the real host, or a directory tree a test builds.
#[derive(Clone, Debug)]
pub struct Probes {
    /// Prefix of the system socket paths: `/` on the host.
    root: PathBuf,
    /// The `PATH` to search for binaries.
    path: Option<OsString>,
    /// `$XDG_RUNTIME_DIR`, where rootless docker and podman put their sockets.
    runtime_dir: Option<PathBuf>,
    ollama: SocketAddr,
}

impl Probes {
    /// Probes of this host, with this process's `PATH` and `XDG_RUNTIME_DIR`.
    pub fn of_this_host() -> Self {
        Self {
            root: PathBuf::from("/"),
            path: std::env::var_os("PATH"),
            runtime_dir: std::env::var_os("XDG_RUNTIME_DIR")
                .filter(|dir| !dir.is_empty())
                .map(PathBuf::from),
            ollama: OLLAMA_ADDRESS,
        }
    }

    /// The services found, in a fixed order.
    pub fn detect(&self) -> Vec<ServiceInfo> {
        let probes = [
            (
                "docker",
                self.socket(
                    &["var/run/docker.sock", "run/docker.sock"],
                    Some("docker.sock"),
                ),
            ),
            (
                "podman",
                self.socket(&["run/podman/podman.sock"], Some("podman/podman.sock")),
            ),
            (
                "containerd",
                self.socket(
                    &[
                        "run/containerd/containerd.sock",
                        // k3s, common on Raspberry Pi clusters, runs its own containerd.
                        "run/k3s/containerd/containerd.sock",
                    ],
                    None,
                ),
            ),
            (
                "ollama",
                self.binary(&["ollama"]).or_else(|| self.port(self.ollama)),
            ),
            (
                "nvidia-container-toolkit",
                self.binary(&["nvidia-container-runtime", "nvidia-ctk"]),
            ),
        ];
        probes
            .into_iter()
            .filter_map(|(name, detected_by)| {
                Some(ServiceInfo {
                    name: name.to_owned(),
                    detected_by: detected_by?,
                })
            })
            .collect()
    }

    /// The first of the system paths (under `root`), then the per-user path (under the
    /// runtime directory), that is a socket.
    fn socket(&self, system: &[&str], user: Option<&str>) -> Option<String> {
        let user = user.and_then(|user| Some(self.runtime_dir.as_ref()?.join(user)));
        system
            .iter()
            .map(|path| self.root.join(path))
            .chain(user)
            .find(|path| is_socket(path))
            .map(|path| format!("socket {}", path.display()))
    }

    /// The first of `names` that is an executable file in a `PATH` directory.
    fn binary(&self, names: &[&str]) -> Option<String> {
        let path = self.path.as_ref()?;
        names
            .iter()
            .find_map(|name| {
                std::env::split_paths(path)
                    .map(|dir| dir.join(name))
                    .find(|candidate| is_executable(candidate))
            })
            .map(|found| format!("binary {}", found.display()))
    }

    fn port(&self, address: SocketAddr) -> Option<String> {
        TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)
            .ok()
            .map(|_| format!("port {address}"))
    }
}

#[cfg(unix)]
fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_socket())
}

#[cfg(not(unix))]
fn is_socket(path: &Path) -> bool {
    path.exists()
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::net::UnixListener;

    fn file(path: &Path, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn socket(path: &Path) -> UnixListener {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        UnixListener::bind(path).unwrap()
    }

    /// An address where nothing listens: a port the kernel just gave out and took back.
    fn closed_port() -> SocketAddr {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap()
    }

    #[test]
    fn sockets_binaries_and_ports_give_services_away() {
        let root = tempfile::tempdir().unwrap();
        let runtime = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        // A regular file where docker's socket would be is not docker.
        file(&root.path().join("var/run/docker.sock"), 0o644);
        let _containerd = socket(&root.path().join("run/containerd/containerd.sock"));
        let _podman = socket(&runtime.path().join("podman/podman.sock"));
        // ollama's binary is there but not executable, so only its port gives it away.
        file(&bin.path().join("ollama"), 0o644);
        file(&bin.path().join("nvidia-ctk"), 0o755);
        let ollama = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();

        let probes = Probes {
            root: root.path().to_owned(),
            path: Some(std::env::join_paths([Path::new("/nonexistent"), bin.path()]).unwrap()),
            runtime_dir: Some(runtime.path().to_owned()),
            ollama: ollama.local_addr().unwrap(),
        };
        let found: Vec<(String, String)> = probes
            .detect()
            .into_iter()
            .map(|service| (service.name, service.detected_by))
            .collect();
        let expected = [
            (
                "podman",
                format!(
                    "socket {}",
                    runtime.path().join("podman/podman.sock").display()
                ),
            ),
            (
                "containerd",
                format!(
                    "socket {}",
                    root.path().join("run/containerd/containerd.sock").display()
                ),
            ),
            ("ollama", format!("port {}", ollama.local_addr().unwrap())),
            (
                "nvidia-container-toolkit",
                format!("binary {}", bin.path().join("nvidia-ctk").display()),
            ),
        ]
        .map(|(name, by)| (name.to_owned(), by));
        assert_eq!(found, expected);
    }

    #[test]
    fn a_bare_host_has_no_services() {
        let root = tempfile::tempdir().unwrap();
        let probes = Probes {
            root: root.path().to_owned(),
            path: None,
            runtime_dir: None,
            ollama: closed_port(),
        };
        assert_eq!(probes.detect(), Vec::new());
    }

    #[test]
    fn an_executable_on_path_is_found_before_the_port_is_tried() {
        let bin = tempfile::tempdir().unwrap();
        file(&bin.path().join("ollama"), 0o755);
        let probes = Probes {
            root: PathBuf::from("/nonexistent"),
            path: Some(bin.path().as_os_str().to_owned()),
            runtime_dir: None,
            ollama: closed_port(),
        };
        assert_eq!(
            probes.detect(),
            [ServiceInfo {
                name: "ollama".into(),
                detected_by: format!("binary {}", bin.path().join("ollama").display()),
            }]
        );
    }
}
