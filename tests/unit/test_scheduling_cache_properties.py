"""The capacity cache: over random sequences of cycles, a plan made with the
indexes carried over from earlier cycles is exactly the plan made from
scratch. Between cycles nodes turn unschedulable and back, lose and regain
GPUs, are added, removed and moved to another rack; gangs start, end and
are evicted; jobs arrive with excluded nodes, required topology and
run-time limits."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TypeVar

from gpucluster.planning.scheduling import (
    AdmissionPlan,
    CapacityCache,
    NodeSnapshot,
    PendingJob,
    RunningGang,
    TopologyRequest,
    plan_admissions,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

T = TypeVar("T")
HOUR = 3600.0
CYCLE_S = 600.0
POOLS = ("h100", "h200")
TOPOLOGIES = [
    TopologyRequest(None, "preferred"),
    TopologyRequest("rack", "required"),
    TopologyRequest("block", "required"),
    TopologyRequest("block", "preferred"),
]

SEQUENCES = settings(
    max_examples=200,
    deadline=None,  # a shared 2-core machine: wall time per example varies a lot
    suppress_health_check=[HealthCheck.too_slow],
)


class World:
    """The cluster one cycle plans on, and what its plans did to it."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.nodes: list[NodeSnapshot] = []
        self.running: list[RunningGang] = []
        self.pending: list[PendingJob] = []
        self.now = 0.0
        self.jobs = 0
        self.added = 0
        for pool in POOLS[: data.draw(st.integers(1, 2))]:
            for block in range(data.draw(st.integers(1, 3))):
                for rack in range(data.draw(st.integers(1, 3))):
                    for _ in range(data.draw(st.integers(1, 4))):
                        self.add_node(pool, f"b{block}", f"r{rack}")

    def draw(self, strategy: st.SearchStrategy[T]) -> T:
        return self.data.draw(strategy)

    def add_node(self, pool: str, block: str, rack: str) -> None:
        self.added += 1
        self.nodes.append(NodeSnapshot(
            name=f"{pool}-{self.added:03d}", pool=pool, gpu_product=pool.upper(),
            allocatable_gpus=self.draw(st.sampled_from([8, 8, 8, 4, 6, 2])), block=block, rack=rack,
            schedulable=self.draw(st.sampled_from([True] * 6 + [False]))))

    def change_nodes(self) -> None:
        for _ in range(self.draw(st.integers(0, 4))):
            if not self.nodes:
                return
            at = self.draw(st.integers(0, len(self.nodes) - 1))
            node = self.nodes[at]
            change = self.draw(st.sampled_from(
                ["schedulable", "schedulable", "gpus", "add", "remove", "move", "copy"]))
            if change == "schedulable":
                self.nodes[at] = dataclasses.replace(node, schedulable=not node.schedulable)
            elif change == "gpus":  # other pods take GPUs, or give them back; a node may grow
                gpus = self.draw(st.integers(0, 10))
                self.nodes[at] = dataclasses.replace(node, allocatable_gpus=gpus)
            elif change == "add":
                self.add_node(node.pool, node.block, self.draw(st.sampled_from([node.rack, "r9"])))
            elif change == "remove":
                del self.nodes[at]
            elif change == "move":
                self.nodes[at] = dataclasses.replace(node, rack=self.draw(st.sampled_from(["r0", "r1", "r8"])))
            else:  # an equal snapshot, not the same object
                self.nodes[at] = dataclasses.replace(node)
        if self.draw(st.integers(0, 9)) == 0:
            self.nodes.reverse()

    def change_gangs(self) -> None:
        """Evicted gangs and those past their limit end; of the others, one
        in five does."""
        self.running = [
            gang for gang in self.running
            if not gang.evicting and (gang.ends_by is None or gang.ends_by > self.now)
            and self.draw(st.integers(0, 4)) > 0
        ]

    def submit(self) -> None:
        names = [node.name for node in self.nodes]
        for _ in range(self.draw(st.integers(0, 4))):
            self.jobs += 1
            limit = self.draw(st.sampled_from([None, 1, 2, 3]))
            self.pending.append(PendingJob(
                key=f"job/{self.jobs}", priority=self.draw(st.integers(0, 2)), arrival=self.now,
                workers=self.draw(st.sampled_from([1, 1, 2, 3, 4, 6])),
                gpus_per_worker=self.draw(st.sampled_from([8, 8, 4, 2, 1])),
                pool=self.draw(st.sampled_from(POOLS)), topology=self.draw(st.sampled_from(TOPOLOGIES)),
                excluded_nodes=frozenset(self.draw(st.lists(st.sampled_from(names), max_size=2)))
                if names else frozenset(),
                time_limit=None if limit is None else limit * HOUR))

    def apply(self, plan: AdmissionPlan) -> None:
        """Admitted jobs start; victims are evicting until the next cycle."""
        jobs = {job.key: job for job in self.pending}
        victims = {preemption.victim for preemption in plan.preemptions}
        self.running = [dataclasses.replace(gang, evicting=True) if gang.key in victims else gang
                        for gang in self.running]
        for key, ranks in plan.admissions.items():
            job = jobs[key]
            self.running.append(RunningGang(
                key=key, priority=job.priority, pool=job.pool,
                gpus_by_node={node: count * job.gpus_per_worker for node, count in Counter(ranks).items()},
                admitted_at=self.now, ends_by=None if job.time_limit is None else self.now + job.time_limit))
        self.pending = [job for job in self.pending
                        if job.key not in plan.admissions and job.key not in plan.unschedulable]
        self.now += CYCLE_S


@SEQUENCES
@given(st.data())
def test_a_plan_with_the_cache_is_the_plan_without_it(data: st.DataObject) -> None:
    world = World(data)
    cache = CapacityCache()
    for _ in range(data.draw(st.integers(2, 8))):
        world.change_nodes()
        world.change_gangs()
        world.submit()
        cached = plan_admissions(world.nodes, world.running, world.pending, now=world.now, cache=cache)
        fresh = plan_admissions(world.nodes, world.running, world.pending, now=world.now)
        assert cached == fresh
        world.apply(fresh)
