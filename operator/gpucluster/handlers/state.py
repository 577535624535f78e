"""The operator's in-memory state, one object for the whole process.

`gpucluster run` creates it and hands it to Kopf as the operator's memo
(`memo.state`); per-object memos are shallow copies of the operator's, so
every handler, index filter, daemon and timer shares this one object. Nothing in the
handlers keeps state in module globals: a second operator in the same
process, or a test, starts from a clean OperatorState.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import logging
from typing import Any

import kopf

from gpucluster.handlers.indexes import NodeIndex, PodIndex
from gpucluster.kube import client
from gpucluster.planning.lifecycle import Assumed, PlannerCache
from gpucluster.planning.remediation import UnseenWrites

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PoolRemediation:
    """What one pool's remediation keeps between its passes."""

    unseen: UnseenWrites = dataclasses.field(default_factory=UnseenWrites)
    # Nodes whose drain has been announced: the drain is retried every pass,
    # its Event is posted once.
    draining: set[str] = dataclasses.field(default_factory=set)
    # The drains, replacements and releases a pass started, still being
    # written. Passes do not wait for them: a drain is a list and evictions
    # per node, and with passes waiting for them a cordon came up to 4.8 s
    # after its node's fault at 2,000 nodes (1.5 s since). One at a time; a
    # pass after it ends starts the next.
    follow_through: asyncio.Task[None] | None = None

    def following_through(self) -> bool:
        return self.follow_through is not None and not self.follow_through.done()

    def remember_quarantine(self, node: str, quarantined: bool, at: float) -> None:
        self.unseen = dataclasses.replace(self.unseen, quarantine={**self.unseen.quarantine, node: (quarantined, at)})

    def remember_delete(self, node: str, at: float) -> None:
        self.unseen = dataclasses.replace(self.unseen, deleted={**self.unseen.deleted, node: at})


@dataclasses.dataclass
class ClusterRemediation:
    """The remediation daemon of one TrainingCluster: the pools node events
    asked a pass for since its last one, and each pool's memory. It lives as
    long as the daemon, so a replica that peering paused never plans on the
    memory of the time it last led."""

    wanted: set[str] = dataclasses.field(default_factory=set)
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    pools: dict[str, PoolRemediation] = dataclasses.field(default_factory=dict)

    def want(self, pool: str) -> None:
        self.wanted.add(pool)
        self.wake.set()

    def take_wanted(self) -> set[str]:
        wanted, self.wanted = self.wanted, set()
        self.wake.clear()
        return wanted

    async def finish(self) -> None:
        """Waits for the pools' writes in flight, so that a replica that
        stops leading stops writing; cancelled, gather cancels them."""
        await asyncio.gather(*(pool.follow_through for pool in self.pools.values()
                               if pool.follow_through is not None), return_exceptions=True)


@dataclasses.dataclass
class OperatorState:
    # `gpucluster run -n GLOB ...`: TrainingJobs are served only in matching
    # namespaces (empty: all). TrainingClusters and Nodes are cluster-scoped.
    served_namespaces: tuple[str, ...] = ()
    # Job decisions applied but not yet seen in the job index (its watch lags
    # the writes by a moment): the next cycle trusts these instead. Kueue
    # calls them assumed workloads.
    assumed_jobs: dict[str, Assumed] = dataclasses.field(default_factory=dict)
    # One lock per TrainingCluster serialises its admission cycle with the
    # judging of its jobs' spec edits: one writer of a job's phase at a time.
    job_locks: dict[str, asyncio.Lock] = dataclasses.field(default_factory=dict)
    # Per TrainingCluster: the fingerprint of its last plan's inputs, and when.
    last_plans: dict[str, tuple[int | None, float]] = dataclasses.field(default_factory=dict)
    # Per TrainingCluster: the planner's node snapshots and capacity indexes,
    # carried from one admission cycle to the next (used under its job lock).
    planner_caches: dict[str, PlannerCache] = dataclasses.field(default_factory=dict)
    # One lock per TrainingCluster: its create, update and resume handlers and
    # its resync timer run one reconcile at a time.
    reconcile_locks: dict[str, asyncio.Lock] = dataclasses.field(default_factory=dict)
    # The remediation daemons running in this replica, by TrainingCluster.
    remediation: dict[str, ClusterRemediation] = dataclasses.field(default_factory=dict)
    # Set when peering pauses this replica after it led; the runner then
    # stops the operator. Kopf would resume it later on indexes that never
    # saw what was deleted meanwhile, and without waiting for them to fill
    # again; a fresh process waits for complete indexes before it acts.
    lead_lost: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # The cluster's Nodes by TrainingCluster; a node whose GPU health and
    # quarantine disagree asks its cluster's remediation for a pass.
    nodes: NodeIndex = dataclasses.field(init=False)
    # Every pod: the nodes they keep busy, each job's workers, other GPUs held.
    pods: PodIndex = dataclasses.field(default_factory=PodIndex)

    def __post_init__(self) -> None:
        self.nodes = NodeIndex(on_attention=self._remediation_wanted)

    async def synced(self) -> None:
        """Waits until the node and pod indexes hold their first lists."""
        await self.nodes.synced.wait()
        await self.pods.synced.wait()

    def _remediation_wanted(self, cluster: str, pool: str) -> None:
        # No daemon yet: its first pass, at its start, covers every pool.
        passes = self.remediation.get(cluster)
        if passes is not None:
            passes.want(pool)

    def serves(self, namespace: str | None) -> bool:
        return not self.served_namespaces or any(
            fnmatch.fnmatchcase(namespace or "", glob) for glob in self.served_namespaces)

    def job_lock(self, cluster: str) -> asyncio.Lock:
        return self.job_locks.setdefault(cluster, asyncio.Lock())

    def planner_cache(self, cluster: str) -> PlannerCache:
        return self.planner_caches.setdefault(cluster, PlannerCache())

    def reconcile_lock(self, cluster: str) -> asyncio.Lock:
        return self.reconcile_locks.setdefault(cluster, asyncio.Lock())

    def lose_lead(self) -> None:
        if not self.lead_lost.is_set():
            log.warning("peering paused this replica after it led; stopping, so that it comes back "
                        "as a fresh standby instead of resuming on stale indexes")
            self.lead_lost.set()


def state_of(memo: Any) -> OperatorState:
    state: OperatorState = memo.state
    return state


@kopf.on.startup()
async def watch_nodes_and_pods(memo: Any, **_: Any) -> None:
    state = state_of(memo)
    state.nodes.start(client.core())
    state.pods.start(client.core())


@kopf.on.cleanup()
async def stop_watching_nodes_and_pods(memo: Any, **_: Any) -> None:
    state = state_of(memo)
    state.nodes.stop()
    state.pods.stop()


@kopf.on.probe(id="indexes")
def indexes_ready(memo: Any, **_: Any) -> bool:
    """Kopf's own indexes are complete before its handlers run; the node
    and pod indexes, watches of ours, report here when their first lists
    are in."""
    state = state_of(memo)
    return state.nodes.synced.is_set() and state.pods.synced.is_set()
