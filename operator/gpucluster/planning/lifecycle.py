"""A TrainingJob's lifecycle: one pure state machine.

`step(job, observation, now)` is the only place a job changes phase. It takes
the job as the operator last saw or decided it and one observation, and
returns a `Transition`: the status fields to write, the condition, the Event,
the pods to create or delete, and the view to assume until the index shows
the write. `admission_cycle` runs one cycle of a cluster through it: judge
every gang, plan admissions on what that leaves, and step every job the plan
touched. The handlers read the indexes, call these, and apply the result.

    (new) --judged ok--> Queued --admit--> Admitted --all running--> Running
    (new) --judged bad--> Failed              |  (any phase below from both)
    Queued --never fits a whole pool--> Failed
    Admitted/Running --worker failed, node gone, fatal GPU fault, node down
        past the grace--> Restarting (attempt+1) --admit--> Admitted ...
    Admitted/Running --restarts used up, deadline--> Failed
    Admitted/Running --preempted--> Queued (attempt+1)
    Admitted/Running --all workers exit 0--> Succeeded
    Admitted/Running --edit judged bad or moved to another pool--> the gang
        ends first (pods deleted), then Failed or Queued
    Failed (a reason an edit can cure) --edit judged ok--> Queued
    deleted --> its pods are deleted (see Cycle.orphans)

No GPU is promised twice: a transition that ends a gang deletes its pods,
and until they are gone their GPUs count as held (planning.jobs.
admission_inputs), whatever became of the job.

Node failures. A node deleted, or a fatal GPU fault, ends the gang at once:
the node will not come back as it was. A node NotReady or Unknown, or a
transient GPU fault, gets `spec.nodeFailureGraceSeconds` (default 60) from
the condition's lastTransitionTime first: kubelets miss heartbeats and GPUs
report transient faults routinely at scale, and a restart throws away the
gang's progress since its last checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from gpucluster.planning.conditions import ConditionUpdate
from gpucluster.planning.health import reason_is_fatal
from gpucluster.planning.hostlist import hostlist
from gpucluster.planning.jobs import (
    ACTIVE_PHASES,
    FINISHED_PHASES,
    WAITING_PHASES,
    JobView,
    NodeSnapshots,
    Phase,
    Problem,
    RunningGangs,
    WorkerPod,
    admission_inputs,
)
from gpucluster.planning.pools import ObservedNode
from gpucluster.planning.scheduling import (
    AdmissionPlan,
    CapacityCache,
    NodeSnapshot,
    PendingJob,
    RunningGang,
    plan_admissions,
)
from gpucluster.timestamps import rfc3339

# Reasons of a Failed phase that an edit of the spec can cure.
FIXABLE_REASONS = frozenset({"UnknownCluster", "UnknownPool", "UnknownGPU", "GPUMismatch",
                             "TooManyGPUsPerWorker", "LargerThanPool", "TopologyNeverFits",
                             "UnknownPriorityClass", "Unschedulable"})

# How long a decision is trusted over an index that does not show it yet,
# before the index wins (a write someone else undid before we saw it).
ASSUMED_TTL_S = 60.0


# --- observations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecJudged:
    """The spec, new or edited, checked against its cluster: the pool and
    effective priority it gets, or why it can't run."""

    outcome: tuple[str, int] | Problem
    workers: int
    gpus_per_worker: int
    generation: int


@dataclass(frozen=True)
class GangObserved:
    """The job's pods (every attempt) and the nodes of the cluster."""

    pods: Sequence[WorkerPod]
    nodes: Mapping[str, ObservedNode]


@dataclass(frozen=True)
class Admit:
    nodes: tuple[str, ...]  # one per rank, rank 0 first


@dataclass(frozen=True)
class Preempt:
    preemptor: str


@dataclass(frozen=True)
class Preempting:
    victims: tuple[str, ...]


@dataclass(frozen=True)
class Unplaceable:
    why: str
    pool_complete: bool  # False while the pool is still growing to its size


@dataclass(frozen=True)
class QueuePosition:
    position: int
    starts_by: float | None = None  # the head's start bound, from run-time limits


Observation = SpecJudged | GangObserved | Admit | Preempt | Preempting | Unplaceable | QueuePosition


# --- transitions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    """An Event about the job."""

    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class Transition:
    """What one step decided. Applied in this order: delete the gang's pods,
    create the new attempt's pods, write the status (with the condition),
    post the Event, assume the view."""

    status: Mapping[str, Any] = field(default_factory=dict)
    condition: ConditionUpdate | None = None
    note: Note | None = None
    delete_pods: bool = False
    create_pods: tuple[str, ...] = ()
    assume: JobView | None = None
    # For the metrics: why the gang restarted, that it was preempted, how
    # long the admitted attempt waited.
    restart_reason: str = ""
    preempted: bool = False
    waited_s: float | None = None

    @property
    def empty(self) -> bool:
        return self == NOTHING


NOTHING = Transition()


def step(job: JobView, observation: Observation, now: float) -> Transition:
    """The one transition function of a TrainingJob."""
    match observation:
        case SpecJudged():
            return _judged(job, observation, now)
        case GangObserved():
            return _observed(job, observation, now)
        case Admit(nodes):
            return _admit(job, nodes, now)
        case Preempt(preemptor):
            if job.phase not in ACTIVE_PHASES:
                return NOTHING
            message = f"preempted to admit higher-priority job {preemptor}"
            return dataclasses.replace(
                _requeue(job, Phase.QUEUED, ConditionUpdate("Admitted", False, "Preempted", message), now,
                         restarts=job.restarts, excluded=job.excluded_nodes),
                note=Note("Preempted", message, warning=True), preempted=True)
        case Preempting(victims):
            return Transition(note=Note("Preempting", f"evicting {', '.join(victims)} to make room"))
        case Unplaceable(why, pool_complete):
            return _unplaceable(job, why, pool_complete, now)
        case QueuePosition(position, starts_by):
            stamp = "" if starts_by is None else _stamp(starts_by)
            if job.phase not in WAITING_PHASES or (job.queue_position, job.starts_by) == (position, stamp):
                return NOTHING
            return Transition(status={"queuePosition": position, "startsBy": stamp or None},
                              assume=dataclasses.replace(job, queue_position=position, starts_by=stamp))
    raise TypeError(f"not an observation: {observation!r}")


def _status_fields(job: JobView, phase: Phase, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"phase": phase.value, "reason": reason, "message": message, **extra}


def _fail(job: JobView, reason: str, message: str, now: float, *, delete_pods: bool,
          condition: ConditionUpdate, **extra: Any) -> Transition:
    return Transition(
        status=_status_fields(job, Phase.FAILED, reason, message, completedAt=_stamp(now), gpus=0,
                              workersReady=f"0/{job.workers}", queuePosition=0, startsBy=None, **extra),
        condition=condition, note=Note(reason, message, warning=True), delete_pods=delete_pods,
        assume=dataclasses.replace(job, phase=Phase.FAILED, reason=reason, message=message, queue_position=0,
                                   starts_by=""))


def _requeue(job: JobView, phase: Phase, condition: ConditionUpdate, now: float, *, restarts: int,
             excluded: frozenset[str], pool: str | None = None, priority: int | None = None,
             **extra: Any) -> Transition:
    """Ends the gang's current attempt (its pods are deleted) and puts the
    job back in its queue; the attempt moves on by one."""
    pool = job.pool if pool is None else pool
    priority = job.priority if priority is None else priority
    attempt = job.attempt + 1
    return Transition(
        status=_status_fields(job, phase, condition.reason, condition.message, attempt=attempt,
                              restarts=restarts, nodes=[], nodeList="", excludedNodes=sorted(excluded),
                              workersReady=f"0/{job.workers}", gpus=0, queuedAt=_stamp(now),
                              pool=pool, priority=priority, **extra),
        condition=condition, delete_pods=True,
        assume=dataclasses.replace(job, phase=phase, attempt=attempt, restarts=restarts, nodes=(),
                                   excluded_nodes=excluded, pool=pool, priority=priority,
                                   reason=condition.reason, message=condition.message, queued_at=now))


# --- submission and edits -----------------------------------------------------------------------


def _judged(job: JobView, judged: SpecJudged, now: float) -> Transition:
    generation = {"observedGeneration": judged.generation}
    if job.phase == Phase.SUCCEEDED or (job.phase == Phase.FAILED and job.reason not in FIXABLE_REASONS):
        return NOTHING
    if isinstance(judged.outcome, Problem):
        problem = judged.outcome
        if job.phase in ACTIVE_PHASES:
            message = f"{problem.message}; the edit ended the running gang"
        else:
            message = problem.message
        return _fail(job, problem.reason, message, now,
                     delete_pods=job.phase in ACTIVE_PHASES or job.phase == Phase.RESTARTING,
                     condition=ConditionUpdate("Admitted", False, problem.reason, message), **generation)
    pool, priority = judged.outcome
    waiting_message = f"waiting for {judged.workers} x {judged.gpus_per_worker} GPUs in pool {pool}"
    if job.phase is None or job.phase == Phase.FAILED:
        # A failed job queued again starts a new attempt: pods of the one that
        # failed may still be terminating, and pods are told apart (and named)
        # by their attempt.
        attempt = job.attempt + 1 if job.phase == Phase.FAILED else job.attempt
        return Transition(
            status=_status_fields(job, Phase.QUEUED, "Queued", waiting_message, pool=pool, priority=priority,
                                  completedAt="", gpus=0, workersReady=f"0/{judged.workers}", attempt=attempt,
                                  nodes=[], nodeList="", queuedAt=_stamp(now), **generation),
            condition=ConditionUpdate("Admitted", False, "Queued", "waiting for GPUs"),
            note=Note("Queued", f"queued in pool {pool} at priority {priority}"),
            assume=dataclasses.replace(job, phase=Phase.QUEUED, pool=pool, priority=priority, attempt=attempt,
                                       nodes=(), reason="Queued", message=waiting_message, queued_at=now))
    if job.phase in ACTIVE_PHASES and pool != job.pool:
        # The gang's nodes are of the old pool: end it before the job is
        # judged anew (the API server refuses such edits while admitted; this
        # is the operator's own guard).
        message = f"spec moved the job to pool {pool}; the running gang ended"
        return dataclasses.replace(
            _requeue(job, Phase.QUEUED, ConditionUpdate("Admitted", False, "SpecChanged", message), now,
                     restarts=job.restarts, excluded=frozenset(), pool=pool, priority=priority, **generation),
            note=Note("SpecChanged", message, warning=True))
    if (pool, priority) == (job.pool, job.priority):
        return Transition(status=generation)
    fields: dict[str, Any] = {"pool": pool, "priority": priority, **generation}
    if job.phase in WAITING_PHASES:
        fields["message"] = waiting_message
    return Transition(status=fields, note=Note("SpecChanged", f"now in pool {pool} at priority {priority}"),
                      assume=dataclasses.replace(job, pool=pool, priority=priority))


# --- admitted gangs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _NodeTrouble:
    node: str
    why: str
    fails_at: float  # when the gang restarts without it unless it recovers


def _node_trouble(name: str, node: ObservedNode | None, grace: float) -> _NodeTrouble | None:
    if node is None:
        return _NodeTrouble(name, "is gone", float("-inf"))
    if node.gpu_fault and reason_is_fatal(node.gpu_fault):
        return _NodeTrouble(name, f"has a fatal GPU fault ({node.gpu_fault})", float("-inf"))
    if not node.ready:
        since = node.not_ready_since
        return _NodeTrouble(name, "is NotReady", float("-inf") if since is None else since + grace)
    if node.gpu_fault:
        since = node.gpu_fault_since
        return _NodeTrouble(name, f"has a GPU fault ({node.gpu_fault})",
                            float("-inf") if since is None else since + grace)
    if not node.gpu_healthy:
        return _NodeTrouble(name, "has unhealthy GPUs", float("-inf"))
    return None


def _observed(job: JobView, seen: GangObserved, now: float) -> Transition:
    current = {p.rank: p for p in seen.pods if p.attempt == job.attempt and not p.terminating}
    running = sum(1 for p in current.values() if p.phase == "Running")
    ready = f"{running}/{job.workers}"
    # Every rank exited 0: Succeeded, even when this is first seen after the
    # deadline (the workers ended; the deadline is for gangs still running).
    if job.phase in ACTIVE_PHASES and all(current.get(r) is not None and current[r].phase == "Succeeded"
                                          for r in range(job.workers)):
        message = f"all {job.workers} workers exited 0"
        return Transition(
            status=_status_fields(job, Phase.SUCCEEDED, "AllWorkersSucceeded", message,
                                  completedAt=_stamp(now), workersReady=ready, gpus=0),
            condition=ConditionUpdate("Finished", True, "Succeeded", message), note=Note("Succeeded", message),
            assume=dataclasses.replace(job, phase=Phase.SUCCEEDED, reason="AllWorkersSucceeded"))
    if job.deadline_seconds is not None and job.first_admitted_at is not None \
            and now - job.first_admitted_at > job.deadline_seconds and job.phase not in FINISHED_PHASES \
            and job.phase is not None:
        return _fail(job, "DeadlineExceeded", f"ran longer than spec.activeDeadlineSeconds={job.deadline_seconds}",
                     now, delete_pods=True, condition=ConditionUpdate("Finished", True, "Failed", "DeadlineExceeded"))
    if job.phase not in ACTIVE_PHASES:
        return NOTHING
    failed = sorted((p for p in current.values() if p.phase == "Failed"), key=lambda p: p.rank)
    if failed:
        first = failed[0]
        detail = f"exit code {first.exit_code}" if first.exit_code is not None else first.reason or "failed"
        return _restart_or_fail(job, "WorkerFailed", f"rank {first.rank} ({first.name} on {first.node}) {detail}",
                                frozenset(p.node for p in failed), now)
    troubles = [t for t in (_node_trouble(n, seen.nodes.get(n), job.node_failure_grace_s)
                            for n in sorted(set(job.nodes))) if t is not None]
    failing = [t for t in troubles if t.fails_at <= now]
    if failing:
        return _restart_or_fail(job, "NodeFailed", f"node {failing[0].node} {failing[0].why}",
                                frozenset(t.node for t in failing), now)
    if job.phase == Phase.RUNNING:
        missing = [r for r in range(job.workers) if r not in current]
        if missing:
            return _restart_or_fail(job, "WorkerLost", f"the pod of rank {missing[0]} is gone", frozenset(), now)
    if troubles:
        soonest = min(troubles, key=lambda t: t.fails_at)
        message = (f"node {soonest.node} {soonest.why}; the gang restarts without it at {_stamp(soonest.fails_at)} "
                   "unless it recovers (spec.nodeFailureGraceSeconds)")
        if (job.reason, job.message, job.workers_ready) == ("NodeUnready", message, ready):
            return NOTHING
        return Transition(status={"reason": "NodeUnready", "message": message, "workersReady": ready},
                          note=Note("NodeUnready", message, warning=True) if job.reason != "NodeUnready" else None,
                          assume=dataclasses.replace(job, reason="NodeUnready", message=message, workers_ready=ready))
    if job.phase == Phase.ADMITTED and running == job.workers:
        message = f"{running} workers running"
        return Transition(
            status=_status_fields(job, Phase.RUNNING, "AllWorkersRunning", message, workersReady=ready),
            condition=ConditionUpdate("Running", True, "AllWorkersRunning", message),
            note=Note("Running", f"all {job.workers} workers running"),
            assume=dataclasses.replace(job, phase=Phase.RUNNING, reason="AllWorkersRunning", message=message,
                                       workers_ready=ready))
    if job.phase == Phase.RUNNING and job.reason == "NodeUnready":
        message = f"{running} workers running"
        return Transition(status={"reason": "AllWorkersRunning", "message": message, "workersReady": ready},
                          note=Note("NodeRecovered", "every node of the gang is Ready and healthy again"),
                          assume=dataclasses.replace(job, reason="AllWorkersRunning", message=message,
                                                     workers_ready=ready))
    if ready != job.workers_ready:
        return Transition(status={"workersReady": ready}, assume=dataclasses.replace(job, workers_ready=ready))
    return NOTHING


def _restart_or_fail(job: JobView, reason: str, message: str, exclude: frozenset[str], now: float) -> Transition:
    if job.restarts >= job.max_restarts:
        message = f"{message}; {job.restarts} of spec.maxRestarts={job.max_restarts} restarts used"
        return _fail(job, "MaxRestartsExceeded", message, now, delete_pods=True,
                     condition=ConditionUpdate("Finished", True, "Failed", f"MaxRestartsExceeded: {message}"))
    excluded = job.excluded_nodes | exclude
    note = (f"{message}: restarting all {job.workers} workers (restart {job.restarts + 1} of {job.max_restarts})"
            + (f", avoiding {', '.join(sorted(exclude))}" if exclude else ""))
    return dataclasses.replace(
        _requeue(job, Phase.RESTARTING, ConditionUpdate("Running", False, reason, message), now,
                 restarts=job.restarts + 1, excluded=excluded),
        note=Note("GangRestart", note, warning=True), restart_reason=reason)


def _admit(job: JobView, nodes: tuple[str, ...], now: float) -> Transition:
    if job.phase not in WAITING_PHASES:
        return NOTHING
    distinct = list(dict.fromkeys(nodes))
    message = f"{job.workers} workers x {job.gpus_per_worker} GPUs on {len(distinct)} nodes"
    first = job.first_admitted_at if job.first_admitted_at is not None else now
    return Transition(
        status=_status_fields(job, Phase.ADMITTED, "Admitted", message, nodes=list(nodes),
                              nodeList=hostlist(nodes), admittedAt=_stamp(now),
                              firstAdmittedAt=_stamp(first), queuePosition=0, startsBy=None, gpus=job.gpus,
                              workersReady=f"0/{job.workers}"),
        condition=ConditionUpdate("Admitted", True, "Admitted", message),
        note=Note("Admitted", f"{message}: {', '.join(distinct[:8])}" + (" ..." if len(distinct) > 8 else "")),
        create_pods=nodes,
        assume=dataclasses.replace(job, phase=Phase.ADMITTED, nodes=nodes, first_admitted_at=first,
                                   queue_position=0, starts_by="", reason="Admitted", message=message,
                                   workers_ready=f"0/{job.workers}"),
        waited_s=max(0.0, now - (job.queued_at if job.queued_at is not None else job.arrival)))


def _unplaceable(job: JobView, why: str, pool_complete: bool, now: float) -> Transition:
    if job.phase not in WAITING_PHASES:
        return NOTHING
    if not pool_complete:
        # The pool is still growing: "never fits" is not final until it is whole.
        message = f"waiting for pool {job.pool} to reach its size: {why}"
        if (job.reason, job.message) == ("WaitingForNodes", message):
            return NOTHING
        return Transition(status={"reason": "WaitingForNodes", "message": message},
                          assume=dataclasses.replace(job, reason="WaitingForNodes", message=message))
    return _fail(job, "Unschedulable", why, now, delete_pods=False,
                 condition=ConditionUpdate("Admitted", False, "Unschedulable", why))


# --- one cycle of a cluster ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterFacts:
    """What one admission cycle of a cluster reads."""

    nodes: Mapping[str, ObservedNode]  # by name
    # Worker pods by job key: every job of the cluster, and jobs that are
    # gone but whose pods are still on the cluster's nodes.
    pods: Mapping[str, Sequence[WorkerPod]]
    products: Mapping[str, str]  # pool -> GPU product
    desired_nodes: Mapping[str, int]  # pool -> spec.pools[].nodes
    foreign_gpus: Mapping[str, int] = field(default_factory=dict)  # node -> GPUs held by other pods


@dataclass(frozen=True)
class Cycle:
    transitions: tuple[tuple[JobView, Transition], ...]
    plan: AdmissionPlan | None
    # Jobs that are gone (deleted) but whose pods still hold GPUs on the
    # cluster's nodes: their pods are deleted now rather than whenever the
    # garbage collector gets to them, and count as held until then.
    orphans: tuple[str, ...] = ()
    # The fingerprint of the planner's inputs (planner_inputs), when it ran or was skipped.
    inputs: int | None = None


@dataclass
class PlannerCache:
    """What the admission cycles of one cluster carry from one to the next,
    so that a cycle at 25,000 nodes costs its decisions rather than building
    the same node snapshots and capacity indexes again. Owned by the caller
    (the simulator; the operator keeps one per TrainingCluster in its
    state) and given to one cycle at a time. A plan with it is the plan
    without it."""

    nodes: NodeSnapshots = field(default_factory=NodeSnapshots)
    gangs: RunningGangs = field(default_factory=RunningGangs)
    capacity: CapacityCache = field(default_factory=CapacityCache)


# A policy that stands in for `plan_admissions` (the simulator's baselines):
# the cycle's node snapshots, running gangs, pending jobs and `now` in, a
# plan out. The lifecycle applies its admissions, preemptions and queue
# positions as it applies the planner's.
Planner = Callable[[list[NodeSnapshot], list[RunningGang], list[PendingJob], float], AdmissionPlan]

_key = attrgetter("key")
_fingerprint = attrgetter("fingerprint")


def planner_inputs(views: Iterable[JobView], facts: ClusterFacts) -> int:
    """A fingerprint of what a plan is made from: the jobs, the nodes (as
    the index sees them: heartbeats do not change them), GPUs held by other
    pods, and the worker pods of each job, counted."""
    return hash((tuple(map(_fingerprint, sorted(views, key=_key))), tuple(map(_fingerprint, facts.nodes.values())),
                 frozenset(facts.foreign_gpus.items()),
                 frozenset((key, len(pods), sum(p.terminating for p in pods)) for key, pods in facts.pods.items())))


def admission_cycle(jobs: Iterable[JobView], facts: ClusterFacts, now: float,
                    judge: Collection[str] | None = None, unchanged_since: int | None = None,
                    cache: PlannerCache | None = None, planner: Planner | None = None,
                    clock: Callable[[], float] | None = None) -> Cycle:
    """One cycle: judge every gang, then plan admissions over what that left
    and step each job the plan touched. Decisions of the first half are
    assumed by the second, as their writes will be. `judge` limits the
    judging to those job keys (the simulator knows which jobs' pods, nodes
    or clocks changed; the operator judges all). When judging changed
    nothing and the planner's inputs have the fingerprint
    `unchanged_since`, the plan would be the last one again: it is skipped
    (at 25,000 nodes a plan costs tens of milliseconds with `cache`,
    more than half a second without). `cache`
    carries the planner's snapshots and indexes over between the cycles of
    one cluster. `planner` replaces `plan_admissions` (the simulator's
    baselines); None, the operator's planner. `clock` times each job's
    decision of the operator's planner (AdmissionPlan.decision_seconds)."""
    views = {v.key: v for v in jobs}
    transitions: list[tuple[JobView, Transition]] = []

    def apply(view: JobView, transition: Transition) -> None:
        if transition.empty:
            return
        transitions.append((view, transition))
        if transition.assume is not None:
            views[view.key] = transition.assume

    orphans = tuple(sorted(key for key, pods in facts.pods.items()
                           if key not in views and any(p.holds_gpus and not p.terminating for p in pods)))
    for view in list(views.values()) if judge is None else [views[k] for k in judge if k in views]:
        apply(view, step(view, GangObserved(facts.pods.get(view.key, ()), facts.nodes), now))
    if not any(v.phase in WAITING_PHASES for v in views.values()):
        return Cycle(tuple(transitions), None, orphans)
    inputs = planner_inputs(views.values(), facts)
    if not transitions and inputs == unchanged_since:
        return Cycle((), None, orphans, inputs)
    pods = [p for ps in facts.pods.values() for p in ps]
    snapshot_nodes, running, pending = admission_inputs(
        views.values(), facts.nodes.values(), pods, facts.products, facts.foreign_gpus, now,
        None if cache is None else cache.nodes, None if cache is None else cache.gangs)
    if planner is None:
        plan = plan_admissions(snapshot_nodes, running, pending, now=now,
                               cache=None if cache is None else cache.capacity, clock=clock)
    else:
        plan = planner(snapshot_nodes, running, pending, now)
    victims_of: dict[str, list[str]] = {}
    for preemption in plan.preemptions:
        apply(views[preemption.victim], step(views[preemption.victim], Preempt(preemption.preemptor), now))
        victims_of.setdefault(preemption.preemptor, []).append(preemption.victim)
    for preemptor, victims in victims_of.items():
        apply(views[preemptor], step(views[preemptor], Preempting(tuple(victims)), now))
    for key, placement in plan.admissions.items():
        apply(views[key], step(views[key], Admit(placement), now))
    present = Counter(node.pool for node in facts.nodes.values()) if plan.unschedulable else Counter()
    for key, why in plan.unschedulable.items():
        view = views[key]
        complete = present.get(view.pool, 0) >= facts.desired_nodes.get(view.pool, 0)
        apply(view, step(view, Unplaceable(why, complete), now))
    for key, position in plan.queue_positions.items():
        apply(views[key], step(views[key], QueuePosition(position, plan.starts_by.get(key)), now))
    return Cycle(tuple(transitions), plan, orphans, inputs)


# --- what the index shows, and what was decided -------------------------------------------------


@dataclass(frozen=True)
class Assumed:
    view: JobView
    at: float


def _lifecycle_fields(view: JobView) -> tuple[Any, ...]:
    return (view.phase, view.attempt, view.pool, view.priority, view.nodes, view.restarts)


def overlay_assumed(indexed: Iterable[JobView], assumed: Mapping[str, Assumed], now: float,
                    ttl: float = ASSUMED_TTL_S) -> tuple[list[JobView], dict[str, Assumed]]:
    """The index's views with this process's newer decisions in their place,
    and the decisions still worth remembering: a decision is dropped once the
    index shows it, when its job left the index, or after `ttl`."""
    views: list[JobView] = []
    kept: dict[str, Assumed] = {}
    for view in indexed:
        decided = assumed.get(view.key)
        if decided is not None and now - decided.at < ttl \
                and _lifecycle_fields(view) != _lifecycle_fields(decided.view):
            kept[view.key] = decided
            view = decided.view
        views.append(view)
    return views, kept


def _stamp(epoch: float) -> str:
    return rfc3339(epoch)
