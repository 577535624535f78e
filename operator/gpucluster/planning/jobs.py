"""The views a TrainingJob's lifecycle and the admission cycle are built
from, the planner's snapshot, and the checks a submitted job passes once.
Pure: the handlers gather these views from Kopf indexes; lifecycle.py decides
what happens to each job."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from functools import cached_property
from itertools import compress, count
from operator import attrgetter, is_not

from gpucluster.planning.admission_snapshot import (
    NodeSnapshot,
    PendingJob,
    RunningGang,
    TopologyLevel,
    TopologyMode,
    TopologyRequest,
)
from gpucluster.planning.pools import ObservedNode


class Phase(StrEnum):
    QUEUED = "Queued"
    ADMITTED = "Admitted"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


WAITING_PHASES = frozenset({Phase.QUEUED, Phase.RESTARTING})
ACTIVE_PHASES = frozenset({Phase.ADMITTED, Phase.RUNNING})
FINISHED_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})
# The planner's key of the GPUs a job's stale pods still hold.
LEFTOVER_SUFFIX = "#leftover"


@dataclass(frozen=True)
class JobView:
    """A TrainingJob as the admission cycle and lifecycle need it."""

    key: str
    namespace: str
    name: str
    cluster: str
    pool: str
    priority: int
    arrival: float
    workers: int
    gpus_per_worker: int
    # None: submitted, not yet judged (no status.phase).
    phase: Phase | None
    attempt: int = 0
    restarts: int = 0
    max_restarts: int = 3
    nodes: tuple[str, ...] = ()
    excluded_nodes: frozenset[str] = frozenset()
    topology_level: TopologyLevel | None = None
    topology_mode: TopologyMode = "preferred"
    first_admitted_at: float | None = None
    deadline_seconds: int | None = None
    uid: str = ""
    queue_position: int = 0
    starts_by: str = ""  # status.startsBy: RFC 3339, or "" when unbounded or not the head
    workers_ready: str = ""
    reason: str = ""
    message: str = ""
    queued_at: float | None = None
    node_failure_grace_s: float = 60.0

    @property
    def gpus(self) -> int:
        return self.workers * self.gpus_per_worker

    @cached_property
    def fingerprint(self) -> int:
        """The hash of its fields. Every admission cycle fingerprints every
        job (lifecycle.planner_inputs), thousands at a time, most the same
        objects as the cycle before: frozen, so hashed once."""
        return hash(_job_fields(self))

    def __hash__(self) -> int:
        return self.fingerprint


_job_fields = attrgetter(*(f.name for f in fields(JobView)))


@dataclass(frozen=True)
class WorkerPod:
    """A worker pod of some attempt of a job."""

    name: str
    job_key: str
    attempt: int
    rank: int
    node: str
    phase: str
    gpus: int = 0
    terminating: bool = False
    exit_code: int | None = None
    reason: str = ""

    @property
    def holds_gpus(self) -> bool:
        return self.phase not in ("Succeeded", "Failed")


def node_usable(node: ObservedNode | None) -> bool:
    return node is not None and node.ready and node.gpu_healthy and not node.cordoned


class NodeSnapshots:
    """The planner's view of each node, kept from one cycle to the next: a
    node seen again as it was (an equal ObservedNode, with as many GPUs held
    by other pods, in a cluster whose pools have the same GPU products) gets
    the very NodeSnapshot of the last cycle, which the planner's
    CapacityCache passes over by identity.

    Cost at 25,000 nodes: when the nodes come in the same order as last
    time, with the same products and GPUs held by other pods, comparisons
    in C find the few nodes that are not the same objects as before, and
    only those are looked at in Python; otherwise one pass by name."""

    def __init__(self) -> None:
        self._nodes: list[ObservedNode] = []
        self._snapshots: list[NodeSnapshot] = []
        self._products: dict[str, str] = {}
        self._foreign_gpus: dict[str, int] = {}

    def of(self, nodes: Iterable[ObservedNode], products: Mapping[str, str],
           foreign_gpus: Mapping[str, int]) -> list[NodeSnapshot]:
        nodes = list(nodes)
        snapshots = None
        if len(nodes) == len(self._nodes) and products == self._products and foreign_gpus == self._foreign_gpus:
            snapshots = self._in_place(nodes)
        if snapshots is None:
            snapshots = self._by_name(nodes, products, foreign_gpus)
        self._nodes, self._snapshots = nodes, snapshots
        self._products, self._foreign_gpus = dict(products), dict(foreign_gpus)
        return snapshots

    def _in_place(self, nodes: list[ObservedNode]) -> list[NodeSnapshot] | None:
        """The snapshots of `nodes`, each where the last cycle had a node of
        the same name; None if one of them is not."""
        snapshots = list(self._snapshots)
        for position in compress(count(), map(is_not, nodes, self._nodes)):
            node, before = nodes[position], self._nodes[position]
            if node.name != before.name:
                return None
            if node != before:
                snapshots[position] = _snapshot(node, self._products, self._foreign_gpus)
        return snapshots

    def _by_name(self, nodes: list[ObservedNode], products: Mapping[str, str],
                 foreign_gpus: Mapping[str, int]) -> list[NodeSnapshot]:
        seen = {node.name: (node, snapshot) for node, snapshot in zip(self._nodes, self._snapshots, strict=True)}
        snapshots = []
        for node in nodes:
            before = seen.get(node.name)
            if before is not None and before[0] == node and products.get(node.pool) == self._products.get(node.pool) \
                    and foreign_gpus.get(node.name, 0) == self._foreign_gpus.get(node.name, 0):
                snapshots.append(before[1])
            else:
                snapshots.append(_snapshot(node, products, foreign_gpus))
        return snapshots


def _snapshot(node: ObservedNode, products: Mapping[str, str], foreign_gpus: Mapping[str, int]) -> NodeSnapshot:
    return NodeSnapshot(name=node.name, pool=node.pool, gpu_product=products.get(node.pool, ""),
                        allocatable_gpus=max(0, node.gpus - foreign_gpus.get(node.name, 0)),
                        block=node.block, rack=node.rack, schedulable=node_usable(node) and not node.draining)


class RunningGangs:
    """Each admitted job's RunningGang, kept from one cycle to the next
    while the job's view is the same (the same object or an equal one) and
    so is its end: the planner's CapacityCache counts the GPUs of only the
    gangs that are new objects."""

    def __init__(self) -> None:
        self._by_key: dict[str, tuple[JobView, RunningGang]] = {}

    def of(self, jobs: Iterable[JobView], now: float) -> list[RunningGang]:
        """The gangs of `jobs`, which are in an active phase."""
        kept: dict[str, tuple[JobView, RunningGang]] = {}
        gangs = []
        for job in jobs:
            ends_by = _ends_by(job, now)
            seen = self._by_key.get(job.key)
            if seen is None or (seen[0] is not job and seen[0] != job) or seen[1].ends_by != ends_by:
                seen = (job, RunningGang(key=job.key, priority=job.priority, pool=job.pool,
                                         gpus_by_node=_per_node(job.nodes, job.gpus_per_worker),
                                         admitted_at=job.first_admitted_at or 0.0, ends_by=ends_by))
            kept[job.key] = seen
            gangs.append(seen[1])
        self._by_key = kept
        return gangs


def admission_inputs(
    jobs: Iterable[JobView],
    nodes: Iterable[ObservedNode],
    pods: Iterable[WorkerPod],
    products: Mapping[str, str],
    foreign_gpus: Mapping[str, int],
    now: float,
    snapshots: NodeSnapshots | None = None,
    gangs: RunningGangs | None = None,
) -> tuple[list[NodeSnapshot], list[RunningGang], list[PendingJob]]:
    """The planner's snapshot at `now`.

    A job in an active phase holds the GPUs of its placement (its pods may not
    be in the index yet). Pods of any other attempt, or of a job that is no
    longer admitted (or no longer exists), hold theirs until they are gone.
    `pods` are every worker pod on the cluster's nodes, of known jobs or
    not. GPUs that pods of no TrainingJob hold are taken off their node's
    allocatable, so the operator and the default scheduler never promise the
    same GPU twice. `snapshots` and `gangs` keep the nodes' snapshots and
    the running gangs of the last cycle they were given to.
    """
    node_snapshots = (NodeSnapshots() if snapshots is None else snapshots).of(nodes, products, foreign_gpus)
    jobs = list(jobs)
    current = {job.key: job.attempt for job in jobs if job.phase in ACTIVE_PHASES}
    # GPUs held by pods that are not the current attempt of an admitted gang:
    # a gang restarting, preempted, failed or deleted whose pods still run or
    # terminate. They are not free until the pods are gone, so they count as
    # a gang on its way out (evicting), under a key of their own.
    leftovers: dict[str, dict[str, int]] = {}
    for pod in pods:
        if pod.holds_gpus and pod.node and current.get(pod.job_key) != pod.attempt:
            held = leftovers.setdefault(pod.job_key, {})
            held[pod.node] = held.get(pod.node, 0) + pod.gpus
    pools_of_nodes = {n.name: n.pool for n in node_snapshots} if leftovers else {}
    running: list[RunningGang] = [
        RunningGang(key=f"{key}{LEFTOVER_SUFFIX}", priority=0, pool=pools_of_nodes.get(next(iter(held)), ""),
                    gpus_by_node=held, admitted_at=0.0, evicting=True)
        for key, held in sorted(leftovers.items())]
    running += (RunningGangs() if gangs is None else gangs).of(
        (job for job in jobs if job.phase in ACTIVE_PHASES), now)
    pending: list[PendingJob] = []
    for job in jobs:
        if job.phase in WAITING_PHASES:
            ends_by = _ends_by(job, now)
            pending.append(PendingJob(
                key=job.key, priority=job.priority, arrival=job.arrival, workers=job.workers,
                gpus_per_worker=job.gpus_per_worker, pool=job.pool,
                topology=TopologyRequest(level=job.topology_level,
                                         mode=job.topology_mode if job.topology_level else "preferred"),
                excluded_nodes=job.excluded_nodes,
                time_limit=None if ends_by is None else max(0.0, ends_by - now)))
    return node_snapshots, running, pending


def _ends_by(job: JobView, now: float) -> float | None:
    """When spec.activeDeadlineSeconds ends the job at the latest, if it were
    admitted at `now` and not before; None without a deadline."""
    if job.deadline_seconds is None:
        return None
    return (now if job.first_admitted_at is None else job.first_admitted_at) + job.deadline_seconds


def _per_node(nodes: Sequence[str], gpus_per_worker: int) -> dict[str, int]:
    held: dict[str, int] = {}
    for node in nodes:
        held[node] = held.get(node, 0) + gpus_per_worker
    return held


@dataclass(frozen=True)
class PoolFacts:
    """What a job's static checks need to know of one pool."""

    name: str
    gpu: str
    gpus_per_node: int
    nodes: int
    nodes_per_rack: int
    racks_per_block: int


@dataclass(frozen=True)
class JobShape:
    cluster: str
    pool: str | None
    gpu: str | None
    workers: int
    gpus_per_worker: int
    topology_level: TopologyLevel | None = None
    topology_mode: TopologyMode = "preferred"


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


def choose_pool(job: JobShape, cluster_exists: bool, pools: Sequence[PoolFacts]) -> PoolFacts | Problem:
    """The pool a job runs on, or why it can never run: checked against the
    pools' declared size so a job that could never fit fails at once with the
    field named, instead of waiting forever."""
    if not cluster_exists:
        return Problem("UnknownCluster", f"spec.cluster: TrainingCluster {job.cluster!r} does not exist")
    if job.pool is not None:
        matches = [p for p in pools if p.name == job.pool]
        if not matches:
            return Problem("UnknownPool", f"spec.pool: {job.cluster} has no pool {job.pool!r} "
                                          f"(pools: {', '.join(p.name for p in pools)})")
        if job.gpu is not None and matches[0].gpu != job.gpu:
            return Problem("GPUMismatch", f"spec.gpu: pool {job.pool} has {matches[0].gpu}, not {job.gpu}")
    else:
        matches = [p for p in pools if p.gpu == job.gpu]
        if not matches:
            return Problem("UnknownGPU", f"spec.gpu: {job.cluster} has no pool of {job.gpu}")
    pool = matches[0]
    if job.gpus_per_worker > pool.gpus_per_node:
        return Problem("TooManyGPUsPerWorker",
                       f"spec.gpusPerWorker={job.gpus_per_worker} but pool {pool.name} nodes have "
                       f"{pool.gpus_per_node} GPUs")
    workers_per_node = pool.gpus_per_node // job.gpus_per_worker
    capacity = pool.nodes * workers_per_node
    if job.workers > capacity:
        return Problem("LargerThanPool",
                       f"spec.workers={job.workers} x {job.gpus_per_worker} GPUs needs more than pool "
                       f"{pool.name} holds ({pool.nodes} nodes x {pool.gpus_per_node} GPUs)")
    if job.topology_mode == "required" and job.topology_level is not None:
        unit_nodes = pool.nodes_per_rack * (pool.racks_per_block if job.topology_level == "block" else 1)
        unit = min(unit_nodes, pool.nodes) * workers_per_node
        if job.workers > unit:
            return Problem("TopologyNeverFits",
                           f"spec.topology: {job.workers} workers x {job.gpus_per_worker} GPUs never fit one "
                           f"{job.topology_level} of pool {pool.name} ({min(unit_nodes, pool.nodes)} nodes); "
                           "use mode: preferred or a larger level")
    return pool
