"""Admission planner: properties over random clusters, running gangs and
queues, each checked against a brute-force oracle (slot counting per pool,
block and rack, written independently of the planner's index)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations

from gpucluster.planning.scheduling import (
    AdmissionPlan,
    NodeSnapshot,
    PendingJob,
    RunningGang,
    TopologyRequest,
    plan_admissions,
    queue_order,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NOW = 1000.0
HOUR = 3600.0
POOLS = ("h100", "h200")
TOPOLOGIES = [
    TopologyRequest(None, "preferred"),
    TopologyRequest("rack", "required"),
    TopologyRequest("block", "required"),
    TopologyRequest("rack", "preferred"),
    TopologyRequest("block", "preferred"),
]

settings.register_profile(
    "scheduling",
    max_examples=150,
    deadline=None,  # a shared 2-core machine: wall time per example varies a lot
    suppress_health_check=[HealthCheck.too_slow],
)
PROPERTY = settings.get_profile("scheduling")


@dataclass(frozen=True)
class Scenario:
    nodes: list[NodeSnapshot]
    running: list[RunningGang]
    pending: list[PendingJob]

    @cached_property
    def plan(self) -> AdmissionPlan:
        return plan_admissions(self.nodes, self.running, self.pending, now=NOW)

    @cached_property
    def jobs(self) -> dict[str, PendingJob]:
        return {job.key: job for job in self.pending}

    def admitted_usage(self) -> list[dict[str, int]]:
        return [
            {node: count * self.jobs[key].gpus_per_worker for node, count in Counter(ranks).items()}
            for key, ranks in self.plan.admissions.items()
        ]

    def waiting_in_order(self, pool: str) -> list[PendingJob]:
        positions = self.plan.queue_positions
        return sorted(
            (job for job in self.pending if job.pool == pool and job.key in positions),
            key=lambda job: positions[job.key],
        )


@st.composite
def scenarios(
    draw: st.DrawFn,
    max_jobs: int = 10,
    big_head: bool = False,
    waiting_head: bool = False,
    limits: bool = False,
) -> Scenario:
    """A random cluster, running gangs and queue; `big_head` adds a large
    job of top priority, which mostly has to wait, reserve or preempt, so
    that the jobs behind it exercise backfill; `waiting_head` a large job
    first in the queue that can evict nothing (no running gang has a lower
    priority): if it does not fit, it waits for running gangs to end;
    `limits` gives most gangs an end and most jobs a run-time limit (whole
    hours, so that ties happen)."""

    def limit() -> float | None:
        return draw(st.sampled_from([None, *range(1, 6)])) if limits else None

    nodes: list[NodeSnapshot] = []
    pools = POOLS[: draw(st.integers(1, 2))]
    for pool in pools:
        for block in range(draw(st.integers(1, 3))):
            for rack in range(draw(st.integers(1, 3))):
                for index in range(draw(st.integers(1, 4))):
                    nodes.append(
                        NodeSnapshot(
                            name=f"{pool}-b{block}r{rack}n{index}",
                            pool=pool,
                            gpu_product=pool.upper(),
                            allocatable_gpus=draw(st.sampled_from([8, 8, 8, 4, 6, 2, 1])),
                            block=f"b{block}",
                            rack=f"r{rack}",
                            schedulable=draw(st.sampled_from([True] * 6 + [False])),
                        )
                    )
    free = {node.name: node.allocatable_gpus for node in nodes}
    running: list[RunningGang] = []
    for number in range(draw(st.integers(0, 10))):
        pool = draw(st.sampled_from(pools))
        chosen = draw(
            st.lists(
                st.sampled_from([node.name for node in nodes if node.pool == pool]),
                min_size=1,
                max_size=6,
                unique=True,
            )
        )
        usage: dict[str, int] = {}
        for name in chosen:
            # Whole nodes half of the time: busy clusters make heads wait.
            gpus = free[name] if draw(st.booleans()) else draw(st.integers(0, free[name]))
            if gpus:
                usage[name] = gpus
                free[name] -= gpus
        if usage:
            running.append(
                RunningGang(
                    key=f"run/{number}",
                    priority=draw(st.integers(3 if waiting_head else 0, 3)),
                    pool=pool,
                    gpus_by_node=usage,
                    admitted_at=draw(st.floats(0, NOW)),
                    evicting=draw(st.sampled_from([False] * 5 + [True])),
                    ends_by=None if (hours := limit()) is None else NOW + hours * HOUR,
                )
            )
    pending = [
        PendingJob(
            key=f"job/{number}",
            priority=draw(st.integers(0, 3)),
            arrival=draw(st.integers(0, 5)),
            workers=draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4, 6])),
            gpus_per_worker=draw(st.sampled_from([8, 8, 4, 2, 1, 3])),
            pool=draw(st.sampled_from([*pools * 4, "a100"])),
            topology=draw(st.sampled_from(TOPOLOGIES)),
            excluded_nodes=frozenset(
                draw(st.lists(st.sampled_from([n.name for n in nodes]), max_size=2))
            ),
            time_limit=None if (hours := limit()) is None else hours * HOUR,
        )
        for number in range(draw(st.integers(1, max_jobs)))
    ]
    if big_head:
        workers = draw(st.integers(3, 12))
        pending.append(PendingJob("job/big", 4, 0, workers, 8, "h100"))
    if waiting_head:
        workers = draw(st.integers(2, 12))
        topology = draw(st.sampled_from(TOPOLOGIES))
        pending.append(PendingJob("job/wait", 3, -1, workers, 8, "h100", topology))
    return Scenario(nodes, running, pending)


# --- the oracle -------------------------------------------------------------


def free_gpus(nodes: Iterable[NodeSnapshot], holders: Iterable[Mapping[str, int]]) -> dict[str, int]:
    used: Counter[str] = Counter()
    for usage in holders:
        used.update(usage)
    return {node.name: max(0, node.allocatable_gpus - used[node.name]) for node in nodes}


def fits_on(
    job: PendingJob,
    nodes: Iterable[NodeSnapshot],
    free: Mapping[str, int],
    *,
    honour_schedulable: bool = True,
    honour_exclusions: bool = True,
) -> bool:
    """Whether some placement of `job` exists: identical workers fit a set
    of nodes exactly when the nodes' floor(free / gpus) add up to workers."""
    slots: Counter[tuple[str, ...]] = Counter()
    for node in nodes:
        if node.pool != job.pool:
            continue
        if honour_schedulable and not node.schedulable:
            continue
        if honour_exclusions and node.name in job.excluded_nodes:
            continue
        node_slots = free.get(node.name, 0) // job.gpus_per_worker
        slots[("pool",)] += node_slots
        slots[("block", node.block)] += node_slots
        slots[("rack", node.block, node.rack)] += node_slots
    level = job.topology.required_level
    if level is None:
        return slots[("pool",)] >= job.workers
    return any(count >= job.workers for key, count in slots.items() if key[0] == level)


def never_fits(job: PendingJob, nodes: list[NodeSnapshot]) -> bool:
    empty = {node.name: node.allocatable_gpus for node in nodes}
    return not fits_on(job, nodes, empty, honour_schedulable=False, honour_exclusions=False)


# --- properties -------------------------------------------------------------


@PROPERTY
@given(scenarios())
def test_never_over_commits_a_gpu(scenario: Scenario) -> None:
    free = free_gpus(scenario.nodes, (gang.gpus_by_node for gang in scenario.running))
    given_now: Counter[str] = Counter()
    for usage in scenario.admitted_usage():
        given_now.update(usage)
    by_name = {node.name: node for node in scenario.nodes}
    for name, gpus in given_now.items():
        assert by_name[name].schedulable
        assert gpus <= free[name]


@PROPERTY
@given(scenarios())
def test_admits_whole_gangs_on_allowed_nodes_only(scenario: Scenario) -> None:
    by_name = {node.name: node for node in scenario.nodes}
    for key, ranks in scenario.plan.admissions.items():
        job = scenario.jobs[key]
        assert len(ranks) == job.workers
        assert all(by_name[name].pool == job.pool for name in ranks)
        assert not set(ranks) & job.excluded_nodes
        for name, workers in Counter(ranks).items():
            assert workers * job.gpus_per_worker <= by_name[name].allocatable_gpus


@PROPERTY
@given(scenarios())
def test_required_level_is_never_spanned(scenario: Scenario) -> None:
    by_name = {node.name: node for node in scenario.nodes}
    for key, ranks in scenario.plan.admissions.items():
        level = scenario.jobs[key].topology.required_level
        blocks = {by_name[name].block for name in ranks}
        racks = {(by_name[name].block, by_name[name].rack) for name in ranks}
        if level == "block":
            assert len(blocks) == 1
        if level == "rack":
            assert len(racks) == 1


@PROPERTY
@given(scenarios())
def test_every_job_gets_exactly_one_outcome(scenario: Scenario) -> None:
    plan = scenario.plan
    outcomes = Counter([*plan.admissions, *plan.unschedulable, *plan.queue_positions])
    assert outcomes == Counter(job.key for job in scenario.pending)
    for pool in {job.pool for job in scenario.pending}:
        positions = [plan.queue_positions[job.key] for job in scenario.waiting_in_order(pool)]
        assert positions == list(range(1, len(positions) + 1))
        assert [job.queue_key for job in scenario.waiting_in_order(pool)] == sorted(
            job.queue_key for job in scenario.waiting_in_order(pool)
        )


@PROPERTY
@given(scenarios())
def test_unschedulable_exactly_when_the_empty_pool_cannot_hold_it(scenario: Scenario) -> None:
    for job in scenario.pending:
        assert (job.key in scenario.plan.unschedulable) == never_fits(job, scenario.nodes)


@PROPERTY
@given(scenarios())
def test_the_first_job_of_a_queue_is_admitted_iff_it_fits(scenario: Scenario) -> None:
    free = free_gpus(scenario.nodes, (gang.gpus_by_node for gang in scenario.running))
    for pool in POOLS:
        queue = [
            job
            for job in queue_order(scenario.pending)
            if job.pool == pool and job.key not in scenario.plan.unschedulable
        ]
        if queue:
            first = queue[0]
            assert (first.key in scenario.plan.admissions) == fits_on(first, scenario.nodes, free)


@PROPERTY
@given(scenarios())
def test_the_first_job_is_packed_in_one_rack_or_block_when_one_holds_it(
    scenario: Scenario,
) -> None:
    free = free_gpus(scenario.nodes, (gang.gpus_by_node for gang in scenario.running))
    by_name = {node.name: node for node in scenario.nodes}
    for pool in POOLS:
        queue = [
            job
            for job in queue_order(scenario.pending)
            if job.pool == pool and job.key not in scenario.plan.unschedulable
        ]
        if not queue or queue[0].key not in scenario.plan.admissions:
            continue
        first = queue[0]
        ranks = scenario.plan.admissions[first.key]
        for level in ("rack", "block"):
            as_required = PendingJob(
                first.key,
                first.priority,
                first.arrival,
                first.workers,
                first.gpus_per_worker,
                first.pool,
                TopologyRequest(level, "required"),
                first.excluded_nodes,
            )
            if fits_on(as_required, scenario.nodes, free):
                domains = {
                    (by_name[n].block, by_name[n].rack if level == "rack" else "")
                    for n in ranks
                }
                assert len(domains) == 1, level
                break


@PROPERTY
@given(st.one_of(scenarios(), scenarios(big_head=True)))
def test_a_waiting_job_does_not_fit_what_is_left(scenario: Scenario) -> None:
    """Priority order and work conservation: whatever waits could not have
    been placed on what the cycle left free (outside other heads'
    reservations), so nothing behind it took its place."""
    plan = scenario.plan
    free = free_gpus(
        scenario.nodes,
        [*(gang.gpus_by_node for gang in scenario.running), *scenario.admitted_usage()],
    )
    for key in plan.queue_positions:
        job = scenario.jobs[key]
        held_for_others = {
            name
            for head, names in plan.reservations.items()
            if head != key
            for name in names
        }
        left = {name: 0 if name in held_for_others else gpus for name, gpus in free.items()}
        assert not fits_on(job, scenario.nodes, left)


@PROPERTY
@given(st.one_of(scenarios(), scenarios(big_head=True)))
def test_backfill_never_delays_the_head(scenario: Scenario) -> None:
    """Without run-time limits nothing after the head lands on its
    reservation, and the head fits on its reserved nodes once the gangs on
    them are gone."""
    plan = scenario.plan
    assert set(plan.reservations) <= {k for k, p in plan.queue_positions.items() if p == 1}
    assert not plan.starts_by
    order = {job.key: job.queue_key for job in scenario.pending}
    by_name = {node.name: node for node in scenario.nodes}
    for head_key, reserved in plan.reservations.items():
        head = scenario.jobs[head_key]
        for key, ranks in plan.admissions.items():
            if scenario.jobs[key].pool == head.pool and order[key] > order[head_key]:
                assert not set(ranks) & set(reserved)
        drained = {name: by_name[name].allocatable_gpus for name in reserved}
        assert fits_on(head, [by_name[name] for name in reserved], drained)


@PROPERTY
@given(st.one_of(scenarios(), scenarios(big_head=True)))
def test_preemption_only_when_it_admits_the_preemptor(scenario: Scenario) -> None:
    plan = scenario.plan
    gangs = {gang.key: gang for gang in scenario.running}
    victims_of: dict[str, set[str]] = {}
    for preemption in plan.preemptions:
        victims_of.setdefault(preemption.preemptor, set()).add(preemption.victim)
    for preemptor_key, victims in victims_of.items():
        preemptor = scenario.jobs[preemptor_key]
        assert plan.queue_positions[preemptor_key] == 1
        for victim in victims:
            assert gangs[victim].priority < preemptor.priority
            assert gangs[victim].pool == preemptor.pool
            assert not gangs[victim].evicting

        def fits_without(gone: set[str], job: PendingJob = preemptor) -> bool:
            staying = (
                gang.gpus_by_node
                for gang in scenario.running
                if gang.key not in gone and not (gang.evicting and gang.pool == job.pool)
            )
            free = free_gpus(scenario.nodes, [*staying, *scenario.admitted_usage()])
            return fits_on(job, scenario.nodes, free)

        assert fits_without(victims)
        for spared in victims:
            assert not fits_without(victims - {spared}), f"{spared} was not needed"


@PROPERTY
@given(scenarios(), st.randoms(use_true_random=False))
def test_plan_does_not_depend_on_input_order(scenario: Scenario, shuffler: random.Random) -> None:
    nodes, running, pending = list(scenario.nodes), list(scenario.running), list(scenario.pending)
    for items in (nodes, running, pending):
        shuffler.shuffle(items)
    assert plan_admissions(nodes, running, pending, now=NOW) == scenario.plan


@PROPERTY
@given(st.data())
def test_deadlock_two_jobs_over_half_the_pool(data: st.DataObject) -> None:
    """Each needs more than half of the pool's GPUs: one is admitted whole,
    the other waits whole, holding nothing."""
    scenario = data.draw(scenarios(max_jobs=1))
    nodes = [node for node in scenario.nodes if node.pool == "h100"]
    nodes = [
        NodeSnapshot(n.name, n.pool, n.gpu_product, n.allocatable_gpus, n.block, n.rack)
        for n in nodes
    ]
    total = sum(node.allocatable_gpus for node in nodes)
    gpus = data.draw(st.sampled_from([1, 2]))
    workers = total // (2 * gpus) + 1
    first, second = (
        PendingJob(key, 0, arrival, workers, gpus, "h100") for key, arrival in (("a", 0), ("b", 1))
    )
    empty = {node.name: node.allocatable_gpus for node in nodes}
    if not fits_on(first, nodes, empty):
        return
    plan = plan_admissions(nodes, [], [second, first], now=NOW)
    assert set(plan.admissions) == {"a"}
    assert len(plan.admissions["a"]) == workers
    assert plan.queue_positions == {"b": 1}


# --- the head's reservation ---------------------------------------------------


def fewest_ends(
    job: PendingJob, nodes: list[NodeSnapshot], candidates: list[Mapping[str, int]]
) -> int | None:
    """By brute force: the fewest `candidates` (GPUs by node of gangs that
    could end; nothing else holds GPUs on `nodes`) whose end lets `job` fit
    on `nodes`; None if even all of them do not."""
    for count in range(len(candidates) + 1):
        for ending in combinations(range(len(candidates)), count):
            held = [usage for i, usage in enumerate(candidates) if i not in ending]
            if fits_on(job, nodes, free_gpus(nodes, held)):
                return count
    return None


def shares_a_node(usages: list[Mapping[str, int]]) -> bool:
    holders: Counter[str] = Counter()
    for usage in usages:
        holders.update(name for name, gpus in usage.items() if gpus)
    return any(count > 1 for count in holders.values())


@st.composite
def waits_for_several_gangs(draw: st.DrawFn, limits: bool = False) -> Scenario:
    """One pool of 8-GPU nodes, each idle or held by one of a few gangs of
    the head's priority, a head of 8-GPU workers first in the queue, and
    small jobs behind it: a head that mostly waits for two gangs or more,
    no two of them on one node. `limits`: every gang ends within hours, most
    jobs behind have limits of whole hours, and there are more of them."""

    def hours(always: bool = False) -> float | None:
        drawn = draw(st.sampled_from([*([] if always else [None]), *range(1, 6)])) if limits else None
        return None if drawn is None else drawn * HOUR

    blocks, racks, per_rack = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    nodes = [
        NodeSnapshot(f"b{block}r{rack}n{index}", "h100", "H100", 8, f"b{block}", f"r{rack}")
        for block in range(blocks)
        for rack in range(racks)
        for index in range(per_rack)
    ]
    gangs = draw(st.integers(1, 6))
    holder = {node.name: draw(st.sampled_from([None, *range(gangs)])) for node in nodes}
    running = []
    for number in sorted({gang for gang in holder.values() if gang is not None}):
        usage = {
            name: draw(st.sampled_from([8, 8, 8, 4, 1]))
            for name, gang in holder.items()
            if gang == number
        }
        evicting = draw(st.sampled_from([False] * 5 + [True]))
        admitted_at = draw(st.floats(0, NOW))
        ends_in = hours(always=True)
        running.append(RunningGang(f"run/{number}", 0, "h100", usage, admitted_at, evicting,
                                   None if ends_in is None else NOW + ends_in))
    topology = draw(st.sampled_from(TOPOLOGIES))
    room = {"rack": per_rack, "block": racks * per_rack, None: len(nodes)}
    most = room[topology.required_level]
    workers = draw(st.integers(max(1, most // 2), most))
    head = PendingJob("job/head", 0, -1, workers, 8, "h100", topology)
    behind = [
        PendingJob(f"job/{number}", 0, number, draw(st.integers(1, 3)),
                   draw(st.sampled_from([8, 4, 1])), "h100", time_limit=hours())
        for number in range(draw(st.integers(0, 8 if limits else 3)))
    ]
    return Scenario(nodes, running, [head, *behind])


@PROPERTY
@given(
    st.one_of(
        scenarios(waiting_head=True),
        waits_for_several_gangs(),
        scenarios(big_head=True),
    )
)
def test_a_waiting_head_reserves_where_the_fewest_gangs_must_end(scenario: Scenario) -> None:
    """For every head that waits for running gangs (no victims):
    1. nothing behind it is placed on its reserved nodes, which are
       schedulable, in its pool and not excluded;
    2. the fewest gangs that must end before it fits on its reserved nodes
       (by brute force over every set of gangs) is the fewest for any nodes
       of the pool wherever no node holds GPUs of two gangs that could end,
       and wherever one gang would do; elsewhere the planner's choice is
       greedy and only checked to exist. Gangs evicting count as ended, jobs
       admitted ahead of it in this cycle as gangs that could end;
    3. no GPU is promised twice: admissions fit the GPUs free now."""
    plan = scenario.plan
    preemptors = {preemption.preemptor for preemption in plan.preemptions}
    by_name = {node.name: node for node in scenario.nodes}
    free_now = free_gpus(scenario.nodes, (gang.gpus_by_node for gang in scenario.running))
    for usage in scenario.admitted_usage():
        for name, gpus in usage.items():
            free_now[name] -= gpus
            assert free_now[name] >= 0 and by_name[name].schedulable
    for head_key, reserved in plan.reservations.items():
        if head_key in preemptors:
            continue
        head = scenario.jobs[head_key]
        assert all(by_name[name].schedulable and by_name[name].pool == head.pool
                   for name in reserved)
        assert not set(reserved) & head.excluded_nodes
        ahead: list[Mapping[str, int]] = []
        for key, usage in zip(plan.admissions, scenario.admitted_usage(), strict=True):
            if scenario.jobs[key].pool != head.pool:
                continue
            if scenario.jobs[key].queue_key > head.queue_key:
                assert not set(usage) & set(reserved)
            else:
                ahead.append(usage)
        candidates = [
            *(g.gpus_by_node for g in scenario.running if g.pool == head.pool and not g.evicting),
            *ahead,
        ]
        on_reserved = [usage for usage in candidates if set(usage) & set(reserved)]
        reserved_nodes = [by_name[name] for name in reserved]
        for_reservation = fewest_ends(head, reserved_nodes, on_reserved)
        pool_nodes = [node for node in scenario.nodes if node.pool == head.pool]
        fewest = fewest_ends(head, pool_nodes, candidates)
        assert for_reservation is not None and fewest is not None
        assert for_reservation >= fewest
        if fewest <= 1 or not shares_a_node(candidates):
            assert for_reservation == fewest


@PROPERTY
@given(st.one_of(scenarios(limits=True), scenarios(big_head=True, limits=True),
                 waits_for_several_gangs(limits=True)))
def test_backfill_on_limits_ends_before_the_head_starts(scenario: Scenario) -> None:
    """A job behind the head lands on its reserved nodes only when the head
    has a bounded start and the job's limit ends it by then; at that time
    the head fits on its reserved nodes, whatever was admitted this cycle:
    every gang, evicting or not, running or admitted, without an end by
    then still holds its GPUs."""
    plan = scenario.plan
    assert set(plan.starts_by) <= set(plan.reservations)
    by_name = {node.name: node for node in scenario.nodes}
    admitted = dict(zip(plan.admissions, scenario.admitted_usage(), strict=True))
    for head_key, reserved in plan.reservations.items():
        head = scenario.jobs[head_key]
        starts_by = plan.starts_by.get(head_key)
        for key, usage in admitted.items():
            job = scenario.jobs[key]
            if job.pool == head.pool and job.queue_key > head.queue_key and set(usage) & set(reserved):
                assert starts_by is not None and job.time_limit is not None
                assert NOW + job.time_limit <= starts_by
        if starts_by is None:
            continue
        still_held = [
            *(g.gpus_by_node for g in scenario.running
              if not g.evicting and (g.ends_by is None or g.ends_by > starts_by)),
            *(usage for key, usage in admitted.items()
              if scenario.jobs[key].time_limit is None
              or NOW + scenario.jobs[key].time_limit > starts_by),  # type: ignore[operator]
        ]
        free_then = free_gpus(scenario.nodes, still_held)
        assert fits_on(head, [by_name[name] for name in reserved], free_then)
