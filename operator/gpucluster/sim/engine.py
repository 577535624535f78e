"""`gpucluster simulate`'s engine: a job trace replayed through the
production lifecycle and planner on a simulated clock.

The world is a TrainingCluster's nodes (named and placed in racks and blocks
as the operator would make them), the trace's jobs, and worker pods that run
for the job's run time. Every `cycle_s` simulated seconds (or at the next
event, when nothing is happening) it runs `planning.lifecycle.
admission_cycle` -- the very function the operator runs each second -- and
applies its transitions to the world as the handlers apply them to the API
server: pods created run at once, a restart loses the work since the last
checkpoint, a deleted pod frees its GPUs at once.

Failures are drawn as Poisson processes per GPU-hour over the GPUs in
service: a fatal fault (the lifecycle restarts the gang at once; the node is
out until repaired, at most the pool's `remediation.maxUnavailable` nodes in
repair at a time, the rest wait) and a transient NotReady of a random length
(the gang restarts only if it outlasts the job's grace). A job past its
run-time limit (`activeDeadlineSeconds`) is Failed by the lifecycle at its
next cycle. Deterministic for a given seed.

`planner` stands in for `plan_admissions` (a baseline policy to compare
with); everything else -- the clock, arrivals, ends, faults, accounting --
is the same. `run(until=...)` stops at a horizon with jobs still queued or
running, and the report measures utilisation over any window of the run.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpucluster.api import cluster as cluster_api
from gpucluster.api.job import DEFAULT_NODE_FAILURE_GRACE_S
from gpucluster.planning.health import REASON_GPU_LOST
from gpucluster.planning.jobs import (
    ACTIVE_PHASES,
    WAITING_PHASES,
    JobShape,
    JobView,
    Phase,
    Problem,
    WorkerPod,
    choose_pool,
)
from gpucluster.planning.lifecycle import (
    ClusterFacts,
    Planner,
    PlannerCache,
    SpecJudged,
    Transition,
    admission_cycle,
    step,
)
from gpucluster.planning.pools import ObservedNode, PoolProvider, PoolShape, plan_pool
from gpucluster.planning.remediation import RemediationBudget
from gpucluster.sim.trace import TraceJob

HOUR = 3600.0


@dataclass(frozen=True)
class Failures:
    fatal_per_gpu_hour: float = 0.0
    transient_per_gpu_hour: float = 0.0
    transient_mean_s: float = 30.0  # how long a transient NotReady lasts, on average
    repair_s: float = 4 * HOUR  # a fatal node's time out of service once its repair starts
    checkpoint_s: float = 1800.0  # a restart loses the work since the last checkpoint


@dataclass
class JobRecord:
    trace: TraceJob
    pool: str = ""
    rejected: str = ""  # why it failed before it ever ran
    failed_reason: str = ""  # why it failed, at whatever point
    first_admitted: float | None = None
    finished: float | None = None
    phase: str = ""
    saved_work: float = 0.0  # run time checkpointed over earlier attempts
    attempt_started: float | None = None
    exited: float | None = None  # when the current attempt's workers all exited 0
    placements: list[tuple[str, ...]] = field(default_factory=list)
    # Each attempt's pods, from their creation to their exit or deletion.
    runs: list[tuple[float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    at: float
    allocated_gpus: int
    queued_jobs: int
    gpus_in_service: int


@dataclass
class Report:
    jobs: list[JobRecord]
    samples: list[Sample]
    total_gpus: int
    makespan: float
    cycles: int
    end: float = 0.0  # the last completion, or the horizon the run stopped at
    preemptions: int = 0
    restarts: int = 0
    restarts_by_reason: dict[str, int] = field(default_factory=dict)
    gpu_hours_lost: float = 0.0
    fatal_faults: int = 0
    transient_faults: int = 0
    repairs_waited: int = 0
    topology_required: int = 0
    topology_kept: int = 0

    @property
    def completed(self) -> int:
        return sum(1 for j in self.jobs if j.phase == Phase.SUCCEEDED)

    @property
    def started(self) -> int:
        """Jobs admitted at least once."""
        return sum(1 for j in self.jobs if j.first_admitted is not None)

    @property
    def utilisation(self) -> float:
        """Allocated GPU-time over all GPU-time from the first arrival to the
        end (the last completion, or the horizon)."""
        return self.utilisation_between(self.end - self.makespan, self.end)

    def utilisation_between(self, start: float, end: float) -> float:
        """GPU-time held by running gangs between `start` and `end` (a
        warm-up on, say) over all GPU-time there. A gang holds its GPUs
        from its pods' creation to their exit or deletion: a gang that ends
        between two cycles stops counting when it ends, not at the cycle
        that frees its GPUs for admission (the operator's cycle is a second;
        the simulated one may be minutes)."""
        if end <= start:
            return 0.0
        used = 0.0
        for job in self.jobs:
            runs = job.runs if job.attempt_started is None else \
                [*job.runs, (job.attempt_started, self.end if job.exited is None else job.exited)]
            for began, ended in runs:
                if ended > start and began < end:
                    used += job.trace.gpus * (min(ended, end) - max(began, start))
        return used / (self.total_gpus * (end - start))

    def wait(self, job: JobRecord) -> tuple[float, bool] | None:
        """How long `job` waited for its first admission; a job never
        admitted (and not rejected) waits until the end of the run, and
        True says it still waits. None for a rejected job."""
        if job.first_admitted is not None:
            return job.first_admitted - job.trace.arrival, False
        if job.rejected:
            return None
        return self.end - job.trace.arrival, True

    @property
    def topology_broken(self) -> int:
        """Jobs with a required topology level that a placement of theirs broke."""
        return self.topology_required - self.topology_kept

    def waits_by_size(self) -> dict[int, list[float]]:
        waits: dict[int, list[float]] = defaultdict(list)
        for job in self.jobs:
            if job.first_admitted is not None:
                waits[job.trace.gpus].append(job.first_admitted - job.trace.arrival)
        return dict(sorted(waits.items()))


class Simulation:
    def __init__(self, cluster: cluster_api.TrainingClusterSpec, trace: Sequence[TraceJob], *,
                 failures: Failures = Failures(), seed: int = 0, cycle_s: float = 60.0,
                 grace_s: float = DEFAULT_NODE_FAILURE_GRACE_S, name: str = "sim",
                 planner: Planner | None = None) -> None:
        self.name = name
        self.planner = planner
        self.trace = sorted(trace, key=lambda j: (j.arrival, j.id))
        self.failures = failures
        self.rng = random.Random(seed)
        self.cycle_s = cycle_s
        self.grace_s = grace_s
        self.pools = cluster.pools
        self.pool_facts = [p.facts() for p in cluster.pools]
        self.nodes: dict[str, ObservedNode] = {}
        for pool in cluster.pools:
            shape = PoolShape(cluster=name, name=pool.name, provider=PoolProvider.KWOK, desired_nodes=pool.nodes,
                              gpus_per_node=pool.gpusPerNode, nodes_per_rack=pool.topology.nodesPerRack,
                              racks_per_block=pool.topology.racksPerBlock)
            for node in plan_pool(shape, []).create:
                self.nodes[node.name] = ObservedNode(name=node.name, pool=pool.name, ordinal=node.ordinal,
                                                     gpus=pool.gpusPerNode, block=node.block, rack=node.rack)
        self.total_gpus = sum(n.gpus for n in self.nodes.values())
        self.gpus_in_service = sum(map(_gpus_in_service, self.nodes.values()))
        self.node_names = sorted(self.nodes)
        self.views: dict[str, JobView] = {}
        self.records: dict[str, JobRecord] = {}
        self.pods: dict[str, tuple[WorkerPod, ...]] = {}
        self.jobs_on_node: dict[str, set[str]] = defaultdict(set)
        self.dirty: set[str] = set()
        self.events: list[tuple[float, int, str, str]] = []  # (time, order, kind, subject)
        self.sequence = 0
        self.in_repair: dict[str, int] = defaultdict(int)  # pool -> nodes being repaired
        self.repair_queue: dict[str, list[str]] = defaultdict(list)
        self.report = Report(jobs=[], samples=[], total_gpus=self.total_gpus, makespan=0.0, cycles=0)
        self.planner_cache = PlannerCache()

    # --- events ---

    def _at(self, when: float, kind: str, subject: str = "") -> None:
        self.sequence += 1
        heapq.heappush(self.events, (when, self.sequence, kind, subject))

    def _next_fault(self, now: float, kind: str, rate_per_gpu_hour: float) -> None:
        if rate_per_gpu_hour > 0:
            self._at(now + self.rng.expovariate(rate_per_gpu_hour * self.total_gpus / HOUR), kind)

    def _touch_node(self, name: str) -> None:
        self.dirty.update(self.jobs_on_node.get(name, ()))

    def _arrive(self, job: TraceJob, now: float) -> None:
        key = f"trace/{job.id}"
        record = JobRecord(job)
        self.records[key] = record
        self.report.jobs.append(record)
        view = JobView(key=key, namespace="trace", name=job.id, cluster=self.name, pool="", priority=0,
                       arrival=job.arrival, workers=job.workers, gpus_per_worker=job.gpus_per_worker, phase=None,
                       topology_level=job.topology_level, topology_mode=job.topology_mode,
                       deadline_seconds=job.deadline_s, node_failure_grace_s=self.grace_s)
        pool = job.pool if job.pool is not None or job.gpu is not None else self.pool_facts[0].name
        chosen = choose_pool(JobShape(cluster=self.name, pool=pool, gpu=job.gpu, workers=job.workers,
                                      gpus_per_worker=job.gpus_per_worker, topology_level=job.topology_level,
                                      topology_mode=job.topology_mode), True, self.pool_facts)
        outcome: tuple[str, int] | Problem = chosen if isinstance(chosen, Problem) else (chosen.name, job.priority)
        self._apply(view, step(view, SpecJudged(outcome, job.workers, job.gpus_per_worker, 1), now), now)

    def inject_fault(self, at: float, node: str, *, fatal: bool, duration: float = 0.0) -> None:
        """A fault on a chosen node at a chosen time, besides the drawn ones
        (a transient one lasts `duration`)."""
        self._at(at, "fatal-on" if fatal else "transient-on", f"{node}#{duration}")

    def _fault(self, now: float, fatal: bool, name: str | None = None, duration: float | None = None) -> None:
        if name is None:
            name = self.node_names[self.rng.randrange(len(self.node_names))]
        node = self.nodes[name]
        if not node.ready or node.gpu_fault:
            return  # already down: the fault lands on a node out of service
        if fatal:
            self.report.fatal_faults += 1
            self._change_node(name, gpu_healthy=False, gpu_fault=REASON_GPU_LOST, gpu_fault_since=now,
                              cordoned=True, quarantined=True)
            self._start_repair(node.pool, name, now)
        else:
            self.report.transient_faults += 1
            self._change_node(name, ready=False, not_ready_since=now)
            if duration is None:
                duration = self.rng.expovariate(1 / self.failures.transient_mean_s)
            self._at(now + duration, "recover", name)
            self._at(now + self.grace_s, "grace", name)
        self._touch_node(name)

    def _change_node(self, name: str, **changes: Any) -> None:
        """Changes a node and the count of GPUs in service with it (summed
        over 25,000 nodes, that count cost more than a cycle's decisions)."""
        before = self.nodes[name]
        after = self.nodes[name] = dataclasses.replace(before, **changes)
        self.gpus_in_service += _gpus_in_service(after) - _gpus_in_service(before)

    def _start_repair(self, pool_name: str, node: str, now: float) -> None:
        pool = next(p for p in self.pools if p.name == pool_name)
        budget = RemediationBudget(max_unavailable=pool.remediation.maxUnavailable)
        if self.in_repair[pool_name] < budget.unavailable_allowed(pool.nodes):
            self.in_repair[pool_name] += 1
            self._at(now + self.failures.repair_s, "repaired", node)
        else:
            self.report.repairs_waited += 1
            self.repair_queue[pool_name].append(node)

    def _event(self, now: float, kind: str, subject: str, cycle_now: float) -> None:
        """Handles an event of time `now`, seen at the cycle of `cycle_now`."""
        if kind == "fatal":
            self._fault(now, fatal=True)
            self._next_fault(now, "fatal", self.failures.fatal_per_gpu_hour)
        elif kind == "transient":
            self._fault(now, fatal=False)
            self._next_fault(now, "transient", self.failures.transient_per_gpu_hour)
        elif kind in ("fatal-on", "transient-on"):
            target, duration = subject.rsplit("#", 1)
            self._fault(now, kind == "fatal-on", target, float(duration))
        elif kind == "recover":
            self._change_node(subject, ready=True, not_ready_since=None)
            self._touch_node(subject)
        elif kind == "grace":
            self._touch_node(subject)
        elif kind == "repaired":
            node = self.nodes[subject]
            self._change_node(subject, gpu_healthy=True, gpu_fault="", gpu_fault_since=None, cordoned=False,
                              quarantined=False)
            self.in_repair[node.pool] -= 1
            if self.repair_queue[node.pool]:
                self._start_repair(node.pool, self.repair_queue[node.pool].pop(0), now)
        elif kind == "finish":
            key, attempt = subject.rsplit("#", 1)
            view = self.views.get(key)
            if view is not None and view.attempt == int(attempt) and view.phase in ACTIVE_PHASES:
                self.pods[key] = tuple(dataclasses.replace(p, phase="Succeeded") for p in self.pods.get(key, ()))
                self.records[key].exited = now
                self.dirty.add(key)
        elif kind == "deadline":
            view = self.views.get(subject)
            if view is not None and view.deadline_seconds is not None and view.first_admitted_at is not None:
                self.dirty.add(subject)
                if cycle_now - view.first_admitted_at <= view.deadline_seconds:
                    # The lifecycle fails it once past the limit: look again next cycle.
                    self._at(cycle_now + self.cycle_s, "deadline", subject)

    # --- transitions, applied as the handlers apply them ---

    def _end_pods(self, key: str, now: float) -> None:
        for pod in self.pods.pop(key, ()):
            self.jobs_on_node[pod.node].discard(key)
        record = self.records[key]
        if record.attempt_started is not None:
            progress = now - record.attempt_started
            saved = math.floor(progress / self.failures.checkpoint_s) * self.failures.checkpoint_s
            if record.phase != Phase.SUCCEEDED:
                record.saved_work += saved
                self.report.gpu_hours_lost += (progress - saved) * record.trace.gpus / HOUR
            record.runs.append((record.attempt_started, now if record.exited is None else record.exited))
            record.attempt_started = None

    def _apply(self, view: JobView, transition: Transition, now: float) -> None:
        key = view.key
        record = self.records[key]
        phase = transition.status.get("phase")
        if phase:
            record.phase = phase
        if transition.delete_pods:
            self._end_pods(key, now)
        if transition.create_pods:
            self.pods[key] = tuple(WorkerPod(name=f"{view.name}-{view.attempt}-{rank}", job_key=key,
                                             attempt=view.attempt, rank=rank, node=node, phase="Running",
                                             gpus=view.gpus_per_worker)
                                   for rank, node in enumerate(transition.create_pods))
            for node in transition.create_pods:
                self.jobs_on_node[node].add(key)
            record.attempt_started = now
            record.exited = None
            record.placements.append(transition.create_pods)
            if record.first_admitted is None:
                record.first_admitted = now
                if view.deadline_seconds is not None:
                    self._at(now + view.deadline_seconds, "deadline", key)
            self._at(now + max(0.0, record.trace.runtime - record.saved_work), "finish", f"{key}#{view.attempt}")
            self.dirty.add(key)
        if transition.restart_reason:
            self.report.restarts += 1
            self.report.restarts_by_reason[transition.restart_reason] = \
                self.report.restarts_by_reason.get(transition.restart_reason, 0) + 1
        if transition.preempted:
            self.report.preemptions += 1
        if transition.assume is not None:
            self.views[key] = transition.assume
            record.pool = transition.assume.pool
        if phase in (Phase.SUCCEEDED, Phase.FAILED):
            if phase == Phase.SUCCEEDED:
                self._end_pods(key, now)
            record.finished = now
            if phase == Phase.FAILED:
                record.failed_reason = str(transition.status.get("reason", ""))
                if record.first_admitted is None:
                    record.rejected = record.failed_reason
            self.views.pop(key, None)

    # --- the clock ---

    def run(self, progress: Callable[[float, int], None] | None = None, *, until: float | None = None) -> Report:
        """Runs cycles until every job has ended, or until the horizon
        `until` (the last cycle is the last before it; arrivals and events
        up to it still happen, so the report shows the world at `until`)."""
        pending = 0
        now = 0.0
        self._next_fault(0.0, "fatal", self.failures.fatal_per_gpu_hour)
        self._next_fault(0.0, "transient", self.failures.transient_per_gpu_hour)
        desired = {p.name: p.nodes for p in self.pools}
        products = {p.name: p.gpu.value for p in self.pools}
        busy = True
        while pending < len(self.trace) or self.views:
            if not busy and not self.dirty:
                # Nothing moved in the last cycle: jump to the next event.
                upcoming = [t for t in (self.trace[pending].arrival if pending < len(self.trace) else None,
                                        self._next_event()) if t is not None]
                if upcoming:
                    now = max(now, math.ceil(min(upcoming) / self.cycle_s) * self.cycle_s)
            if until is not None and now >= until:
                self._happen(until, pending, until)
                break
            pending = self._happen(now, pending, now)
            dirty, self.dirty = self.dirty, set()
            facts = ClusterFacts(nodes=self.nodes, pods={k: self.pods.get(k, ()) for k in dirty},
                                 products=products, desired_nodes=desired)
            cycle = admission_cycle(self.views.values(), facts, now, judge=dirty, cache=self.planner_cache,
                                    planner=self.planner)
            self.report.cycles += 1
            for view, transition in cycle.transitions:
                self._apply(view, transition, now)
            busy = any(t.create_pods or t.delete_pods for _, t in cycle.transitions)
            self._sample(now)
            if progress is not None:
                progress(now, pending)
            now += self.cycle_s
        else:  # every job ended (before the horizon, if any)
            until = None
        self._finish_report(until)
        return self.report

    def _happen(self, till: float, pending: int, now: float) -> int:
        """Arrivals and events up to `till`, seen at the cycle of `now`; the
        trace's next job not yet arrived."""
        while pending < len(self.trace) and self.trace[pending].arrival <= till:
            self._arrive(self.trace[pending], now)
            pending += 1
        # Events land at their own time; the lifecycle sees them at the cycle.
        while self.events and self.events[0][0] <= till:
            when, _, kind, subject = heapq.heappop(self.events)
            self._event(when, kind, subject, now)
        return pending

    def _next_event(self) -> float | None:
        return self.events[0][0] if self.events else None

    def _sample(self, now: float) -> None:
        allocated = sum(v.gpus for v in self.views.values() if v.phase in ACTIVE_PHASES)
        queued = sum(1 for v in self.views.values() if v.phase in WAITING_PHASES)
        in_service = self.gpus_in_service
        sample = Sample(now, allocated, queued, in_service)
        last = self.report.samples[-1] if self.report.samples else None
        if last is None or (last.allocated_gpus, last.queued_jobs, last.gpus_in_service) != (
                allocated, queued, in_service):
            self.report.samples.append(sample)

    def _finish_report(self, until: float | None) -> None:
        """`until`: the horizon the run stopped at, None when every job ended."""
        report = self.report
        first = min((j.arrival for j in self.trace), default=0.0)
        if until is None:
            last = max((j.finished or 0.0 for j in report.jobs), default=0.0)
            if report.samples:
                report.samples.append(Sample(last, 0, 0, report.samples[-1].gpus_in_service))
        else:
            last = until
            self._sample(until)
            if report.samples[-1].at != until:
                report.samples.append(dataclasses.replace(report.samples[-1], at=until))
        report.end = last
        report.makespan = max(0.0, last - first)
        for record in report.jobs:
            if record.trace.topology_mode == "required" and record.trace.topology_level and record.placements:
                report.topology_required += 1
                level = record.trace.topology_level
                if all(len({getattr(self.nodes[n], level) for n in placement}) == 1
                       for placement in record.placements):
                    report.topology_kept += 1


def _gpus_in_service(node: ObservedNode) -> int:
    return node.gpus if node.ready and node.gpu_healthy else 0
