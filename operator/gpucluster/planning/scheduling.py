"""Admission of TrainingJobs: the planner's entry point.

One cycle decides, on one snapshot, which pending jobs start now and on which
nodes, which running gangs to preempt, which jobs can never fit, and where
every other job stands in its queue. It is pure: plain data in, an
`AdmissionPlan` out; the handler applies the plan and the next cycle sees the
result (decide on a snapshot, apply, look again).

Queues. Each pool is its own queue (pools share no GPUs), ordered by
priority, highest first, then arrival, then key. Jobs are decided in that
order, each admitted whole -- every worker placed at once, see placement.py
-- or not at all, and a waiting job holds nothing. Jobs that can never fit
(feasibility.py) are reported as unschedulable and take no queue position.

Head and reservation. The first job of a pool that does not fit is the
*head*. It gets a reservation: the nodes it will start on.
- If evicting lower-priority gangs lets it in (preemption.py), the
  reservation is its placement on the free GPUs plus the victims' (and those
  of gangs already evicting). The head is admitted in a later cycle, once the
  victims' pods are gone: their GPUs are still held in this cycle, so no GPU
  is ever promised twice.
- Otherwise it waits for running gangs to end (reservation.py): it reserves
  where the fewest of them must end (gangs admitted earlier in this cycle
  count as running), and of those choices where the ending gangs free the
  most. Its reservation is the nodes those gangs free, plus only as many
  nodes with room now as it still needs, nearest the freed ones: a node
  idle now is held back only when the head cannot start without it, so
  the rest stay free for backfill. (The rule before ranked nodes by a drain
  cost, each gang's count spread over its nodes; idle nodes cost nothing
  there and were reserved first, left idle while smaller jobs queued.)

Backfill. Every job after the head may be admitted now on free GPUs outside
the reservation. So whatever is backfilled there, the head fits on its
reserved nodes as soon as the gangs it waits for end (or are evicted). A job
that does not fit outside the reservation may still go on it when run-time
limits (spec.activeDeadlineSeconds) prove it leaves in time: every gang the
head waits for has a limit, so the head starts by the last of those, and the
job's own limit ends it before then (conservative backfill, as Slurm's on
time limits). A head that cannot fit even once every running gang has ended
(nodes cordoned or excluded) gets no reservation -- holding nodes back could
not help it -- and backfill goes on until the pool changes. Only the head
reserves or preempts; a job behind it waits its turn to become the head.

Between cycles. At 25,000 nodes, building each pool's inventory and capacity
index costs several times what the decisions do, and from one cycle to the
next only a few nodes change. A `CapacityCache`, owned by the caller and
passed to every cycle of one cluster, keeps them and reconciles the index
with the next cycle's nodes and running gangs (see `CapacityIndex.
reconcile`); a pool whose nodes were added, removed, reordered or moved in
the topology is built anew. A plan with the cache is the plan without it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import compress, count
from operator import is_not
from typing import Literal

from gpucluster.planning.admission_snapshot import (
    NodeSnapshot,
    PendingJob,
    RunningGang,
    TopologyLevel,
    TopologyMode,
    TopologyRequest,
)
from gpucluster.planning.capacity import CapacityIndex
from gpucluster.planning.feasibility import PoolInventory
from gpucluster.planning.placement import Placement, fits, place
from gpucluster.planning.preemption import select_victims
from gpucluster.planning.reservation import place_after_fewest_ends

__all__ = [
    "AdmissionCycle",
    "AdmissionPlan",
    "CapacityCache",
    "Decision",
    "NodeSnapshot",
    "PendingJob",
    "Preemption",
    "RunningGang",
    "TopologyLevel",
    "TopologyMode",
    "TopologyRequest",
    "plan_admissions",
    "queue_order",
]

# What one decision did with a job:
# admitted / backfilled: placed now (backfilled: behind a waiting head);
# preempting: the head, victims chosen, nodes reserved until they are gone;
# reserved: the head, waiting for running gangs to end on its reserved nodes;
# waiting: no reservation (behind the head, or a head nothing held back helps);
# unschedulable: can never fit its pool.
Decision = Literal["admitted", "backfilled", "preempting", "reserved", "waiting", "unschedulable"]


@dataclass(frozen=True, slots=True)
class Preemption:
    victim: str
    preemptor: str


@dataclass(frozen=True, slots=True)
class AdmissionPlan:
    """The outcome of one cycle.

    admissions: job key -> one node name per rank, rank 0 first (ranks on
      the same node, rack and block are consecutive).
    preemptions: gangs to evict whole, each with the head it makes room for.
    unschedulable: job key -> why it can never fit its pool.
    queue_positions: job key -> 1-based position among the jobs of its pool
      still waiting (the head is 1).
    reservations: head key -> the nodes held back for it (a job behind it
      is placed there only if its run-time limit ends it by `starts_by`).
    starts_by: head key -> when it starts on its reserved nodes at the
      latest, where run-time limits bound it (on the clock of `now`).
    """

    admissions: Mapping[str, tuple[str, ...]]
    preemptions: tuple[Preemption, ...]
    unschedulable: Mapping[str, str]
    queue_positions: Mapping[str, int]
    reservations: Mapping[str, tuple[str, ...]]
    starts_by: Mapping[str, float]
    # How long each job's decision took, in queue order, when the caller gave
    # a clock; not part of what was decided.
    decision_seconds: tuple[float, ...] = field(default=(), compare=False)


def queue_order(jobs: Iterable[PendingJob]) -> list[PendingJob]:
    """Priority descending, then arrival, then key."""
    return sorted(jobs, key=lambda job: job.queue_key)


def plan_admissions(
    nodes: Iterable[NodeSnapshot],
    running: Iterable[RunningGang],
    pending: Iterable[PendingJob],
    *,
    now: float,
    cache: CapacityCache | None = None,
    clock: Callable[[], float] | None = None,
) -> AdmissionPlan:
    """Decide one admission cycle. `now` is on the clock of
    `RunningGang.admitted_at` (seconds); it prices preemption. `cache`
    carries the pools' indexes over from the last cycle it was given to.
    With a `clock` (seconds), each job's decision is timed."""
    cycle = AdmissionCycle(nodes, running, now=now, cache=cache)
    if clock is None:
        for job in queue_order(pending):
            cycle.decide(job)
        return cycle.plan()
    timings = []
    for job in queue_order(pending):
        started = clock()
        cycle.decide(job)
        timings.append(clock() - started)
    return replace(cycle.plan(), decision_seconds=tuple(timings))


@dataclass
class _CachedPool:
    nodes: list[NodeSnapshot]  # as the last cycle listed them
    inventory: PoolInventory
    index: CapacityIndex


class CapacityCache:
    """Each pool's inventory and capacity index, kept from one cycle to the
    next. Plain data owned by the caller: one per cluster, given to one
    cycle at a time (a cycle changes the indexes as it decides).

    Cost per cycle at 25,000 nodes: when the snapshots are the very objects
    of the last cycle (planning.jobs.NodeSnapshots) and most gangs too
    (planning.jobs.RunningGangs), comparisons in C pass over them and only
    the gangs that started or ended since, and the nodes the last cycle's
    decisions touched, are looked at in Python."""

    def __init__(self) -> None:
        self._nodes: list[NodeSnapshot] = []
        self._pools: dict[str, _CachedPool] = {}
        # The last cycle's gangs, by id (kept, so that no other object takes
        # an id while it is here) and how often each was listed, and the
        # GPUs they hold per node.
        self._gangs: dict[int, RunningGang] = {}
        self._gang_counts: Counter[int] = Counter()
        self._used: dict[str, int] = {}

    def pools(
        self, nodes: Iterable[NodeSnapshot], running: Sequence[RunningGang]
    ) -> dict[str, tuple[PoolInventory, CapacityIndex]]:
        """The inventory and index of each pool for this cycle's nodes and
        running gangs; pools gone are forgotten."""
        nodes = list(nodes)
        used_changed = self._count_used(running)
        if nodes == self._nodes:
            for cached in self._pools.values():
                cached.index.reconcile((), self._used, used_changed)
        else:
            nodes_by_pool: dict[str, list[NodeSnapshot]] = defaultdict(list)
            for node in nodes:
                nodes_by_pool[node.pool].append(node)
            self._pools = {
                pool: self._reconciled(pool, pool_nodes, used_changed)
                for pool, pool_nodes in nodes_by_pool.items()
            }
            self._nodes = nodes
        return {pool: (cached.inventory, cached.index) for pool, cached in self._pools.items()}

    def _count_used(self, running: Sequence[RunningGang]) -> set[str]:
        """Bring the GPUs held per node to `running`; the nodes where they
        may have changed."""
        gangs = dict(zip(map(id, running), running, strict=True))
        counts = Counter(map(id, running))
        last = self._gang_counts
        changed: set[str] = set()
        for gang_id in {gang_id for gang_id, _ in counts.items() ^ last.items()}:
            gang = gangs[gang_id] if gang_id in gangs else self._gangs[gang_id]
            self._hold(gang, counts[gang_id] - last[gang_id], changed)
        self._gangs, self._gang_counts = gangs, counts
        return changed

    def _hold(self, gang: RunningGang, times: int, changed: set[str]) -> None:
        used = self._used
        for name, gpus in gang.gpus_by_node.items():
            held = used.get(name, 0) + times * gpus
            if held:
                used[name] = held
            else:
                used.pop(name, None)
            changed.add(name)

    def _reconciled(self, pool: str, nodes: list[NodeSnapshot], used_changed: set[str]) -> _CachedPool:
        used = self._used
        cached = self._pools.get(pool)
        if cached is None or len(cached.nodes) != len(nodes):
            return _CachedPool(nodes, PoolInventory(pool, nodes), CapacityIndex(nodes, used))
        changed = []
        inventory_stale = False
        for position in compress(count(), map(is_not, nodes, cached.nodes)):
            before, now = cached.nodes[position], nodes[position]
            if before == now:
                continue
            if before.name != now.name:
                return _CachedPool(nodes, PoolInventory(pool, nodes), CapacityIndex(nodes, used))
            changed.append(now)
            inventory_stale = inventory_stale or _inventoried(before) != _inventoried(now)
        if not cached.index.reconcile(changed, used, used_changed):
            return _CachedPool(nodes, PoolInventory(pool, nodes), CapacityIndex(nodes, used))
        inventory = PoolInventory(pool, nodes) if inventory_stale else cached.inventory
        return _CachedPool(nodes, inventory, cached.index)


def _inventoried(node: NodeSnapshot) -> tuple[str, int, str, str]:
    """What `PoolInventory` reads of a node."""
    return (node.gpu_product, node.allocatable_gpus, node.block, node.rack)


class _PoolQueue:
    def __init__(
        self,
        inventory: PoolInventory,
        index: CapacityIndex,
        gangs: Sequence[RunningGang],
    ) -> None:
        self.inventory = inventory
        self.index = index
        self.gangs = gangs
        # Jobs admitted this cycle, as the gangs they are about to become: a
        # head behind them may have to wait for them to end too.
        self.admitted: list[RunningGang] = []
        self.head: PendingJob | None = None
        # The head's reserved nodes, and when it starts on them at the latest
        # (None: unknown, so nothing may backfill onto them).
        self.reserved: tuple[str, ...] = ()
        self.reserved_until: float | None = None
        self.last_queue_key: tuple[int, float, str] | None = None
        self.waiting: list[str] = []


class AdmissionCycle:
    """One cycle, decided one job at a time: `plan_admissions` in steps, so
    a caller (the benchmark) can observe each decision. Jobs of a pool must
    be decided in queue order; the capacity indexes are built (or taken
    from `cache` and reconciled) once here."""

    def __init__(
        self,
        nodes: Iterable[NodeSnapshot],
        running: Iterable[RunningGang],
        *,
        now: float,
        cache: CapacityCache | None = None,
    ) -> None:
        self._now = now
        running = list(running)
        gangs_by_pool: dict[str, list[RunningGang]] = defaultdict(list)
        for gang in running:
            gangs_by_pool[gang.pool].append(gang)
        indexes = (CapacityCache() if cache is None else cache).pools(nodes, running)
        self._pools = {
            pool: _PoolQueue(inventory, index, gangs_by_pool[pool])
            for pool, (inventory, index) in indexes.items()
        }
        self._decided: set[str] = set()
        self._admissions: dict[str, tuple[str, ...]] = {}
        self._preemptions: list[Preemption] = []
        self._unschedulable: dict[str, str] = {}
        self._reservations: dict[str, tuple[str, ...]] = {}

    def decide(self, job: PendingJob) -> Decision:
        if job.key in self._decided:
            raise ValueError(f"job {job.key} decided twice in one cycle")
        self._decided.add(job.key)
        pool = self._pools.get(job.pool)
        if pool is None:
            self._unschedulable[job.key] = f"pool {job.pool!r} has no nodes"
            return "unschedulable"
        if pool.last_queue_key is not None and job.queue_key < pool.last_queue_key:
            raise ValueError(f"job {job.key} decided out of queue order")
        pool.last_queue_key = job.queue_key
        reason = pool.inventory.why_never_fits(job)
        if reason is not None:
            self._unschedulable[job.key] = reason
            return "unschedulable"
        pool.index.mask(job.excluded_nodes)
        try:
            return self._admit_or_hold(pool, job)
        finally:
            pool.index.unmask(job.excluded_nodes)

    def plan(self) -> AdmissionPlan:
        positions = {
            key: position
            for pool in self._pools.values()
            for position, key in enumerate(pool.waiting, start=1)
        }
        return AdmissionPlan(
            admissions=dict(self._admissions),
            preemptions=tuple(self._preemptions),
            unschedulable=dict(self._unschedulable),
            queue_positions=positions,
            reservations=dict(self._reservations),
            starts_by={pool.head.key: pool.reserved_until for pool in self._pools.values()
                       if pool.head is not None and pool.reserved_until is not None},
        )

    def _admit_or_hold(self, pool: _PoolQueue, job: PendingJob) -> Decision:
        # Behind a head most jobs fit nowhere: `fits` says so in O(1), before
        # any placement search (place finds one exactly when fits says so).
        placement = place(pool.index, job) if fits(pool.index, job) else None
        if placement is None and self._leaves_before_head(pool, job):
            pool.index.unmask(pool.reserved)
            if fits(pool.index, job):
                placement = place(pool.index, job)
            pool.index.mask(pool.reserved)
        if placement is not None:
            gpus_by_node = _gpus_by_node(placement, job.gpus_per_worker)
            pool.index.take(gpus_by_node)
            ends_by = None if job.time_limit is None else self._now + job.time_limit
            pool.admitted.append(
                RunningGang(job.key, job.priority, job.pool, gpus_by_node, self._now,
                            ends_by=ends_by)
            )
            self._admissions[job.key] = _ranks(placement)
            return "admitted" if pool.head is None else "backfilled"
        pool.waiting.append(job.key)
        if pool.head is not None:
            return "waiting"
        pool.head = job
        return self._reserve_for_head(pool, job)

    def _reserve_for_head(self, pool: _PoolQueue, head: PendingJob) -> Decision:
        decision: Decision
        victims = select_victims(pool.index, head, pool.gangs, self._now)
        if victims is None:
            found = place_after_fewest_ends(pool.index, head, [*pool.gangs, *pool.admitted])
            if found is None:
                return "waiting"
            placement, pool.reserved_until = found
            decision = "reserved"
        else:
            leaving = [gang for gang in pool.gangs if gang.evicting] + list(victims)
            for gang in leaving:
                pool.index.release(gang.gpus_by_node)
            after_eviction = place(pool.index, head)
            for gang in leaving:
                pool.index.take(gang.gpus_by_node)
            if after_eviction is None:
                raise RuntimeError(f"victims chosen for {head.key} do not make it fit")
            placement = after_eviction
            self._preemptions.extend(Preemption(gang.key, head.key) for gang in victims)
            decision = "preempting" if victims else "reserved"
        reserved = tuple(dict.fromkeys(_ranks(placement)))
        pool.index.mask(reserved)
        pool.reserved = reserved
        self._reservations[head.key] = reserved
        return decision

    def _leaves_before_head(self, pool: _PoolQueue, job: PendingJob) -> bool:
        """Whether `job`, admitted now, ends before the pool's head starts."""
        return (pool.reserved_until is not None and job.time_limit is not None
                and self._now + job.time_limit <= pool.reserved_until)


def _gpus_by_node(placement: Placement, worker_gpus: int) -> dict[str, int]:
    return {node.name: workers * worker_gpus for node, workers in placement}


def _ranks(placement: Placement) -> tuple[str, ...]:
    """One node name per worker, in topology order (block, rack, node)."""
    ordered = sorted(placement, key=lambda pair: pair[0].position)
    return tuple(node.name for node, workers in ordered for _ in range(workers))
