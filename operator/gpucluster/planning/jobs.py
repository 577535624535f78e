"""A TrainingJob's life after admission, and the views the admission cycle
is built from. Pure: the handlers gather these views from Kopf indexes and
apply what the functions here decide.

Gang semantics: the workers of one attempt live and die together. One
failed worker, one lost pod, or one node of the gang going NotReady or
GPU-unhealthy restarts the whole gang (a new attempt, admitted afresh,
avoiding the nodes that failed), up to `maxRestarts`; then the job fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

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
    phase: Phase
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
    workers_ready: str = ""
    reason: str = ""

    @property
    def gpus(self) -> int:
        return self.workers * self.gpus_per_worker


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


def admission_inputs(
    jobs: Iterable[JobView],
    nodes: Iterable[ObservedNode],
    pods: Iterable[WorkerPod],
    products: Mapping[str, str],
    foreign_gpus: Mapping[str, int],
) -> tuple[list[NodeSnapshot], list[RunningGang], list[PendingJob]]:
    """The planner's snapshot.

    A job in an active phase holds the GPUs of its placement (its pods may not
    be in the index yet). A waiting job whose old pods still run is an
    evicting gang: those GPUs are not free until the pods are gone. GPUs that
    pods of no TrainingJob hold are taken off their node's allocatable, so the
    operator and the default scheduler never promise the same GPU twice.
    """
    snapshots = [
        NodeSnapshot(name=n.name, pool=n.pool, gpu_product=products.get(n.pool, ""),
                     allocatable_gpus=max(0, n.gpus - foreign_gpus.get(n.name, 0)),
                     block=n.block, rack=n.rack, schedulable=node_usable(n) and not n.draining)
        for n in nodes
    ]
    leftovers: dict[str, dict[str, int]] = {}
    for pod in pods:
        if pod.holds_gpus:
            held = leftovers.setdefault(pod.job_key, {})
            held[pod.node] = held.get(pod.node, 0) + pod.gpus
    running: list[RunningGang] = []
    pending: list[PendingJob] = []
    for job in jobs:
        if job.phase in ACTIVE_PHASES:
            running.append(RunningGang(
                key=job.key, priority=job.priority, pool=job.pool,
                gpus_by_node=_per_node(job.nodes, job.gpus_per_worker),
                admitted_at=job.first_admitted_at or 0.0))
        elif job.phase in WAITING_PHASES:
            if job.key in leftovers:
                running.append(RunningGang(key=job.key, priority=job.priority, pool=job.pool,
                                           gpus_by_node=leftovers[job.key], admitted_at=0.0,
                                           evicting=True))
            pending.append(PendingJob(
                key=job.key, priority=job.priority, arrival=job.arrival, workers=job.workers,
                gpus_per_worker=job.gpus_per_worker, pool=job.pool,
                topology=TopologyRequest(level=job.topology_level,
                                         mode=job.topology_mode if job.topology_level else "preferred"),
                excluded_nodes=job.excluded_nodes))
    return snapshots, running, pending


def _per_node(nodes: Sequence[str], gpus_per_worker: int) -> dict[str, int]:
    held: dict[str, int] = {}
    for node in nodes:
        held[node] = held.get(node, 0) + gpus_per_worker
    return held


class Action(StrEnum):
    NONE = "None"
    MARK_RUNNING = "MarkRunning"
    SUCCEED = "Succeed"
    RESTART = "Restart"
    FAIL = "Fail"


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str = ""
    message: str = ""
    exclude: frozenset[str] = field(default_factory=frozenset)
    workers_running: int = 0


def judge_gang(job: JobView, pods: Sequence[WorkerPod], nodes: Mapping[str, ObservedNode],
               now: float) -> Verdict:
    """What an admitted gang's pods and nodes say should happen to it now."""
    current = {p.rank: p for p in pods if p.attempt == job.attempt and not p.terminating}
    running = sum(1 for p in current.values() if p.phase == "Running")
    if job.deadline_seconds is not None and job.first_admitted_at is not None \
            and now - job.first_admitted_at > job.deadline_seconds:
        return Verdict(Action.FAIL, "DeadlineExceeded",
                       f"ran longer than spec.activeDeadlineSeconds={job.deadline_seconds}",
                       workers_running=running)
    failed = sorted((p for p in current.values() if p.phase == "Failed"), key=lambda p: p.rank)
    if failed:
        first = failed[0]
        detail = f"exit code {first.exit_code}" if first.exit_code is not None else first.reason or "failed"
        return _restart_or_fail(job, "WorkerFailed",
                                f"rank {first.rank} ({first.name} on {first.node}) {detail}",
                                frozenset(p.node for p in failed), running)
    broken = sorted({n for n in job.nodes if not _node_fine(nodes.get(n))})
    if broken:
        node = nodes.get(broken[0])
        why = "is gone" if node is None else "is NotReady" if not node.ready else "has unhealthy GPUs"
        return _restart_or_fail(job, "NodeFailed", f"node {broken[0]} {why}", frozenset(broken), running)
    if all(current.get(r) is not None and current[r].phase == "Succeeded" for r in range(job.workers)):
        return Verdict(Action.SUCCEED, "AllWorkersSucceeded", f"all {job.workers} workers exited 0",
                       workers_running=0)
    if job.phase == Phase.RUNNING:
        missing = [r for r in range(job.workers) if r not in current]
        if missing:
            return _restart_or_fail(job, "WorkerLost", f"the pod of rank {missing[0]} is gone",
                                    frozenset(), running)
    if job.phase == Phase.ADMITTED and running == job.workers:
        return Verdict(Action.MARK_RUNNING, "AllWorkersRunning", f"{running} workers running",
                       workers_running=running)
    return Verdict(Action.NONE, workers_running=running)


def _node_fine(node: ObservedNode | None) -> bool:
    return node is not None and node.ready and node.gpu_healthy


def _restart_or_fail(job: JobView, reason: str, message: str, exclude: frozenset[str],
                     running: int) -> Verdict:
    if job.restarts >= job.max_restarts:
        return Verdict(Action.FAIL, "MaxRestartsExceeded",
                       f"{message}; {job.restarts} of spec.maxRestarts={job.max_restarts} restarts used",
                       workers_running=running)
    return Verdict(Action.RESTART, reason, message, exclude, running)


def torchrun_env(job_name: str, namespace: str, rank: int, workers: int, gpus_per_worker: int,
                 port: int) -> list[dict[str, str]]:
    """The rendezvous environment of one worker, in both spellings torchrun
    reads (plain and PET_*). MASTER_ADDR is rank 0's stable DNS name through
    the job's headless Service."""
    master = f"{job_name}-0.{job_name}.{namespace}.svc"
    values = {
        "MASTER_ADDR": master,
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(workers * gpus_per_worker),
        "NNODES": str(workers),
        "NODE_RANK": str(rank),
        "NPROC_PER_NODE": str(gpus_per_worker),
        "PET_MASTER_ADDR": master,
        "PET_MASTER_PORT": str(port),
        "PET_NNODES": str(workers),
        "PET_NODE_RANK": str(rank),
        "PET_NPROC_PER_NODE": str(gpus_per_worker),
    }
    return [{"name": k, "value": v} for k, v in values.items()]


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
