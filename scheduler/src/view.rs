//! The scheduler's view of the cluster and its placement decisions: pure data, no I/O.
//!
//! The view is rebuilt from the `APIARY_NODES` KV bucket (a replica that starts fresh replays
//! the bucket), so it is a cache of NATS state, never a source of truth. What it adds is this
//! replica's own dispatches that have not finished yet, by attempt id. They bound how much
//! work the replica queues at a node (its slots plus a backlog that follows how fast the
//! node finishes the replica's tasks, [`Pace`]), so that work waiting
//! for nodes stays in the shared queue for whichever node has room, and they spread a burst
//! of tasks before the next heartbeat reports the load.

use std::collections::{BTreeMap, HashMap};

use apiary_proto::NodeId;
use apiary_proto::admin::{NodeAdmin, Schedule};
use apiary_proto::inventory::GpuInfo;
use apiary_proto::liveness;
use apiary_proto::message::{NodeLiveness, NodeRecord, NodeStatus, NodeSummary, Requirements};

/// How long after an operator removed a node its queued work is still looked for and moved.
pub const REMOVED_RECOVERY_MS: u64 = 10 * 60 * 1000;

#[derive(Clone, Debug, Default)]
struct NodeEntry {
    record: Option<NodeRecord>,
    live: Option<NodeLiveness>,
    /// What the operator set; `None` is the default (approved, open).
    admin: Option<NodeAdmin>,
    /// The bucket revisions of the records held: a change older than what the view holds
    /// (the watch echoing a write this replica already applied, behind a newer one) is
    /// ignored.
    record_revision: u64,
    live_revision: u64,
    admin_revision: u64,
    /// This replica's dispatches to the node that have not finished.
    outstanding: u32,
    /// How fast this replica's dispatches to the node finish lately.
    pace: Pace,
    /// When a recovery round last found nothing of the node's work left to move, while it
    /// was lost; cleared by anything that may give it work again (a heartbeat, a
    /// registration, a dispatch from this replica).
    drained_at_ms: Option<u64>,
}

/// How long one count of a node's finished tasks runs ([`Pace`]).
const PACE_WINDOW_MS: u64 = 100;

/// How much of a node's work, in time at the pace it finishes tasks, the replica queues
/// beyond its slots when no fixed backlog is configured: enough to cover the round trips
/// between a task's placement and the node's next run (the dispatch's store, its delivery,
/// the result's store and its sight), short enough that a task placed behind the queue,
/// a high-priority one included, waits for little.
const BACKLOG_TIME_MS: u64 = 10;

/// The most tasks per slot the pace may queue beyond a node's slots.
const MAX_BACKLOG_PER_SLOT: u32 = 8;

/// Counts of a node's finished tasks (this replica's), per [`PACE_WINDOW_MS`] window.
#[derive(Clone, Copy, Debug, Default)]
struct Pace {
    window_start_ms: u64,
    this_window: u32,
    last_window: u32,
}

impl Pace {
    fn finished(&mut self, now_ms: u64) {
        if now_ms >= self.window_start_ms.saturating_add(PACE_WINDOW_MS) {
            self.last_window = self.finished_in_last_window(now_ms);
            self.this_window = 0;
            self.window_start_ms = now_ms;
        }
        self.this_window = self.this_window.saturating_add(1);
    }

    /// The finishes of the last full window before `now_ms`; none if the node finished
    /// nothing for a whole window since.
    fn finished_in_last_window(&self, now_ms: u64) -> u32 {
        let window_end = self.window_start_ms.saturating_add(PACE_WINDOW_MS);
        if now_ms < window_end {
            self.last_window
        } else if now_ms < window_end.saturating_add(PACE_WINDOW_MS) {
            self.this_window
        } else {
            0
        }
    }

    /// The backlog for a node with `slots` at this pace: what it finishes in
    /// [`BACKLOG_TIME_MS`], at least its slots (a node running long tasks has one queued
    /// per slot, to start the moment one ends), at most [`MAX_BACKLOG_PER_SLOT`] per slot.
    fn backlog(&self, slots: u32, now_ms: u64) -> u32 {
        let at_pace =
            u64::from(self.finished_in_last_window(now_ms)) * BACKLOG_TIME_MS / PACE_WINDOW_MS;
        let at_pace = u32::try_from(at_pace).unwrap_or(u32::MAX);
        at_pace.clamp(slots, slots.saturating_mul(MAX_BACKLOG_PER_SLOT))
    }
}

impl NodeEntry {
    /// Nothing left to know about the node: no records, none of our work.
    fn is_empty(&self) -> bool {
        self.record.is_none()
            && self.live.is_none()
            && self.admin.is_none()
            && self.outstanding == 0
    }

    fn revision_mut(&mut self, kind: KeyKind) -> &mut u64 {
        match kind {
            KeyKind::Info => &mut self.record_revision,
            KeyKind::Live => &mut self.live_revision,
            KeyKind::Admin => &mut self.admin_revision,
        }
    }

    /// Why the node's queued work must go elsewhere, if it must: it is offline or has left,
    /// or an operator is draining it or removed it lately.
    fn handover(&self, now_ms: u64) -> Option<Handover> {
        let admin = self.admin.as_ref();
        let draining =
            admin.is_some_and(|admin| matches!(admin.schedule, Schedule::Draining { .. }));
        let removed_lately = admin
            .and_then(|admin| admin.removed_ms)
            .is_some_and(|removed| now_ms.saturating_sub(removed) < REMOVED_RECOVERY_MS);
        match &self.record {
            Some(_) if draining => Some(Handover::Operator),
            Some(record)
                if liveness::node_status(record, self.live.as_ref(), now_ms)
                    != NodeStatus::Online =>
            {
                Some(Handover::Lost)
            }
            None if removed_lately => Some(Handover::Operator),
            _ => None,
        }
    }

    /// Whether the operator lets placement put new work here.
    fn takes_work(&self) -> bool {
        self.admin.as_ref().is_none_or(NodeAdmin::takes_work)
    }
}

/// One of this replica's dispatches that has not finished yet.
#[derive(Clone, Debug)]
struct Outstanding {
    node: NodeId,
    /// When the entry is dropped even if no result was seen (a result missed while the
    /// replica was cut off from the server), so that a lost signal cannot shrink a node's
    /// room for good.
    expires_at_ms: u64,
}

/// A change to one key of the node bucket.
// A registration carries the node's whole inventory, so it is much larger than the other
// changes; they are handed over one at a time, and boxing would only add an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum NodeChange {
    Registered(NodeRecord),
    Forgotten(NodeId),
    Heartbeat(NodeId, NodeLiveness),
    LivenessCleared(NodeId),
    Admin(NodeId, NodeAdmin),
    AdminCleared(NodeId),
}

/// Which key of a node a change is about; each has its own revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    Info,
    Live,
    Admin,
}

impl NodeChange {
    fn node(&self) -> &NodeId {
        match self {
            NodeChange::Registered(record) => &record.info.node_id,
            NodeChange::Forgotten(node)
            | NodeChange::Heartbeat(node, _)
            | NodeChange::LivenessCleared(node)
            | NodeChange::Admin(node, _)
            | NodeChange::AdminCleared(node) => node,
        }
    }

    fn key_kind(&self) -> KeyKind {
        match self {
            NodeChange::Registered(_) | NodeChange::Forgotten(_) => KeyKind::Info,
            NodeChange::Heartbeat(..) | NodeChange::LivenessCleared(_) => KeyKind::Live,
            NodeChange::Admin(..) | NodeChange::AdminCleared(_) => KeyKind::Admin,
        }
    }

    /// Whether the change puts a value (rather than removing one).
    fn is_put(&self) -> bool {
        matches!(
            self,
            NodeChange::Registered(_) | NodeChange::Heartbeat(..) | NodeChange::Admin(..)
        )
    }
}

/// Why a node's queued work moves elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handover {
    /// The node is offline or has left: the move spends one of the task's attempts.
    Lost,
    /// An operator drains or removed the node: nothing was lost, and the move spends no
    /// attempt (its attempt number still counts up, since results are told apart by it).
    Operator,
}

/// Where a task should go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    Node(NodeId),
    /// No node is online at all.
    NoLiveNode,
    /// Nodes are online, but none meets the task's requirements.
    NoMatchingNode,
    /// Nodes that meet the task's requirements are online, but each already holds as much of
    /// this replica's work as it can start soon.
    NodesFull,
}

#[derive(Clone, Debug, Default)]
pub struct NodeView {
    nodes: BTreeMap<NodeId, NodeEntry>,
    /// This replica's unfinished dispatches, by attempt id (`<task>.<attempt>`, the
    /// `Nats-Msg-Id` of both the dispatch and its result).
    dispatched: HashMap<String, Outstanding>,
    /// The node chosen last: among equally loaded nodes the next one in id order goes first,
    /// so equal nodes take turns instead of the lowest id taking everything.
    last_chosen: Option<NodeId>,
    /// Tasks queued at a node beyond its slots; `None` means as many as it has slots.
    backlog: Option<u32>,
    /// The newest bucket revision the watch has delivered. A change this replica applies
    /// itself at a revision the watch has already passed is old news, whatever the view holds
    /// for that key now (the key may even have been deleted since).
    watched: u64,
}

impl NodeView {
    /// An empty view that queues at most `backlog` tasks beyond a node's slots (`None`: as
    /// many as the node has slots).
    pub fn new(backlog: Option<u32>) -> Self {
        Self {
            backlog,
            ..Self::default()
        }
    }

    /// Applies a change the bucket watch delivered at `revision`. Revisions only grow, so a
    /// lower one than the watch delivered before means the bucket was deleted and made anew:
    /// `Err`, and the view must be built again from the start.
    pub fn apply_watched(&mut self, revision: u64, change: NodeChange) -> Result<(), BucketReset> {
        if revision < self.watched {
            return Err(BucketReset {
                watched: self.watched,
                delivered: revision,
            });
        }
        self.watched = revision;
        self.apply_at(revision, change);
        Ok(())
    }

    /// Applies a change this replica wrote (or read) itself at `revision`, ahead of the
    /// watch, so that its answers and its placements agree at once. Skipped when the watch
    /// has already delivered that revision or a newer one.
    pub fn apply_written(&mut self, revision: u64, change: NodeChange) {
        if revision > self.watched {
            self.apply_at(revision, change);
        }
    }

    /// Applies a change of the bucket key at `revision`, unless the view already holds a
    /// newer revision of that key (the watch echoing a write this replica applied, behind a
    /// newer one).
    fn apply_at(&mut self, revision: u64, change: NodeChange) {
        let node = change.node();
        let kind = change.key_kind();
        if let Some(entry) = self.nodes.get_mut(node) {
            let held = entry.revision_mut(kind);
            if revision < *held {
                return;
            }
            *held = revision;
        } else if change.is_put() {
            let entry = self.nodes.entry(node.clone()).or_default();
            *entry.revision_mut(kind) = revision;
        }
        self.apply(change);
    }

    /// Applies a change whatever its revision (plain data, as the unit tests use).
    pub fn apply(&mut self, change: NodeChange) {
        match change {
            NodeChange::Registered(record) => {
                let node = record.info.node_id.clone();
                let entry = self.nodes.entry(node).or_default();
                entry.record = Some(record);
                entry.drained_at_ms = None;
            }
            NodeChange::Forgotten(node) => {
                if let Some(entry) = self.nodes.get_mut(&node) {
                    entry.record = None;
                }
                self.drop_if_empty(&node);
            }
            NodeChange::Heartbeat(node, live) => {
                let entry = self.nodes.entry(node).or_default();
                entry.live = Some(live);
                entry.drained_at_ms = None;
            }
            NodeChange::LivenessCleared(node) => {
                if let Some(entry) = self.nodes.get_mut(&node) {
                    entry.live = None;
                }
                self.drop_if_empty(&node);
            }
            NodeChange::Admin(node, admin) => {
                self.nodes.entry(node).or_default().admin = Some(admin);
            }
            NodeChange::AdminCleared(node) => {
                if let Some(entry) = self.nodes.get_mut(&node) {
                    entry.admin = None;
                }
                self.drop_if_empty(&node);
            }
        }
    }

    fn drop_if_empty(&mut self, node: &NodeId) {
        if self.nodes.get(node).is_some_and(NodeEntry::is_empty) {
            self.nodes.remove(node);
        }
    }

    /// The node's registration record, if the view has one.
    pub fn registration(&self, node: &NodeId) -> Option<&NodeRecord> {
        self.nodes.get(node)?.record.as_ref()
    }

    /// The node's latest liveness record, if the view has one.
    pub fn liveness(&self, node: &NodeId) -> Option<&NodeLiveness> {
        self.nodes.get(node)?.live.as_ref()
    }

    /// Whether the operator lets the node take work, with the bucket revision of the record
    /// that says so (0 when there is none: open).
    pub fn schedule(&self, node: &NodeId) -> (Schedule, u64) {
        self.nodes
            .get(node)
            .and_then(|entry| Some((entry.admin.as_ref()?.schedule, entry.admin_revision)))
            .unwrap_or_default()
    }

    /// What the operator set on the node, if anything.
    pub fn admin(&self, node: &NodeId) -> Option<&NodeAdmin> {
        self.nodes.get(node)?.admin.as_ref()
    }

    /// One row of the node table at `now_ms`.
    pub fn summary(&self, node: &NodeId, now_ms: u64) -> Option<NodeSummary> {
        let entry = self.nodes.get(node)?;
        let record = entry.record.as_ref()?;
        Some(liveness::summarize(
            record,
            entry.live.as_ref(),
            entry.admin.as_ref(),
            now_ms,
        ))
    }

    /// The node table at `now_ms`, sorted by node id.
    pub fn summaries(&self, now_ms: u64) -> Vec<NodeSummary> {
        self.summaries_page(now_ms, None, None, usize::MAX).0
    }

    /// One page of [`NodeView::summaries`], in node-id order: up to `limit` nodes in
    /// `status` (any when `None`) after node `after`, and the node to continue after when
    /// more follow. Only the page's summaries are built, so a list of a large fleet costs
    /// memory for one page.
    pub fn summaries_page(
        &self,
        now_ms: u64,
        status: Option<NodeStatus>,
        after: Option<&NodeId>,
        limit: usize,
    ) -> (Vec<NodeSummary>, Option<NodeId>) {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page = Vec::new();
        for (_, entry) in self.nodes.range::<NodeId, _>((start, Bound::Unbounded)) {
            let Some(record) = entry.record.as_ref() else {
                continue;
            };
            let summary =
                liveness::summarize(record, entry.live.as_ref(), entry.admin.as_ref(), now_ms);
            if status.is_some_and(|status| summary.status != status) {
                continue;
            }
            if page.len() == limit {
                // One more matches: the page is full and another follows.
                let next = page
                    .last()
                    .map(|last: &NodeSummary| last.info.node_id.clone());
                return (page, next);
            }
            page.push(summary);
        }
        (page, None)
    }

    /// The most of this replica's work a node may hold: its slots plus the backlog, fixed if
    /// one is configured, else following the node's pace ([`Pace::backlog`]).
    fn capacity(&self, entry: &NodeEntry, record: &NodeRecord, now_ms: u64) -> u32 {
        let slots = record.info.slots.max(1);
        let backlog = self
            .backlog
            .unwrap_or_else(|| entry.pace.backlog(slots, now_ms));
        slots.saturating_add(backlog)
    }

    /// Online nodes with their entries.
    fn online(&self, now_ms: u64) -> impl Iterator<Item = (&NodeId, &NodeEntry, &NodeRecord)> {
        self.nodes.iter().filter_map(move |(node, entry)| {
            let record = entry.record.as_ref()?;
            let online =
                liveness::node_status(record, entry.live.as_ref(), now_ms) == NodeStatus::Online;
            online.then_some((node, entry, record))
        })
    }

    /// Online nodes that the operator lets take new work: approved, neither cordoned nor
    /// draining.
    fn schedulable(&self, now_ms: u64) -> impl Iterator<Item = (&NodeId, &NodeEntry, &NodeRecord)> {
        self.online(now_ms)
            .filter(|(_, entry, _)| entry.takes_work())
    }

    /// [`NodeView::schedulable`], starting after the node chosen last and wrapping around.
    fn schedulable_from_last_chosen(
        &self,
        now_ms: u64,
    ) -> impl Iterator<Item = (&NodeId, &NodeEntry, &NodeRecord)> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let (after, up_to, wrapped) = match &self.last_chosen {
            Some(last) => (
                self.nodes.range::<NodeId, _>((Excluded(last), Unbounded)),
                self.nodes.range::<NodeId, _>((Unbounded, Included(last))),
                usize::MAX,
            ),
            // Nothing chosen yet: every node comes "after", and none again.
            None => (self.nodes.range(..), self.nodes.range(..), 0),
        };
        after
            .chain(up_to.take(wrapped))
            .filter_map(move |(node, entry)| {
                let record = entry.record.as_ref()?;
                let online = liveness::node_status(record, entry.live.as_ref(), now_ms)
                    == NodeStatus::Online;
                (online && entry.takes_work()).then_some((node, entry, record))
            })
    }

    /// Picks, among the next [`PLACEMENT_CANDIDATES`] online nodes after the last one chosen
    /// (in id order, wrapping around) that meet `requirements` and have room for more of
    /// this replica's work, the least loaded. Ties go to the node with more free slots, then
    /// to the first in that order, so equal nodes share the work.
    pub fn place(&self, requirements: &Requirements, now_ms: u64) -> Placement {
        let mut any_online = false;
        let mut any_matching = false;
        let mut candidates = 0;
        let mut best: Option<(&NodeId, Load)> = None;
        for (node, entry, record) in self.schedulable_from_last_chosen(now_ms) {
            any_online = true;
            if !meets(
                record,
                entry.live.as_ref(),
                entry.admin.as_ref(),
                requirements,
            ) {
                continue;
            }
            any_matching = true;
            if entry.outstanding >= self.capacity(entry, record, now_ms) {
                continue;
            }
            let running = entry
                .live
                .as_ref()
                .map_or(0, |live| live.metrics.running_tasks);
            let load = Load {
                // Heartbeats count every replica's work; our own count is fresher.
                busy: running.max(entry.outstanding),
                slots: record.info.slots.max(1),
            };
            if best
                .as_ref()
                .is_none_or(|(_, best_load)| load.better_than(best_load))
            {
                best = Some((node, load));
            }
            candidates += 1;
            if candidates == PLACEMENT_CANDIDATES {
                break;
            }
        }
        match best {
            Some((node, _)) => Placement::Node(node.clone()),
            None if any_matching => Placement::NodesFull,
            None if any_online => Placement::NoMatchingNode,
            None => Placement::NoLiveNode,
        }
    }

    /// How many more tasks this replica could queue on online nodes right now, whatever
    /// their requirements.
    pub fn room(&self, now_ms: u64) -> u32 {
        self.room_up_to(now_ms, u32::MAX)
    }

    /// [`NodeView::room`], counted only until it reaches `limit`: intake wants no more than
    /// a batch's worth, and stopping there keeps the count's cost from growing with the
    /// fleet.
    pub fn room_up_to(&self, now_ms: u64, limit: u32) -> u32 {
        let mut room = 0_u32;
        for (_, entry, record) in self.schedulable(now_ms) {
            room = room.saturating_add(
                self.capacity(entry, record, now_ms)
                    .saturating_sub(entry.outstanding),
            );
            if room >= limit {
                break;
            }
        }
        room
    }

    /// Records that this replica dispatched attempt `attempt_id` to `node`; it counts against
    /// the node's room until [`NodeView::finished`], or until `expires_at_ms`.
    pub fn reserve(&mut self, node: &NodeId, attempt_id: String, expires_at_ms: u64) {
        if !self.nodes.contains_key(node) {
            return;
        }
        let outstanding = Outstanding {
            node: node.clone(),
            expires_at_ms,
        };
        if let Some(previous) = self.dispatched.insert(attempt_id, outstanding) {
            // The same attempt reserved twice (a redelivered submission): count it once.
            self.release_on(&previous.node);
        }
        if let Some(entry) = self.nodes.get_mut(node) {
            entry.outstanding = entry.outstanding.saturating_add(1);
            entry.drained_at_ms = None;
        }
        self.last_chosen = Some(node.clone());
    }

    /// Records that attempt `attempt_id` finished at `now_ms`. True if it was one of this
    /// replica's outstanding dispatches, so its node has room again.
    pub fn finished(&mut self, attempt_id: &str, now_ms: u64) -> bool {
        self.release(attempt_id, Some(now_ms))
    }

    /// Records that attempt `attempt_id` was never stored: its room is free again, and it
    /// does not count towards its node's pace. True if it was one of this replica's.
    pub fn unreserve(&mut self, attempt_id: &str) -> bool {
        self.release(attempt_id, None)
    }

    fn release(&mut self, attempt_id: &str, finished_at_ms: Option<u64>) -> bool {
        let Some(outstanding) = self.dispatched.remove(attempt_id) else {
            return false;
        };
        if let (Some(now_ms), Some(entry)) = (finished_at_ms, self.nodes.get_mut(&outstanding.node))
        {
            entry.pace.finished(now_ms);
        }
        self.release_on(&outstanding.node);
        true
    }

    fn release_on(&mut self, node: &NodeId) {
        if let Some(entry) = self.nodes.get_mut(node) {
            entry.outstanding = entry.outstanding.saturating_sub(1);
        }
        self.drop_if_empty(node);
    }

    /// Forgets this replica's outstanding dispatches, on `node` only or on every node: the
    /// node was lost (its work is moved by recovery), or the replica may have missed results
    /// (it reconnected). Returns how many were forgotten.
    pub fn forget_outstanding(&mut self, node: Option<&NodeId>) -> usize {
        let before = self.dispatched.len();
        self.dispatched
            .retain(|_, outstanding| node.is_some_and(|node| &outstanding.node != node));
        self.recount();
        before - self.dispatched.len()
    }

    /// Drops outstanding dispatches past their expiry; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.dispatched.len();
        self.dispatched
            .retain(|_, outstanding| outstanding.expires_at_ms > now_ms);
        let expired = before - self.dispatched.len();
        if expired > 0 {
            self.recount();
        }
        expired
    }

    /// Rebuilds the per-node counts from the outstanding dispatches.
    fn recount(&mut self) {
        for entry in self.nodes.values_mut() {
            entry.outstanding = 0;
        }
        for outstanding in self.dispatched.values() {
            if let Some(entry) = self.nodes.get_mut(&outstanding.node) {
                entry.outstanding = entry.outstanding.saturating_add(1);
            }
        }
        self.nodes.retain(|_, entry| !entry.is_empty());
    }

    /// This replica's unfinished dispatches on `node`.
    pub fn outstanding(&self, node: &NodeId) -> u32 {
        self.nodes.get(node).map_or(0, |entry| entry.outstanding)
    }

    /// Nodes whose queued work must go elsewhere: registered nodes that are offline or
    /// have left, nodes being drained, and nodes an operator removed lately.
    pub fn lost_nodes(&self, now_ms: u64) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, entry)| entry.handover(now_ms).is_some())
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// The lost nodes (see [`NodeView::lost_nodes`]) that a recovery round should look at
    /// now: those not found drained within the last [`RECHECK_DRAINED_MS`]. Looking at a
    /// node costs two JetStream API calls, so a fleet with many long-dead nodes would
    /// otherwise pay them for every dead node on every round; this way the cost follows the
    /// work actually stranded, plus one look per drained node every recheck period (which
    /// catches a dispatch another replica stored just as the node was lost).
    pub fn nodes_to_recover(&self, now_ms: u64) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, entry)| entry.handover(now_ms).is_some())
            .filter(|(_, entry)| {
                entry
                    .drained_at_ms
                    .is_none_or(|at| now_ms.saturating_sub(at) >= RECHECK_DRAINED_MS)
            })
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Records that a recovery round found nothing of `node`'s work left to move.
    pub fn mark_drained(&mut self, node: &NodeId, now_ms: u64) {
        if let Some(entry) = self.nodes.get_mut(node) {
            entry.drained_at_ms = Some(now_ms);
        }
    }

    /// Nodes that have been offline (or have left) for longer than `after_ms` and hold no
    /// work, with the revisions of their registration and liveness records: the records to
    /// delete, each only if it is still that revision, so that a node that comes back in
    /// the meantime is not forgotten.
    pub fn forgettable(&self, now_ms: u64, after_ms: u64) -> Vec<Forgettable> {
        self.nodes
            .iter()
            .filter(|(_, entry)| entry.drained_at_ms.is_some() && entry.outstanding == 0)
            .filter_map(|(node, entry)| {
                let record = entry.record.as_ref()?;
                let status = liveness::node_status(record, entry.live.as_ref(), now_ms);
                let last_seen = entry
                    .live
                    .as_ref()
                    .map_or(0, |live| live.last_seen_ms)
                    .max(record.registered_at_ms);
                (status != NodeStatus::Online && now_ms.saturating_sub(last_seen) > after_ms).then(
                    || Forgettable {
                        node: node.clone(),
                        record_revision: entry.record_revision,
                        live_revision: entry.live.as_ref().map(|_| entry.live_revision),
                    },
                )
            })
            .collect()
    }

    /// Why `node`'s queued work must go elsewhere now, if it must (see
    /// [`NodeView::lost_nodes`]).
    pub fn handover(&self, node: &NodeId, now_ms: u64) -> Option<Handover> {
        self.nodes.get(node)?.handover(now_ms)
    }
}

/// A node to forget, with the revisions of the records that say so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forgettable {
    pub node: NodeId,
    pub record_revision: u64,
    /// `None` when the node never heartbeated.
    pub live_revision: Option<u64>,
}

/// How long a lost node found drained is left alone by recovery before it is looked at
/// again.
pub const RECHECK_DRAINED_MS: u64 = 60_000;

/// The node bucket's revisions went backwards: it was deleted and created again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the node bucket was made anew (revision {delivered} after {watched})")]
pub struct BucketReset {
    pub watched: u64,
    pub delivered: u64,
}

/// How many nodes that could take a task one placement compares, the least loaded of them
/// winning. Comparing every node made a placement's cost grow with the fleet (0.75 ms at
/// 20,000 nodes against well under a microsecond at 10, docs/BENCHMARKS.md); a window that moves on with every choice keeps it flat
/// and still spreads the work, as Nomad's limited candidate iteration does. A fleet no larger
/// than this is compared whole.
pub const PLACEMENT_CANDIDATES: usize = 16;

#[derive(Clone, Copy, Debug)]
struct Load {
    busy: u32,
    slots: u32,
}

impl Load {
    /// Lower `busy / slots` first (compared without floating point: a/b < c/d ⇔ a·d < c·b),
    /// then more free slots. Candidates are visited from the node after the last one chosen
    /// and only a strictly better one replaces the best, so among equals the next in turn
    /// wins: equal nodes are chosen in turn.
    fn better_than(&self, other: &Load) -> bool {
        let mine = u64::from(self.busy) * u64::from(other.slots);
        let theirs = u64::from(other.busy) * u64::from(self.slots);
        if mine != theirs {
            return mine < theirs;
        }
        self.free() > other.free()
    }

    fn free(&self) -> u32 {
        self.slots.saturating_sub(self.busy)
    }
}

/// Whether a node meets a task's requirements: its registration for what it is, its latest
/// heartbeat for what changes (free disk), and the operator's record for the labels and
/// roles it set.
fn meets(
    record: &NodeRecord,
    live: Option<&NodeLiveness>,
    admin: Option<&NodeAdmin>,
    requirements: &Requirements,
) -> bool {
    let info = &record.info;
    let (labels, roles) = match admin {
        Some(admin) => (
            std::borrow::Cow::Owned(admin.effective_labels(&info.labels)),
            std::borrow::Cow::Owned(admin.effective_roles(&info.roles)),
        ),
        None => (
            std::borrow::Cow::Borrowed(&info.labels),
            std::borrow::Cow::Borrowed(&info.roles),
        ),
    };
    requirements
        .min_cores
        .is_none_or(|cores| info.cpu_cores >= cores)
        && requirements
            .min_memory_bytes
            .is_none_or(|bytes| info.memory_bytes >= bytes)
        && requirements
            .arch
            .as_ref()
            .is_none_or(|arch| &info.arch == arch)
        && requirements
            .labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
        && requirements.roles.is_subset(&roles)
        && meets_gpus(&info.inventory.gpus, requirements)
        && requirements.min_free_disk_bytes.is_none_or(|bytes| {
            live.and_then(|live| live.metrics.disk_free_bytes)
                .is_some_and(|free| free >= bytes)
        })
}

/// Whether enough of the node's GPUs match the GPU model and memory asked for: `min_gpus` of
/// them, or one when only a model or memory is asked for.
fn meets_gpus(gpus: &[GpuInfo], requirements: &Requirements) -> bool {
    let model = requirements.gpu_model.as_deref().map(str::to_lowercase);
    let wanted = match requirements.min_gpus {
        Some(count) => count,
        None if model.is_some() || requirements.min_gpu_memory_bytes.is_some() => 1,
        None => return true,
    };
    let matching = gpus
        .iter()
        .filter(|gpu| {
            model
                .as_deref()
                .is_none_or(|model| gpu.name.to_lowercase().contains(model))
                && requirements
                    .min_gpu_memory_bytes
                    .is_none_or(|bytes| gpu.memory_total_bytes >= bytes)
        })
        .count();
    u32::try_from(matching).unwrap_or(u32::MAX) >= wanted
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiary_proto::message::{NodeInfo, NodeMetrics, NodeState};

    const NOW: u64 = 100_000;

    fn id(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn record(name: &str, cores: u32, slots: u32) -> NodeRecord {
        NodeRecord {
            info: NodeInfo {
                node_id: id(name),
                hostname: name.into(),
                arch: "x86_64".into(),
                os: "linux".into(),
                cpu_cores: cores,
                cpu_model: String::new(),
                memory_bytes: 1 << 30,
                slots,
                agent_version: "0".into(),
                labels: Default::default(),
                incarnation: String::new(),
                public_key: String::new(),
                inventory: Default::default(),
                roles: Default::default(),
            },
            registered_at_ms: 0,
            token_id: None,
        }
    }

    fn live(running: u32, last_seen_ms: u64) -> NodeLiveness {
        NodeLiveness {
            last_seen_ms,
            heartbeat_interval_ms: 1_000,
            seq: 1,
            state: NodeState::Active,
            metrics: NodeMetrics {
                running_tasks: running,
                ..NodeMetrics::default()
            },
            incarnation: String::new(),
        }
    }

    fn view(nodes: &[(&str, u32, u32, u32)]) -> NodeView {
        let mut view = NodeView::default();
        for &(name, cores, slots, running) in nodes {
            view.apply(NodeChange::Registered(record(name, cores, slots)));
            view.apply(NodeChange::Heartbeat(id(name), live(running, NOW)));
        }
        view
    }

    #[test]
    fn recovery_leaves_a_drained_lost_node_alone_until_the_recheck_or_news_of_it() {
        let mut view = view(&[("a", 2, 2, 0), ("b", 2, 2, 0)]);
        let later = NOW + 10_000;
        assert_eq!(view.nodes_to_recover(later), vec![id("a"), id("b")]);
        view.mark_drained(&id("a"), later);
        assert_eq!(view.nodes_to_recover(later + 1), vec![id("b")]);
        assert_eq!(
            view.nodes_to_recover(later + RECHECK_DRAINED_MS),
            vec![id("a"), id("b")]
        );
        // The lost list itself still holds it: only the look at its queue is spared.
        assert_eq!(view.lost_nodes(later + 1), vec![id("a"), id("b")]);
        // A dispatch from this replica may have given it work again.
        view.reserve(&id("a"), "t.1".into(), later + 60_000);
        assert_eq!(view.nodes_to_recover(later + 1), vec![id("a"), id("b")]);
        view.mark_drained(&id("a"), later);
        // So may a heartbeat (an agent that was only cut off), even an old one.
        view.apply(NodeChange::Heartbeat(id("a"), live(0, NOW)));
        assert_eq!(view.nodes_to_recover(later + 1), vec![id("a"), id("b")]);
    }

    #[test]
    fn only_drained_nodes_gone_longer_than_the_period_are_forgettable() {
        let mut view = NodeView::default();
        for (name, last_seen) in [("gone", NOW - 50_000), ("lately", NOW - 5_000)] {
            view.apply_written(1, NodeChange::Registered(record(name, 2, 2)));
            view.apply_written(7, NodeChange::Heartbeat(id(name), live(0, last_seen)));
        }
        // Registered and never heard of since: judged from the registration time.
        let mut silent = record("silent", 2, 2);
        silent.registered_at_ms = NOW - 50_000;
        view.apply_written(3, NodeChange::Registered(silent));
        let mut left = live(0, NOW - 50_000);
        left.state = NodeState::Leaving;
        view.apply_written(1, NodeChange::Registered(record("left", 2, 2)));
        view.apply_written(4, NodeChange::Heartbeat(id("left"), left));
        view.apply_written(1, NodeChange::Registered(record("online", 2, 2)));
        view.apply_written(4, NodeChange::Heartbeat(id("online"), live(0, NOW)));
        let forget_after = 30_000;
        // Nothing is forgotten before recovery has found it holds no work.
        assert_eq!(view.forgettable(NOW, forget_after), vec![]);
        for name in ["gone", "lately", "silent", "left", "online"] {
            view.mark_drained(&id(name), NOW);
        }
        let nodes: Vec<_> = view
            .forgettable(NOW, forget_after)
            .into_iter()
            .map(|forget| forget.node)
            .collect();
        assert_eq!(nodes, vec![id("gone"), id("left"), id("silent")]);
        assert_eq!(
            view.forgettable(NOW, forget_after)[0],
            Forgettable {
                node: id("gone"),
                record_revision: 1,
                live_revision: Some(7),
            }
        );
        assert_eq!(view.forgettable(NOW, forget_after)[2].live_revision, None);
        // Work of this replica's still out there keeps a node.
        view.reserve(&id("gone"), "t.1".into(), NOW + 60_000);
        view.mark_drained(&id("gone"), NOW);
        assert!(
            !view
                .forgettable(NOW, forget_after)
                .iter()
                .any(|forget| forget.node == id("gone"))
        );
    }

    #[test]
    fn an_empty_cluster_has_no_live_node() {
        assert_eq!(
            NodeView::default().place(&Requirements::default(), NOW),
            Placement::NoLiveNode
        );
    }

    #[test]
    fn offline_nodes_are_not_candidates() {
        let mut view = view(&[("a", 2, 2, 0)]);
        view.apply(NodeChange::Heartbeat(id("a"), live(0, NOW - 10_000)));
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::NoLiveNode
        );
    }

    #[test]
    fn leaving_nodes_are_not_candidates() {
        let mut view = view(&[("a", 2, 2, 0)]);
        let mut leaving = live(0, NOW);
        leaving.state = NodeState::Leaving;
        view.apply(NodeChange::Heartbeat(id("a"), leaving));
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::NoLiveNode
        );
    }

    fn admin(edit: impl FnOnce(&mut NodeAdmin)) -> NodeAdmin {
        let mut admin = NodeAdmin::default();
        edit(&mut admin);
        admin
    }

    #[test]
    fn pending_cordoned_and_draining_nodes_get_no_new_work() {
        for set in [
            admin(|a| a.pending = true),
            admin(|a| a.schedule = Schedule::Cordoned),
            admin(|a| a.schedule = Schedule::Draining { deadline_ms: NOW }),
        ] {
            let mut view = view(&[("a", 2, 2, 0), ("b", 2, 2, 1)]);
            view.apply(NodeChange::Admin(id("a"), set.clone()));
            assert_eq!(
                view.place(&Requirements::default(), NOW),
                Placement::Node(id("b")),
                "{set:?}"
            );
            // Each node may hold slots + backlog = 4 of this replica's dispatches; only b's
            // room counts.
            assert_eq!(view.room(NOW), 4, "{set:?}");
            // Approved, uncordoned: the idle node wins again.
            view.apply(NodeChange::Admin(id("a"), NodeAdmin::default()));
            assert_eq!(
                view.place(&Requirements::default(), NOW),
                Placement::Node(id("a"))
            );
        }
    }

    #[test]
    fn draining_and_lately_removed_nodes_have_their_queues_moved() {
        let mut view = view(&[("a", 2, 2, 0), ("b", 2, 2, 0), ("c", 2, 2, 0)]);
        assert!(view.lost_nodes(NOW).is_empty());
        view.apply(NodeChange::Admin(
            id("a"),
            admin(|a| a.schedule = Schedule::Draining { deadline_ms: NOW }),
        ));
        view.apply(NodeChange::Admin(id("b"), NodeAdmin::removed(NOW)));
        view.apply(NodeChange::Forgotten(id("b")));
        view.apply(NodeChange::LivenessCleared(id("b")));
        view.apply(NodeChange::Admin(
            id("c"),
            admin(|a| a.schedule = Schedule::Cordoned),
        ));
        assert_eq!(view.lost_nodes(NOW), vec![id("a"), id("b")]);
        assert_eq!(view.handover(&id("a"), NOW), Some(Handover::Operator));
        assert_eq!(view.handover(&id("b"), NOW), Some(Handover::Operator));
        assert_eq!(view.handover(&id("c"), NOW), None);
        assert_eq!(
            view.handover(&id("c"), NOW + 60_000),
            Some(Handover::Lost),
            "an offline node"
        );
        // A removal long past no longer costs a look at the node's queue.
        assert!(
            !view
                .lost_nodes(NOW + REMOVED_RECOVERY_MS)
                .contains(&id("b"))
        );
        assert!(
            view.summaries(NOW)
                .iter()
                .all(|row| row.info.node_id != id("b"))
        );
    }

    #[test]
    fn operator_labels_decide_placement() {
        let mut view = view(&[("a", 2, 2, 0)]);
        let wants_gpu = Requirements {
            labels: [("gpu".to_owned(), "yes".to_owned())].into(),
            ..Requirements::default()
        };
        assert_eq!(view.place(&wants_gpu, NOW), Placement::NoMatchingNode);
        view.apply(NodeChange::Admin(
            id("a"),
            admin(|a| a.change_labels(&[("gpu".to_owned(), "yes".to_owned())].into(), &[])),
        ));
        assert_eq!(view.place(&wants_gpu, NOW), Placement::Node(id("a")));
    }

    #[test]
    fn the_least_loaded_node_wins() {
        let view = view(&[("a", 4, 4, 3), ("b", 4, 4, 1)]);
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::Node(id("b"))
        );
    }

    #[test]
    fn load_is_relative_to_slots() {
        // 2 of 8 busy beats 1 of 2 busy.
        let view = view(&[("small", 2, 2, 1), ("big", 8, 8, 2)]);
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::Node(id("big"))
        );
    }

    /// Places one task and reserves it as the scheduler does; the node chosen.
    fn place_one(view: &mut NodeView, task: usize) -> Option<NodeId> {
        match view.place(&Requirements::default(), NOW) {
            Placement::Node(node) => {
                view.reserve(&node, format!("t{task}.1"), NOW + 60_000);
                Some(node)
            }
            _ => None,
        }
    }

    #[test]
    fn placements_spread_before_the_next_heartbeat() {
        let mut view = view(&[("a", 2, 2, 0), ("b", 2, 2, 0)]);
        let mut counts = BTreeMap::new();
        for task in 0..8 {
            let node = place_one(&mut view, task).expect("a placement");
            *counts.entry(node).or_insert(0) += 1;
        }
        assert_eq!(counts.get(&id("a")), Some(&4));
        assert_eq!(counts.get(&id("b")), Some(&4));
    }

    #[test]
    fn a_node_is_given_no_more_than_its_slots_plus_the_backlog() {
        // 757 tasks waiting and one node that just came: it gets 2 slots + 2 backlog, and
        // the rest stays in the queue for nodes that come a moment later.
        let mut view = view(&[("first", 2, 2, 0)]);
        let placed = (0..757)
            .map_while(|task| place_one(&mut view, task))
            .count();
        assert_eq!(placed, 4);
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::NodesFull
        );
        assert_eq!(view.room(NOW), 0);

        // A second node arriving gets its share at once.
        view.apply(NodeChange::Registered(record("second", 2, 2)));
        view.apply(NodeChange::Heartbeat(id("second"), live(0, NOW)));
        assert_eq!(view.room(NOW), 4);
        assert_eq!(place_one(&mut view, 1_000), Some(id("second")));
    }

    #[test]
    fn the_backlog_is_configurable() {
        let mut view = NodeView::new(Some(0));
        view.apply(NodeChange::Registered(record("a", 4, 4)));
        view.apply(NodeChange::Heartbeat(id("a"), live(0, NOW)));
        assert_eq!(view.room(NOW), 4);
        let placed = (0..10).map_while(|task| place_one(&mut view, task)).count();
        assert_eq!(placed, 4);
    }

    /// Places and finishes `count` tasks on the only node, `spacing_ms` apart from `start_ms`;
    /// returns when the last finished.
    fn finish_tasks(view: &mut NodeView, count: usize, start_ms: u64, spacing_ms: u64) -> u64 {
        let mut now = start_ms;
        for task in 0..count {
            let node = match view.place(&Requirements::default(), now) {
                Placement::Node(node) => node,
                other => panic!("task {task} was not placed: {other:?}"),
            };
            let attempt = format!("pace{task}.1");
            view.reserve(&node, attempt.clone(), now + 60_000);
            assert!(view.finished(&attempt, now));
            now += spacing_ms;
        }
        now
    }

    #[test]
    fn the_backlog_follows_the_pace_a_node_finishes_tasks_at() {
        // A node with 2 slots, seen at first: 2 slots + 2 queued.
        let mut view = view(&[("a", 2, 2, 0)]);
        assert_eq!(view.room(NOW), 4);

        // It finishes 60 tasks within one window, a pace of 600 a second: it is given what
        // it finishes in BACKLOG_TIME_MS (10 ms: 6 tasks) beyond its slots.
        let end = finish_tasks(&mut view, 60, NOW, 0);
        let next_window = end + PACE_WINDOW_MS;
        assert_eq!(view.room(next_window), 2 + 6);

        // Faster still: at most MAX_BACKLOG_PER_SLOT per slot beyond its slots.
        let end = finish_tasks(&mut view, 5_000, next_window, 0);
        assert_eq!(
            view.room(end + PACE_WINDOW_MS),
            2 + 2 * MAX_BACKLOG_PER_SLOT
        );

        // A window that passes with nothing finished: back to one per slot.
        assert_eq!(view.room(end + 3 * PACE_WINDOW_MS), 4);
    }

    #[test]
    fn a_node_running_long_tasks_keeps_one_queued_per_slot() {
        let mut view = view(&[("a", 4, 4, 0)]);
        // One task finished every 50 ms: two a window, far below a slot's worth in 10 ms.
        let end = finish_tasks(&mut view, 40, NOW, 50);
        assert_eq!(view.room(end), 4 + 4);
    }

    #[test]
    fn a_configured_backlog_does_not_follow_the_pace() {
        let mut view = NodeView::new(Some(1));
        view.apply(NodeChange::Registered(record("a", 2, 2)));
        view.apply(NodeChange::Heartbeat(id("a"), live(0, NOW)));
        let end = finish_tasks(&mut view, 1_000, NOW, 0);
        assert_eq!(view.room(end + PACE_WINDOW_MS), 3);
    }

    #[test]
    fn a_dispatch_never_stored_does_not_count_towards_the_pace() {
        let mut view = view(&[("a", 2, 2, 0)]);
        for task in 0..1_000 {
            let attempt = format!("never{task}.1");
            view.reserve(&id("a"), attempt.clone(), NOW + 60_000);
            assert!(view.unreserve(&attempt));
        }
        assert_eq!(view.room(NOW + PACE_WINDOW_MS), 4);
    }

    #[test]
    fn a_finished_task_makes_room_and_only_our_own_count() {
        let mut view = view(&[("a", 1, 1, 0)]);
        assert_eq!(place_one(&mut view, 1), Some(id("a")));
        assert_eq!(place_one(&mut view, 2), Some(id("a")));
        assert_eq!(place_one(&mut view, 3), None);
        // A result of another replica's dispatch changes nothing.
        assert!(!view.finished("someone-else.1", NOW));
        assert_eq!(view.room(NOW), 0);
        assert!(view.finished("t1.1", NOW));
        assert!(!view.finished("t1.1", NOW), "each attempt finishes once");
        assert_eq!(view.room(NOW), 1);
        assert_eq!(place_one(&mut view, 3), Some(id("a")));
    }

    #[test]
    fn the_same_attempt_reserved_twice_counts_once() {
        let mut view = view(&[("a", 1, 1, 0)]);
        view.reserve(&id("a"), "t.1".into(), NOW + 1);
        view.reserve(&id("a"), "t.1".into(), NOW + 1);
        assert_eq!(view.outstanding(&id("a")), 1);
    }

    #[test]
    fn outstanding_work_expires_and_can_be_forgotten() {
        let mut view = view(&[("a", 2, 2, 0), ("b", 2, 2, 0)]);
        view.reserve(&id("a"), "old.1".into(), NOW + 10);
        view.reserve(&id("a"), "new.1".into(), NOW + 1_000);
        view.reserve(&id("b"), "other.1".into(), NOW + 1_000);
        assert_eq!(view.expire(NOW + 10), 1);
        assert_eq!(view.outstanding(&id("a")), 1);
        assert_eq!(view.forget_outstanding(Some(&id("a"))), 1);
        assert_eq!(view.outstanding(&id("a")), 0);
        assert_eq!(view.outstanding(&id("b")), 1);
        assert_eq!(view.forget_outstanding(None), 1);
        assert_eq!(view.room(NOW), 8);
    }

    #[test]
    fn a_stale_record_from_the_watch_does_not_undo_a_newer_one() {
        // The replica applied the `leaving` heartbeat it stored at revision 7; the watch then
        // brings the older `active` record of revision 5, and after it revision 7 itself.
        let mut view = NodeView::default();
        view.apply_watched(1, NodeChange::Registered(record("a", 2, 2)))
            .unwrap();
        let mut leaving = live(0, NOW);
        leaving.state = NodeState::Leaving;
        view.apply_written(7, NodeChange::Heartbeat(id("a"), leaving.clone()));
        view.apply_watched(5, NodeChange::Heartbeat(id("a"), live(0, NOW)))
            .unwrap();
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::NoLiveNode
        );
        view.apply_watched(7, NodeChange::Heartbeat(id("a"), leaving))
            .unwrap();
        assert_eq!(view.lost_nodes(NOW), vec![id("a")]);
        // A newer record applies as usual.
        view.apply_watched(9, NodeChange::Heartbeat(id("a"), live(0, NOW)))
            .unwrap();
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::Node(id("a"))
        );
    }

    #[test]
    fn a_write_the_watch_has_passed_does_not_bring_back_a_deleted_node() {
        let mut view = NodeView::default();
        view.apply_watched(3, NodeChange::Registered(record("a", 2, 2)))
            .unwrap();
        // Read at revision 3 by a request, applied after the watch delivered the delete.
        view.apply_watched(4, NodeChange::Forgotten(id("a")))
            .unwrap();
        view.apply_written(3, NodeChange::Registered(record("a", 2, 2)));
        assert!(view.registration(&id("a")).is_none());
    }

    #[test]
    fn revisions_going_backwards_mean_the_bucket_was_made_anew() {
        let mut view = NodeView::default();
        view.apply_watched(40, NodeChange::Registered(record("a", 2, 2)))
            .unwrap();
        assert_eq!(
            view.apply_watched(1, NodeChange::Registered(record("a", 2, 2))),
            Err(BucketReset {
                watched: 40,
                delivered: 1
            })
        );
    }

    #[test]
    fn equal_nodes_take_turns() {
        // One task at a time, each finished before the next: with ties going to the lowest
        // id, node "a" would run all of them.
        let mut view = view(&[
            ("a", 2, 2, 0),
            ("b", 2, 2, 0),
            ("c", 2, 2, 0),
            ("d", 2, 2, 0),
        ]);
        let mut chosen = Vec::new();
        for task in 0..8 {
            let node = place_one(&mut view, task).expect("a placement");
            assert!(view.finished(&format!("t{task}.1"), NOW));
            chosen.push(node.to_string());
        }
        assert_eq!(chosen, ["a", "b", "c", "d", "a", "b", "c", "d"]);
    }

    #[test]
    fn room_is_counted_up_to_the_limit_asked_for() {
        let mut view = view(&[("a", 2, 2, 0), ("b", 2, 2, 0), ("c", 2, 2, 0)]);
        assert_eq!(view.room(NOW), 12);
        assert_eq!(view.room_up_to(NOW, 12), 12);
        // Whole nodes are counted: it stops at the first node that reaches the limit.
        assert_eq!(view.room_up_to(NOW, 5), 8);
        assert_eq!(view.room_up_to(NOW, 1), 4);
        for task in 0..12 {
            place_one(&mut view, task).expect("a placement");
        }
        assert_eq!(view.room_up_to(NOW, 1), 0);
    }

    #[test]
    fn a_fleet_larger_than_the_window_is_filled_in_turn() {
        let names: Vec<String> = (0..100).map(|n| format!("n{n:03}")).collect();
        let nodes: Vec<(&str, u32, u32, u32)> =
            names.iter().map(|name| (name.as_str(), 2, 2, 0)).collect();
        let mut view = view(&nodes);
        let mut chosen: Vec<String> = (0..100)
            .map(|task| place_one(&mut view, task).expect("a placement").to_string())
            .collect();
        chosen.sort();
        assert_eq!(
            chosen, names,
            "every node takes one task before any takes two"
        );
    }

    #[test]
    fn a_placement_compares_a_bounded_window_that_moves_on_with_each_choice() {
        // Every node runs one of its two slots, except n30, which is idle. The first
        // placements compare only the window after the last choice, so n30 wins only once
        // the window reaches it.
        let names: Vec<String> = (0..40).map(|n| format!("n{n:02}")).collect();
        let nodes: Vec<(&str, u32, u32, u32)> = names
            .iter()
            .map(|name| (name.as_str(), 2, 2, u32::from(name != "n30")))
            .collect();
        let mut view = view(&nodes);
        let chosen: Vec<String> = (0..16)
            .map(|task| place_one(&mut view, task).expect("a placement").to_string())
            .collect();
        let mut expected: Vec<String> = names[..15].to_vec();
        expected.push("n30".into());
        assert_eq!(chosen, expected);
        assert_eq!(
            PLACEMENT_CANDIDATES, 16,
            "the window this test is built around"
        );
    }

    #[test]
    fn heartbeat_load_counts_when_it_is_higher_than_our_own() {
        // Another replica's work shows only in the heartbeat.
        let mut view = view(&[("a", 2, 2, 2), ("b", 2, 2, 0)]);
        assert_eq!(place_one(&mut view, 1), Some(id("b")));
        assert_eq!(place_one(&mut view, 2), Some(id("b")));
    }

    #[test]
    fn requirements_filter_nodes() {
        let view = view(&[("small", 2, 2, 0), ("big", 16, 16, 10)]);
        let needs_cores = Requirements {
            min_cores: Some(8),
            ..Requirements::default()
        };
        assert_eq!(view.place(&needs_cores, NOW), Placement::Node(id("big")));
        let impossible = Requirements {
            arch: Some("riscv64".into()),
            ..Requirements::default()
        };
        assert_eq!(view.place(&impossible, NOW), Placement::NoMatchingNode);
    }

    #[test]
    fn labels_must_match_exactly() {
        let mut view = NodeView::default();
        let mut attic = record("attic", 2, 2);
        attic.info.labels.insert("zone".into(), "attic".into());
        view.apply(NodeChange::Registered(attic));
        view.apply(NodeChange::Heartbeat(id("attic"), live(0, NOW)));
        let mut wants = Requirements::default();
        wants.labels.insert("zone".into(), "attic".into());
        assert_eq!(view.place(&wants, NOW), Placement::Node(id("attic")));
        wants.labels.insert("zone".into(), "cellar".into());
        assert_eq!(view.place(&wants, NOW), Placement::NoMatchingNode);
    }

    /// A view of online nodes given as full records with their heartbeats.
    fn view_of(nodes: Vec<(NodeRecord, NodeLiveness)>) -> NodeView {
        let mut view = NodeView::default();
        for (record, live) in nodes {
            let node = record.info.node_id.clone();
            view.apply(NodeChange::Registered(record));
            view.apply(NodeChange::Heartbeat(node, live));
        }
        view
    }

    fn gpus(name: &str, count: u32, memory_gib: u64) -> Vec<GpuInfo> {
        (0..count)
            .map(|index| GpuInfo {
                index,
                name: name.into(),
                memory_total_bytes: memory_gib << 30,
                ..GpuInfo::default()
            })
            .collect()
    }

    #[test]
    fn roles_must_all_be_performed() {
        // The idle node performs no role, so only the requirement keeps it from winning.
        let mut dns = record("dns", 2, 2);
        dns.info.roles = ["dns".to_owned()].into();
        let mut both = record("both", 2, 2);
        both.info.roles = ["dns".to_owned(), "host".to_owned()].into();
        let view = view_of(vec![
            (record("idle", 2, 2), live(0, NOW)),
            (dns, live(1, NOW)),
            (both, live(1, NOW)),
        ]);
        let wants = |roles: &[&str]| Requirements {
            roles: roles.iter().map(|role| (*role).to_owned()).collect(),
            ..Requirements::default()
        };
        assert_eq!(view.place(&wants(&[]), NOW), Placement::Node(id("idle")));
        assert_eq!(
            view.place(&wants(&["host"]), NOW),
            Placement::Node(id("both"))
        );
        assert_eq!(
            view.place(&wants(&["dns", "host"]), NOW),
            Placement::Node(id("both"))
        );
        assert!(matches!(
            view.place(&wants(&["dns"]), NOW),
            Placement::Node(node) if node != id("idle")
        ));
        assert_eq!(
            view.place(&wants(&["dns", "nginx"]), NOW),
            Placement::NoMatchingNode
        );
    }

    #[test]
    fn gpu_requirements_count_only_the_gpus_that_match() {
        // The node without GPUs is the least loaded, so it wins whenever a requirement lets
        // it; the A100 node is busier than the T4 node.
        let mut t4 = record("t4", 8, 8);
        t4.info.inventory.gpus = gpus("Tesla T4", 2, 16);
        let mut a100 = record("a100", 8, 8);
        a100.info.inventory.gpus = gpus("NVIDIA A100-SXM4-80GB", 1, 80);
        let view = view_of(vec![
            (record("cpu", 8, 8), live(0, NOW)),
            (t4, live(1, NOW)),
            (a100, live(2, NOW)),
        ]);
        let place = |requirements: Requirements| view.place(&requirements, NOW);

        assert_eq!(
            place(Requirements {
                min_gpus: Some(0),
                ..Requirements::default()
            }),
            Placement::Node(id("cpu"))
        );
        assert_eq!(
            place(Requirements {
                min_gpus: Some(1),
                ..Requirements::default()
            }),
            Placement::Node(id("t4"))
        );
        assert_eq!(
            place(Requirements {
                min_gpus: Some(3),
                ..Requirements::default()
            }),
            Placement::NoMatchingNode
        );
        // The model alone asks for one GPU of that model; case does not matter.
        for model in ["a100", "A100-SXM4", "nvidia a100"] {
            assert_eq!(
                place(Requirements {
                    gpu_model: Some(model.into()),
                    ..Requirements::default()
                }),
                Placement::Node(id("a100")),
                "{model}"
            );
        }
        assert_eq!(
            place(Requirements {
                gpu_model: Some("rtx".into()),
                ..Requirements::default()
            }),
            Placement::NoMatchingNode
        );
        // Memory alone asks for one GPU with that much.
        assert_eq!(
            place(Requirements {
                min_gpu_memory_bytes: Some(40 << 30),
                ..Requirements::default()
            }),
            Placement::Node(id("a100"))
        );
        // Two GPUs of 16 GiB each, not 32 GiB between them.
        assert_eq!(
            place(Requirements {
                min_gpus: Some(2),
                min_gpu_memory_bytes: Some(16 << 30),
                ..Requirements::default()
            }),
            Placement::Node(id("t4"))
        );
        assert_eq!(
            place(Requirements {
                min_gpus: Some(2),
                min_gpu_memory_bytes: Some(32 << 30),
                ..Requirements::default()
            }),
            Placement::NoMatchingNode
        );
        assert_eq!(
            place(Requirements {
                min_gpus: Some(2),
                gpu_model: Some("a100".into()),
                ..Requirements::default()
            }),
            Placement::NoMatchingNode
        );
    }

    #[test]
    fn free_disk_is_judged_by_the_latest_heartbeat() {
        let with_disk = |running: u32, free: Option<u64>| {
            let mut live = live(running, NOW);
            live.metrics.disk_free_bytes = free;
            live
        };
        // The idle node does not report its disk (an older agent, or no heartbeat yet).
        let mut view = view_of(vec![
            (record("unknown", 2, 2), with_disk(0, None)),
            (record("roomy", 2, 2), with_disk(1, Some(10 << 30))),
        ]);
        let needs = |bytes: u64| Requirements {
            min_free_disk_bytes: Some(bytes),
            ..Requirements::default()
        };
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::Node(id("unknown"))
        );
        assert_eq!(
            view.place(&needs(5 << 30), NOW),
            Placement::Node(id("roomy"))
        );
        assert_eq!(
            view.place(&needs(10 << 30), NOW),
            Placement::Node(id("roomy"))
        );
        assert_eq!(view.place(&needs(20 << 30), NOW), Placement::NoMatchingNode);
        // The disk fills up: the next heartbeat says so, and the node no longer qualifies.
        view.apply(NodeChange::Heartbeat(
            id("roomy"),
            with_disk(1, Some(1 << 30)),
        ));
        assert_eq!(view.place(&needs(5 << 30), NOW), Placement::NoMatchingNode);
    }

    #[test]
    fn offline_and_departed_nodes_are_lost() {
        let mut view = view(&[("alive", 2, 2, 0), ("dead", 2, 2, 0), ("gone", 2, 2, 0)]);
        view.apply(NodeChange::Heartbeat(id("dead"), live(0, NOW - 10_000)));
        let mut leaving = live(0, NOW);
        leaving.state = NodeState::Leaving;
        view.apply(NodeChange::Heartbeat(id("gone"), leaving));
        assert_eq!(view.lost_nodes(NOW), vec![id("dead"), id("gone")]);
        // What recovery asks before it moves a task off a node.
        assert_eq!(view.handover(&id("alive"), NOW), None);
        assert_eq!(view.handover(&id("dead"), NOW), Some(Handover::Lost));
        assert_eq!(view.handover(&id("gone"), NOW), Some(Handover::Lost));
        assert_eq!(view.handover(&id("unknown"), NOW), None);
    }

    #[test]
    fn the_node_list_comes_in_pages_in_node_id_order_filtered_by_status() {
        let names: Vec<String> = (0..7).map(|n| format!("n{n}")).collect();
        let rows: Vec<(&str, u32, u32, u32)> =
            names.iter().map(|name| (name.as_str(), 2, 2, 0)).collect();
        let mut view = view(&rows);
        view.apply(NodeChange::Heartbeat(id("n3"), live(0, NOW - 10_000)));

        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = view.summaries_page(NOW, None, after.as_ref(), 3);
            assert!(page.len() <= 3);
            seen.extend(page.iter().map(|node| node.info.node_id.to_string()));
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, names, "every node once, in order");

        let (online, next) = view.summaries_page(NOW, Some(NodeStatus::Online), None, 10);
        assert_eq!(online.len(), 6);
        assert_eq!(next, None);
        // A full last page says nothing follows when nothing does.
        let (exact, next) = view.summaries_page(NOW, Some(NodeStatus::Offline), None, 1);
        assert_eq!((exact.len(), next), (1, None));
    }

    #[test]
    fn forgotten_nodes_leave_the_table() {
        let mut view = view(&[("a", 2, 2, 0)]);
        assert_eq!(view.summaries(NOW).len(), 1);
        view.apply(NodeChange::Forgotten(id("a")));
        assert!(view.summaries(NOW).is_empty());
        assert!(view.registration(&id("a")).is_none());
        view.apply(NodeChange::LivenessCleared(id("a")));
        assert_eq!(
            view.place(&Requirements::default(), NOW),
            Placement::NoLiveNode
        );
    }
}
