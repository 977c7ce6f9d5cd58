//! A private `nats-server` process: for `apiary dev` and for the integration tests.
//!
//! The server gets its own temporary directory (JetStream store, log, ports file) and, by
//! default, a port the kernel picks. Readiness is an event, not a guess: the server writes its
//! ports file once its listeners are up, and JetStream is ready once it answers an account
//! info request. Dropping the handle kills the process and removes the directory. A server
//! can be stopped and started again on the same port and store, as after a real restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The development configuration shipped in `broker-config/dev.conf`.
pub const DEV_CONFIG: &str = include_str!("../../broker-config/dev.conf");

/// The oldest server apiary supports: async-nats cannot create KV buckets on 2.9.
pub const MIN_SERVER_VERSION: (u32, u32) = (2, 10);

/// How long a starting server may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "no nats-server found: set NATS_SERVER_BIN or put nats-server (>= 2.10) on PATH; \
         scripts/demo and scripts/test install the pinned version into .tools/"
    )]
    NotFound,
    #[error("cannot run {binary}: {reason}")]
    CannotRun { binary: PathBuf, reason: String },
    #[error("{binary} is nats-server {version}; apiary needs 2.10 or newer")]
    TooOld { binary: PathBuf, version: String },
    #[error("failed to prepare the server's directory: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "nats-server did not become ready within {timeout:?}: {reason}\n--- server log ---\n{log}"
    )]
    NotReady {
        timeout: Duration,
        reason: String,
        log: String,
    },
    #[error("nats-server did not exit within {timeout:?} of SIGTERM, and was killed")]
    NotStopped { timeout: Duration },
}

/// How to start a server.
#[derive(Clone, Debug, Default)]
pub struct BrokerOptions {
    /// The port to listen on; 0 lets the kernel pick a free one.
    pub port: u16,
    /// A configuration file's contents; command-line options (port, store) override it.
    pub config: Option<String>,
}

/// A running `nats-server`, killed and cleaned up on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
    binary: PathBuf,
    /// The configuration file in `dir`, if started with one.
    config: Option<PathBuf>,
}

impl NatsServer {
    /// Finds the server binary: `NATS_SERVER_BIN`, else `nats-server` on `PATH`.
    pub fn binary() -> Result<PathBuf, BrokerError> {
        if let Some(path) = std::env::var_os("NATS_SERVER_BIN").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(path));
        }
        let path = std::env::var_os("PATH").ok_or(BrokerError::NotFound)?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
            .ok_or(BrokerError::NotFound)
    }

    /// Starts a server and waits until it accepts clients and JetStream answers.
    pub async fn start(options: BrokerOptions) -> Result<Self, BrokerError> {
        let binary = Self::binary()?;
        check_version(&binary)?;
        let dir = tempfile::Builder::new().prefix("apiary-nats-").tempdir()?;
        let config = match &options.config {
            Some(config) => {
                let path = dir.path().join("nats.conf");
                std::fs::write(&path, config)?;
                Some(path)
            }
            None => None,
        };
        let port = if options.port == 0 {
            "-1".to_owned()
        } else {
            options.port.to_string()
        };
        let child = spawn(&binary, config.as_deref(), dir.path(), &port)?;
        let mut server = Self {
            child,
            url: String::new(),
            dir,
            binary,
            config,
        };
        server.url = server.wait_for_ports_file().await?;
        server.wait_for_jetstream().await?;
        tracing::debug!(url = %server.url, "nats-server ready");
        Ok(server)
    }

    /// Stops the server the way an operator's `systemctl stop` does (SIGTERM: it closes
    /// every connection and writes JetStream's state out), and waits until it has exited.
    pub async fn stop(&mut self) -> Result<(), BrokerError> {
        let signal = Command::new(&self.binary)
            .arg("--signal")
            .arg(format!("term={}", self.child.id()))
            .output()
            .map_err(|err| BrokerError::CannotRun {
                binary: self.binary.clone(),
                reason: err.to_string(),
            })?;
        if !signal.status.success() {
            return Err(BrokerError::CannotRun {
                binary: self.binary.clone(),
                reason: format!(
                    "signalling the server failed: {}",
                    String::from_utf8_lossy(&signal.stderr).trim()
                ),
            });
        }
        let started = Instant::now();
        while self.child.try_wait()?.is_none() {
            if started.elapsed() > START_TIMEOUT {
                self.kill();
                return Err(BrokerError::NotStopped {
                    timeout: START_TIMEOUT,
                });
            }
            // The exit of a child has no awaitable signal in std; look again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Starts a stopped (or killed) server again on the same port, with the same store, so
    /// that JetStream's streams and consumers are there as before, and waits until it is
    /// ready. Clients reconnect to the same URL.
    pub async fn start_again(&mut self) -> Result<(), BrokerError> {
        if self.child.try_wait()?.is_none() {
            self.kill();
        }
        // A ports file a killed server left behind would pass for the new one's.
        for entry in std::fs::read_dir(self.dir.path())? {
            let path = entry?.path();
            if path.extension().is_some_and(|ext| ext == "ports") {
                std::fs::remove_file(path)?;
            }
        }
        let port = self.url.rsplit(':').next().unwrap_or_default().to_owned();
        self.child = spawn(&self.binary, self.config.as_deref(), self.dir.path(), &port)?;
        let url = self.wait_for_ports_file().await?;
        if url != self.url {
            return Err(self.not_ready(&format!("the server came back at {url}, not {}", self.url)));
        }
        self.wait_for_jetstream().await?;
        tracing::debug!(url = %self.url, "nats-server ready again");
        Ok(())
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's process id, for reading its resource use.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's directory (store, log, ports file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The server writes `<name>_<pid>.ports` once its listeners are up. The directory is
    /// ours alone, so any ports file in it is this server's.
    async fn wait_for_ports_file(&mut self) -> Result<String, BrokerError> {
        let started = Instant::now();
        loop {
            if let Some(url) = self.read_ports_file() {
                return Ok(url);
            }
            self.fail_if_exited()?;
            if started.elapsed() > START_TIMEOUT {
                return Err(self.not_ready("no ports file was written"));
            }
            // The server gives no other signal than the file appearing; look again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn read_ports_file(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Ports {
            nats: Vec<String>,
        }
        let entries = std::fs::read_dir(self.dir.path()).ok()?;
        let path = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|ext| ext == "ports"))?;
        let ports: Ports = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        ports.nats.into_iter().next()
    }

    async fn wait_for_jetstream(&mut self) -> Result<(), BrokerError> {
        let started = Instant::now();
        let mut last_error = String::new();
        while started.elapsed() < START_TIMEOUT {
            self.fail_if_exited()?;
            match async_nats::connect(self.url.as_str()).await {
                Ok(client) => match async_nats::jetstream::new(client).query_account().await {
                    Ok(_) => return Ok(()),
                    Err(err) => last_error = err.to_string(),
                },
                Err(err) => last_error = err.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(self.not_ready(&format!("JetStream did not answer: {last_error}")))
    }

    fn fail_if_exited(&mut self) -> Result<(), BrokerError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(self.not_ready(&format!("the server exited ({status})"))),
            _ => Ok(()),
        }
    }

    fn not_ready(&self, reason: &str) -> BrokerError {
        BrokerError::NotReady {
            timeout: START_TIMEOUT,
            reason: reason.to_owned(),
            log: self.log(),
        }
    }

    /// Stops the server at once (SIGKILL), as a crash or power loss would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `binary` with the store, log and ports file in `dir`, on `port` (`-1`: any).
fn spawn(
    binary: &Path,
    config: Option<&Path>,
    dir: &Path,
    port: &str,
) -> Result<Child, BrokerError> {
    let mut command = Command::new(binary);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    // Appended to, so that the log of a restarted server keeps what came before.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))?;
    command
        .args(["--addr", "127.0.0.1", "--port", port, "--jetstream"])
        .arg("--store_dir")
        .arg(dir.join("jetstream"))
        .arg("--ports_file_dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    command.spawn().map_err(|err| BrokerError::CannotRun {
        binary: binary.to_owned(),
        reason: err.to_string(),
    })
}

/// Refuses servers older than [`MIN_SERVER_VERSION`], with the version in the message.
fn check_version(binary: &Path) -> Result<(), BrokerError> {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|err| BrokerError::CannotRun {
            binary: binary.to_owned(),
            reason: err.to_string(),
        })?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    match parse_version(&text) {
        Some(version) if version >= MIN_SERVER_VERSION => Ok(()),
        Some(_) => Err(BrokerError::TooOld {
            binary: binary.to_owned(),
            version: text.trim().to_owned(),
        }),
        None => Err(BrokerError::CannotRun {
            binary: binary.to_owned(),
            reason: format!("unrecognised version output {:?}", text.trim()),
        }),
    }
}

/// Reads `(major, minor)` from `nats-server: v2.12.8`.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let version = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix('v'))?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_server_output() {
        assert_eq!(parse_version("nats-server: v2.12.8\n"), Some((2, 12)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9)));
        assert!(parse_version("nats-server: v2.9.10").unwrap() < MIN_SERVER_VERSION);
        assert_eq!(parse_version("garbage"), None);
    }
}
