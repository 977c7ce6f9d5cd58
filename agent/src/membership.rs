//! Membership: joining the cluster (register, retried while no scheduler answers),
//! heartbeats every interval (registering again when the cluster has forgotten this node),
//! and the goodbye that shows the node gone at once.

use std::sync::Arc;
use std::time::Duration;

use apiary_proto::admin::{Schedule, SecretToken};
use apiary_proto::identity::KeyPair;
use apiary_proto::message::{ErrorBody, Refusal};
use apiary_proto::message::{
    Heartbeat, HeartbeatReply, NodeInfo, NodeState, RegisterReply, RegisterRequest,
};
use apiary_proto::now_ms;
use apiary_proto::rpc::{self, RequestError};
use apiary_proto::subject::{self, NodeVerb};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::state::StateDir;
use crate::{Agent, AgentConfig, Refused};

/// Refuses to start a node an operator removed (see [`StateDir::removed_marker`]): it would
/// join again, with the token still in its environment, behind the operator's back.
pub(crate) fn refuse_if_removed(state: &StateDir) -> Result<(), Refused> {
    match state.removed_marker() {
        Some(marker) => Err(Refused(ErrorBody::refused(
            Refusal::Removed,
            format!(
                "an operator removed this node from its cluster; delete {} to join again",
                marker.display()
            ),
        ))),
        None => Ok(()),
    }
}

/// Registers, retrying with capped exponential backoff and jitter while no scheduler
/// answers (or the server is away). Returns `None` if shutdown came first, and an error if
/// the cluster refused the node (a bad token, say), which no amount of retrying fixes.
///
/// Each kind of failure is logged once, when it starts, not at every attempt: an agent
/// waiting an hour for its cluster writes one line, not thousands.
pub(crate) async fn register_until_accepted(
    client: &async_nats::Client,
    agent: &Agent,
    info: &NodeInfo,
    config: &AgentConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<RegisterReply>> {
    let mut backoff = Backoff::new(Duration::from_millis(100), config.max_register_backoff);
    let mut waiting_for: Option<Waiting> = None;
    loop {
        let failure = match register(client, agent, info, config).await {
            Ok(reply) => {
                if waiting_for.is_some() {
                    tracing::info!("the cluster answers again");
                }
                return Ok(Some(reply));
            }
            // A refusal with a reason (the token, the key) stands until an operator acts.
            // Any other (a scheduler that failed to read its buckets while JetStream
            // restarts) passes, and is retried like a silence.
            Err(RequestError::Refused(refusal)) if refusal.reason.is_some() => {
                return Err(Refused(refusal).into());
            }
            // No scheduler yet is normal while a cluster starts up.
            Err(err @ RequestError::NoResponders { .. }) => (Waiting::Scheduler, err),
            Err(err) => (Waiting::Answer, err),
        };
        match failure {
            (kind, err) if waiting_for != Some(kind) => {
                match kind {
                    Waiting::Scheduler => tracing::info!(error = %err, "waiting for a scheduler"),
                    Waiting::Answer => {
                        tracing::warn!(error = %err, "registration failed; retrying");
                    }
                }
                waiting_for = Some(kind);
            }
            (_, err) => tracing::debug!(error = %err, "still not registered"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Why an agent is still not registered, for logging each state once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    /// No scheduler answers on the subject.
    Scheduler,
    /// A request failed otherwise (timed out, the server is away).
    Answer,
}

/// Registers once. The join token goes along only until the node has joined: after that the
/// node's key admits it, and the token need not travel (or still be valid). Should the
/// cluster have lost the node's key binding and ask for a token, the registration is sent
/// again with it.
async fn register(
    client: &async_nats::Client,
    agent: &Agent,
    info: &NodeInfo,
    config: &AgentConfig,
) -> Result<RegisterReply, RequestError> {
    let joined = agent.state.has_joined();
    let send = |token: Option<SecretToken>| async move {
        let request = RegisterRequest {
            node: info.clone(),
            token,
        };
        rpc::request_signed::<_, RegisterReply>(
            client,
            subject::node(&info.node_id, NodeVerb::Register),
            &request,
            &agent.key,
            config.request_timeout,
        )
        .await
    };
    let mut outcome = send(if joined { None } else { config.token.clone() }).await;
    if joined
        && config.token.is_some()
        && matches!(&outcome, Err(RequestError::Refused(refusal)) if refusal.reason == Some(Refusal::TokenMissing))
    {
        tracing::info!("the cluster no longer knows this node's key; joining again with the token");
        outcome = send(config.token.clone()).await;
    }
    if outcome.is_ok()
        && !joined
        && let Err(err) = agent.state.mark_joined()
    {
        tracing::warn!(error = %err, "failed to record that this node joined; it sends its token again next time");
    }
    outcome
}

/// The operator's schedule from a heartbeat reply, with a drain deadline moved onto this
/// node's clock: the scheduler's deadline less the scheduler's clock is how long is left,
/// whatever this node's clock says.
fn local_schedule(reply: &HeartbeatReply, local_now_ms: u64) -> Schedule {
    match reply.schedule {
        Schedule::Draining { deadline_ms } if reply.now_ms > 0 => Schedule::Draining {
            deadline_ms: local_now_ms.saturating_add(deadline_ms.saturating_sub(reply.now_ms)),
        },
        schedule => schedule,
    }
}

/// Heartbeats every `interval` until `stop`; returns the last sequence number sent.
pub(crate) async fn heartbeat_loop(
    client: async_nats::Client,
    agent: Arc<Agent>,
    info: NodeInfo,
    config: AgentConfig,
    interval: Duration,
    stop: CancellationToken,
) -> u64 {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0;
    // Heartbeats failing in a row: the first is a warning, the rest are expected until the
    // cluster answers again (a server restart, a network outage), and are logged at debug.
    let mut failing = 0u64;
    // Re-registrations failing in a row, logged the same way.
    let mut rejoin_failing = 0u64;
    // The bucket revision of the operator's record behind the schedule last followed.
    let mut schedule_revision = 0u64;
    let mut watchdog = crate::systemd::Watchdog::from_env();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return sequence,
            // systemd's watchdog is fed whenever this loop waits, answered or not.
            () = watchdog.feed_when_due() => continue,
            _ = ticker.tick() => {}
        }
        sequence += 1;
        let heartbeat = Heartbeat {
            node_id: agent.node_id.clone(),
            seq: sequence,
            state: NodeState::Active,
            metrics: agent.metrics(),
            incarnation: agent.incarnation.clone(),
        };
        let answer = send_heartbeat(&client, &agent.key, &heartbeat, config.request_timeout).await;
        if answer.is_ok() && failing > 0 {
            tracing::info!(failed = failing, "heartbeats are answered again");
            failing = 0;
        }
        match answer {
            Ok(HeartbeatReply { leave: true, .. }) => {
                tracing::warn!("an operator removed this node from the cluster; leaving");
                if let Err(err) = agent
                    .state
                    .mark_removed("removed from the cluster by an operator (apiary nodes rm)\n")
                {
                    tracing::warn!(error = %err, "failed to record the removal; the agent would join again at its next start");
                }
                agent.leave.cancel();
                return sequence;
            }
            Ok(
                reply @ HeartbeatReply {
                    registered: true, ..
                },
            ) => {
                // A replica whose view lags answers with an older operator record than one
                // already heard: it is ignored, so the schedule does not flap between
                // replicas.
                if reply.schedule_revision >= schedule_revision {
                    schedule_revision = reply.schedule_revision;
                    let schedule = local_schedule(&reply, now_ms());
                    agent.schedule.send_if_modified(|current| {
                        // The same drain seen again moves its local deadline by the
                        // heartbeat's round trip at most; not worth a change.
                        let changed =
                            std::mem::discriminant(current) != std::mem::discriminant(&schedule);
                        if changed {
                            tracing::info!(
                                ?schedule,
                                "the operator changed whether this node takes work"
                            );
                            *current = schedule;
                        }
                        changed
                    });
                }
            }
            Ok(HeartbeatReply { .. }) => match register(&client, &agent, &info, &config).await {
                Ok(_) => {
                    tracing::info!("the cluster had no record of this node; registered again");
                    rejoin_failing = 0;
                }
                Err(RequestError::Refused(refusal)) if refusal.reason.is_some() => {
                    tracing::error!(error = %refusal, "the cluster refused this node");
                    agent.refused(refusal);
                    return sequence;
                }
                Err(err) if rejoin_failing == 0 => {
                    rejoin_failing = 1;
                    tracing::warn!(error = %err, "the cluster has no record of this node, and registering again failed; retrying every interval");
                }
                Err(err) => {
                    rejoin_failing += 1;
                    tracing::debug!(error = %err, "registering again failed again");
                }
            },
            Err(RequestError::Refused(refusal)) if refusal.reason.is_some() => {
                tracing::error!(error = %refusal, "the cluster refused this node's heartbeat");
                agent.refused(refusal);
                return sequence;
            }
            Err(err) if failing == 0 => {
                failing = 1;
                tracing::warn!(error = %err, seq = sequence, "heartbeat failed; retrying every interval");
            }
            Err(err) => {
                failing += 1;
                tracing::debug!(error = %err, seq = sequence, "heartbeat failed again");
            }
        }
    }
}

async fn send_heartbeat(
    client: &async_nats::Client,
    key: &KeyPair,
    heartbeat: &Heartbeat,
    timeout: Duration,
) -> Result<HeartbeatReply, RequestError> {
    rpc::request_signed(
        client,
        subject::node(&heartbeat.node_id, NodeVerb::Heartbeat),
        heartbeat,
        key,
        timeout,
    )
    .await
}

/// Tells the cluster that this node is leaving, so it is shown gone at once. Best effort: a
/// node that cannot say goodbye is found offline by its missed heartbeats instead.
pub(crate) async fn send_leaving(
    client: &async_nats::Client,
    agent: &Agent,
    seq: u64,
    timeout: Duration,
) {
    let heartbeat = Heartbeat {
        node_id: agent.node_id.clone(),
        seq,
        state: NodeState::Leaving,
        metrics: agent.metrics(),
        incarnation: agent.incarnation.clone(),
    };
    if let Err(err) = send_heartbeat(client, &agent.key, &heartbeat, timeout).await {
        tracing::warn!(error = %err, "could not announce leaving");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(schedule: Schedule, now_ms: u64) -> HeartbeatReply {
        HeartbeatReply {
            registered: true,
            schedule,
            leave: false,
            now_ms,
            schedule_revision: 1,
        }
    }

    #[test]
    fn a_drain_deadline_is_moved_onto_the_node_clock() {
        // The scheduler says ten seconds are left; this node's clock is an hour behind.
        let scheduler_now = 1_700_000_000_000;
        let node_now = scheduler_now - 3_600_000;
        let draining = Schedule::Draining {
            deadline_ms: scheduler_now + 10_000,
        };
        assert_eq!(
            local_schedule(&reply(draining, scheduler_now), node_now),
            Schedule::Draining {
                deadline_ms: node_now + 10_000
            }
        );
        // A deadline already past is due at once.
        let past = Schedule::Draining {
            deadline_ms: scheduler_now - 5,
        };
        assert_eq!(
            local_schedule(&reply(past, scheduler_now), node_now),
            Schedule::Draining {
                deadline_ms: node_now
            }
        );
        // A scheduler that sends no clock leaves the deadline as it is.
        assert_eq!(local_schedule(&reply(draining, 0), node_now), draining);
        assert_eq!(
            local_schedule(&reply(Schedule::Cordoned, scheduler_now), node_now),
            Schedule::Cordoned
        );
    }
}
