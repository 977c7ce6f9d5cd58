//! A TCP relay between one in-process component and the test's `nats-server`.
//!
//! A component started in-process cannot be killed like a process: aborting its future stops
//! its own work, but `async-nats` keeps the connection open from tasks of its own (the micro
//! service's PING/INFO/STATS responder among them), so the server would never see the
//! component go. Each component therefore connects through its own relay, and a crash cuts
//! the relay: the server sees the connection drop at once, as it would when a process dies
//! with SIGKILL, and nothing the dead component's leftover tasks write reaches the server.
//!
//! A relay can also be held: it refuses new connections for a while, as a component whose
//! network is slower to come back than the server would see, so that a test can order what
//! happens after a server restart. And it can be slow: what the component sends reaches the
//! server a fixed time late, as over a long link, so that a test can show that something
//! waits for the server rather than for its own socket.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// One component's relay. Cutting it closes every connection through it and refuses new ones.
#[derive(Debug)]
pub struct Relay {
    url: String,
    cut: CancellationToken,
    held: Arc<AtomicBool>,
    /// Ends the connections open now, not later ones ([`Relay::sever`]).
    current: Arc<Mutex<CancellationToken>>,
    /// How late the component's bytes reach the server ([`Relay::delay_uplink`]).
    uplink_delay: Arc<Mutex<Duration>>,
}

impl Relay {
    /// Starts relaying connections to the server at `upstream` (a `nats://host:port` URL).
    /// Must be called inside the test's runtime, which the relay's tasks then live in.
    pub fn start(upstream: &str) -> Self {
        let server: SocketAddr = upstream
            .trim_start_matches("nats://")
            .parse()
            .unwrap_or_else(|err| panic!("the server URL {upstream} is not host:port: {err}"));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a relay port");
        let address = listener.local_addr().expect("the relay's address");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking relay socket");
        let listener = TcpListener::from_std(listener).expect("a tokio relay socket");
        let cut = CancellationToken::new();
        let held = Arc::new(AtomicBool::new(false));
        let current = Arc::new(Mutex::new(cut.child_token()));
        let uplink_delay = Arc::new(Mutex::new(Duration::ZERO));
        tokio::spawn(accept(
            listener,
            server,
            cut.clone(),
            held.clone(),
            current.clone(),
            uplink_delay.clone(),
        ));
        Self {
            url: format!("nats://{address}"),
            cut,
            held,
            current,
            uplink_delay,
        }
    }

    /// The URL the component connects to instead of the server's.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Drops every connection through the relay, and every later one. The listener stays
    /// bound until the test's runtime ends, so that a reconnecting client of the dead
    /// component finds this relay refusing it, never another relay that reused the port.
    pub fn cut(&self) {
        self.cut.cancel();
    }

    /// Refuses new connections until [`Relay::release`]; connections already open carry
    /// on. The component's client keeps trying, as it would against a server it cannot
    /// reach.
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Drops the connections open now; later ones are accepted (unless the relay is held),
    /// as a link that fails and comes back.
    pub fn sever(&self) {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        current.cancel();
        *current = self.cut.child_token();
    }

    /// Accepts connections again after [`Relay::hold`].
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    /// From now on, every chunk the component sends reaches the server `delay` late, in
    /// order; what the server sends back is not delayed.
    pub fn delay_uplink(&self, delay: Duration) {
        *self
            .uplink_delay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = delay;
    }
}

async fn accept(
    listener: TcpListener,
    server: SocketAddr,
    cut: CancellationToken,
    held: Arc<AtomicBool>,
    current: Arc<Mutex<CancellationToken>>,
    uplink_delay: Arc<Mutex<Duration>>,
) {
    while let Ok((inbound, _)) = listener.accept().await {
        if cut.is_cancelled() || held.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        // A child of `cut`: cutting ends it too.
        let ends = current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        tokio::spawn(pipe(inbound, server, ends, uplink_delay.clone()));
    }
}

async fn pipe(
    inbound: TcpStream,
    server: SocketAddr,
    cut: CancellationToken,
    uplink_delay: Arc<Mutex<Duration>>,
) {
    let Ok(outbound) = TcpStream::connect(server).await else {
        return;
    };
    let (mut from_component, mut to_component) = inbound.into_split();
    let (mut from_server, mut to_server) = outbound.into_split();
    let uplink = async {
        let mut chunk = vec![0; 64 * 1024];
        loop {
            let read = match from_component.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            let delay = *uplink_delay
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if !delay.is_zero() {
                // The link's latency, not a wait for something to happen.
                tokio::time::sleep(delay).await;
            }
            if to_server.write_all(&chunk[..read]).await.is_err() {
                break;
            }
        }
    };
    let downlink = tokio::io::copy(&mut from_server, &mut to_component);
    // Biased, so that once the relay is cut not one more byte crosses it, even when data is
    // waiting on both sockets at the moment the task wakes up. Either direction ending ends
    // the connection, as a closed socket does.
    tokio::select! {
        biased;
        _ = cut.cancelled() => {}
        _ = uplink => {}
        _ = downlink => {}
    }
}
