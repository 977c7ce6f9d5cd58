//! Joining the bus: a client that never gives up on the server, and the topology ensured as
//! soon as the server answers.
//!
//! A scheduler whose server is away at its start exits and leaves the retrying to its
//! supervisor. An agent waits instead: it may hold finished work in its outbox, and a node
//! that waits is back the moment its server is, without a restart loop in between.

use std::time::Duration;

use apiary_proto::topology::{self, Connection, JoinError};
use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// Connects to `url` and ensures the topology, retrying with capped backoff until the server
/// answers. Returns `None` if `stop` comes first; an error only for a malformed URL.
pub(crate) async fn join(
    url: &str,
    client_name: String,
    stop: &CancellationToken,
) -> Result<Option<Connection>, JoinError> {
    let client = topology::connect(url, client_name).await?;
    let js = jetstream::new(client.clone());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut waiting = false;
    loop {
        // Each try waits for JetStream's answer up to the request timeout, so a try made
        // while the server is away ends by itself.
        let ensured = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            ensured = topology::ensure(&js) => ensured,
        };
        match ensured {
            Ok(topology) => {
                if waiting {
                    tracing::info!("the server answers; joined the bus");
                }
                return Ok(Some(Connection {
                    client,
                    js,
                    topology,
                }));
            }
            // Logged once, when the waiting starts: an agent waiting an hour for its server
            // writes one line, not thousands.
            Err(err) if !waiting => {
                tracing::warn!(error = %err, url, "cannot reach JetStream yet; retrying until it answers");
                waiting = true;
            }
            Err(err) => tracing::debug!(error = %err, "JetStream still does not answer"),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
