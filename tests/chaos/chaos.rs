//! The scenarios: which processes are killed, how often, and when they come back. One loop
//! drives every timer, so `all` is simply the three plans at once.

use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use crate::cluster::{Cluster, Role};

/// An agent is killed every `AGENT_PERIOD` and started again, under the same node id,
/// `AGENT_DOWN` later.
const AGENT_PERIOD: Duration = Duration::from_secs(2);
const AGENT_DOWN: Duration = Duration::from_secs(1);
/// A scheduler replica is killed every `SCHEDULER_PERIOD` and started again `SCHEDULER_DOWN`
/// later.
const SCHEDULER_PERIOD: Duration = Duration::from_secs(3);
const SCHEDULER_DOWN: Duration = Duration::from_secs(1);
/// The server is killed every `SERVER_PERIOD` and started again at once.
const SERVER_PERIOD: Duration = Duration::from_secs(8);
/// A process that exits on its own is started again after this long, as systemd's
/// `RestartSec` would.
const RESTART_AFTER_EXIT: Duration = Duration::from_secs(1);
/// How often the driver looks for processes that exited on their own.
const SUPERVISE_EVERY: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    /// SIGKILL an agent every 2 s (round robin), restart it 1 s later under the same id.
    Agents,
    /// SIGKILL a scheduler replica every 3 s (round robin), restart it 1 s later.
    Schedulers,
    /// SIGKILL nats-server every 8 s, restart it at once on the same store and port.
    Server,
    /// All three at once.
    All,
    /// Nothing killed: the load alone, for as long as `--duration` says, with the memory of
    /// every scheduler and agent sampled every 10 s and its slope reported (issue 10's soak).
    Soak,
}

impl Scenario {
    pub const EVERY: [Scenario; 4] = [
        Scenario::Agents,
        Scenario::Schedulers,
        Scenario::Server,
        Scenario::All,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Agents => "agents",
            Scenario::Schedulers => "schedulers",
            Scenario::Server => "server",
            Scenario::All => "all",
            Scenario::Soak => "soak",
        }
    }

    pub fn plan(self) -> Plan {
        Plan {
            agents: matches!(self, Scenario::Agents | Scenario::All),
            schedulers: matches!(self, Scenario::Schedulers | Scenario::All),
            server: matches!(self, Scenario::Server | Scenario::All),
        }
    }
}

/// Which kinds of process to kill.
#[derive(Clone, Copy, Debug, Default)]
pub struct Plan {
    pub agents: bool,
    pub schedulers: bool,
    pub server: bool,
}

/// The state that outlives one phase: restarts still due, and whose turn it is.
#[derive(Debug, Default)]
pub struct Chaos {
    restarts: Vec<(Instant, Role)>,
    next_agent: usize,
    next_scheduler: usize,
}

impl Chaos {
    /// Runs `plan` against `cluster` until `until`, or until `stop` completes. Whatever the
    /// plan, processes that exit on their own are started again and restarts already due
    /// are honoured, so a phase with an empty plan (the drain) keeps the cluster whole.
    pub async fn drive(
        &mut self,
        cluster: &mut Cluster,
        plan: Plan,
        until: Instant,
        stop: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut agents = tokio::time::interval_at(now + AGENT_PERIOD, AGENT_PERIOD);
        let mut schedulers = tokio::time::interval_at(now + SCHEDULER_PERIOD, SCHEDULER_PERIOD);
        let mut server = tokio::time::interval_at(now + SERVER_PERIOD, SERVER_PERIOD);
        let mut supervise = tokio::time::interval(SUPERVISE_EVERY);
        for timer in [&mut agents, &mut schedulers, &mut server, &mut supervise] {
            timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        }
        let agent_count = cluster.config().agents;
        let scheduler_count = cluster.config().schedulers;
        tokio::pin!(stop);
        loop {
            let next_restart = self.restarts.iter().map(|(at, _)| *at).min();
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                () = &mut stop => break,
                _ = agents.tick(), if plan.agents && agent_count > 0 => {
                    let role = Role::Agent(self.next_agent % agent_count);
                    self.next_agent += 1;
                    self.kill_for(cluster, role, AGENT_DOWN).await?;
                }
                _ = schedulers.tick(), if plan.schedulers && scheduler_count > 0 => {
                    let role = Role::Scheduler(self.next_scheduler % scheduler_count);
                    self.next_scheduler += 1;
                    self.kill_for(cluster, role, SCHEDULER_DOWN).await?;
                }
                _ = server.tick(), if plan.server => {
                    cluster.kill(Role::Server).await?;
                    cluster.spawn(Role::Server)?;
                }
                () = tokio::time::sleep_until(next_restart.unwrap_or(until)),
                    if next_restart.is_some() =>
                {
                    self.restart_due(cluster)?;
                }
                _ = supervise.tick() => {
                    let at = Instant::now() + RESTART_AFTER_EXIT;
                    for role in cluster.reap_exited() {
                        self.restarts.push((at, role));
                    }
                }
            }
        }
        Ok(())
    }

    /// Kills `role` and schedules its restart `down` later. A process still down from an
    /// earlier kill (or exit) is left alone: its restart is already due.
    async fn kill_for(
        &mut self,
        cluster: &mut Cluster,
        role: Role,
        down: Duration,
    ) -> anyhow::Result<()> {
        if !cluster.is_running(role) {
            return Ok(());
        }
        cluster.kill(role).await?;
        self.restarts.push((Instant::now() + down, role));
        Ok(())
    }

    fn restart_due(&mut self, cluster: &mut Cluster) -> anyhow::Result<()> {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            self.restarts.drain(..).partition(|(at, _)| *at <= now);
        self.restarts = later;
        for (_, role) in due {
            cluster.spawn(role)?;
        }
        Ok(())
    }
}
