"""No GPU is ever held by two gangs: random sequences of submissions, spec
edits, worker and node failures, deletions and admission cycles, applied to
a small world as the handlers apply them, with pods that take their time to
terminate."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

from gpucluster.planning.jobs import ACTIVE_PHASES, JobView, Problem, WorkerPod
from gpucluster.planning.lifecycle import (
    ClusterFacts,
    PlannerCache,
    SpecJudged,
    Transition,
    admission_cycle,
    step,
)
from gpucluster.planning.pools import ObservedNode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GPUS_PER_NODE = 8
POOLS = {"h100": [f"a{i}" for i in range(6)], "h200": [f"b{i}" for i in range(2)]}


@dataclasses.dataclass
class Pod:
    job_key: str
    attempt: int
    rank: int
    node: str
    gpus: int
    phase: str = "Running"
    terminating: bool = False

    def worker(self) -> WorkerPod:
        return WorkerPod(name=f"{self.job_key}-{self.attempt}-{self.rank}", job_key=self.job_key,
                         attempt=self.attempt, rank=self.rank, node=self.node, phase=self.phase,
                         gpus=self.gpus, terminating=self.terminating)


@dataclasses.dataclass
class World:
    now: float = 1000.0
    jobs: dict[str, JobView] = dataclasses.field(default_factory=dict)
    pods: list[Pod] = dataclasses.field(default_factory=list)
    nodes: dict[str, ObservedNode] = dataclasses.field(default_factory=lambda: {
        name: ObservedNode(name=name, pool=pool, ordinal=i, block="b0", rack=f"r{i // 2}", gpus=GPUS_PER_NODE)
        for pool, names_ in POOLS.items() for i, name in enumerate(names_)})
    submitted: int = 0
    planner_cache: PlannerCache = dataclasses.field(default_factory=PlannerCache)

    def apply(self, view: JobView, transition: Transition) -> None:
        if transition.delete_pods:
            self.end_pods(view.key)
        for rank, node in enumerate(transition.create_pods):
            self.pods.append(Pod(view.key, view.attempt, rank, node, view.gpus_per_worker))
        if transition.assume is not None and view.key in self.jobs:
            self.jobs[view.key] = transition.assume

    def end_pods(self, key: str) -> None:
        for p in self.pods:
            if p.job_key == key:
                p.terminating = True

    def facts(self) -> ClusterFacts:
        pods: dict[str, list[WorkerPod]] = defaultdict(list)
        for p in self.pods:
            pods[p.job_key].append(p.worker())
        return ClusterFacts(nodes=dict(self.nodes), pods=pods,
                            products={"h100": "H100", "h200": "H200"},
                            desired_nodes={pool: len(n) for pool, n in POOLS.items()})

    def cycle(self) -> None:
        jobs, facts = list(self.jobs.values()), self.facts()
        cycle = admission_cycle(jobs, facts, self.now, cache=self.planner_cache)
        assert cycle == admission_cycle(jobs, facts, self.now), "the planner's cache changed a decision"
        for key in cycle.orphans:
            self.end_pods(key)
        for view, transition in cycle.transitions:
            self.apply(view, transition)

    def judge(self, view: JobView, outcome: tuple[str, int] | Problem) -> None:
        self.apply(view, step(view, SpecJudged(outcome, view.workers, view.gpus_per_worker, 1), self.now))


def check_no_gpu_promised_twice(world: World) -> None:
    """Per node: GPUs of pods that still hold them (running or terminating),
    and GPUs promised to admitted gangs whose pods are not there yet, never
    exceed the node's GPUs."""
    held: dict[str, int] = defaultdict(int)
    current = {(v.key, v.attempt) for v in world.jobs.values() if v.phase in ACTIVE_PHASES}
    for p in world.pods:
        if p.phase not in ("Succeeded", "Failed"):
            held[p.node] += p.gpus
        elif (p.job_key, p.attempt) in current:
            held[p.node] += p.gpus  # an admitted gang's GPUs stay promised until its phase says otherwise
    for view in world.jobs.values():
        if view.phase in ACTIVE_PHASES:
            created = {p.rank for p in world.pods if (p.job_key, p.attempt) == (view.key, view.attempt)}
            for rank, node in enumerate(view.nodes):
                if rank not in created:
                    held[node] += view.gpus_per_worker
    over = {node: gpus for node, gpus in held.items() if gpus > GPUS_PER_NODE}
    assert not over, f"GPUs promised twice on {over}: {world.jobs} {world.pods}"


def run(world: World, op: tuple[Any, ...]) -> None:
    kind, a, b = op
    keys = sorted(world.jobs)
    key = keys[a % len(keys)] if keys else None
    if kind == "submit":
        world.submitted += 1
        workers, gpus, pool, priority = b
        view = JobView(key=f"ns/j{world.submitted}", namespace="ns", name=f"j{world.submitted}", cluster="c",
                       pool="", priority=0, arrival=world.now, workers=workers, gpus_per_worker=gpus,
                       phase=None, node_failure_grace_s=30.0)
        world.jobs[view.key] = view
        world.judge(view, (pool, priority))
    elif kind == "edit" and key is not None:
        outcomes: list[tuple[str, int] | Problem] = [
            ("h200", 0), ("h100", 3), Problem("UnknownPriorityClass", "spec.priorityClassName: nope")]
        world.judge(world.jobs[key], outcomes[b % 3])
    elif kind == "delete" and key is not None:
        del world.jobs[key]
    elif kind == "worker-fails" and world.pods:
        pod = world.pods[a % len(world.pods)]
        if pod.phase == "Running":
            pod.phase = "Failed"
    elif kind == "workers-succeed" and key is not None:
        for p in world.pods:
            if p.job_key == key and p.attempt == world.jobs[key].attempt:
                p.phase = "Succeeded"
    elif kind == "node-down":
        name = sorted(world.nodes)[a % len(world.nodes)]
        world.nodes[name] = dataclasses.replace(world.nodes[name], ready=False, not_ready_since=world.now)
    elif kind == "node-up":
        name = sorted(world.nodes)[a % len(world.nodes)]
        world.nodes[name] = dataclasses.replace(world.nodes[name], ready=True, not_ready_since=None)
    elif kind == "pods-gone":
        # Terminating pods end at their own pace: some of them now.
        world.pods = [p for i, p in enumerate(world.pods) if not (p.terminating and (i + a) % 2 == 0)]
    elif kind == "tick":
        world.now += b
    elif kind == "cycle":
        world.cycle()


OPS = st.one_of(
    st.tuples(st.just("submit"), st.just(0), st.tuples(st.integers(1, 4), st.sampled_from([2, 4, 8]),
                                                        st.sampled_from(["h100", "h200"]), st.integers(0, 3))),
    st.tuples(st.sampled_from(["edit", "delete", "worker-fails", "workers-succeed", "node-down", "node-up",
                               "pods-gone"]), st.integers(0, 50), st.integers(0, 2)),
    st.tuples(st.just("tick"), st.just(0), st.sampled_from([1, 10, 40])),
    st.tuples(st.just("cycle"), st.just(0), st.just(0)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=5, max_size=60))
def test_no_gpu_is_ever_held_by_two_gangs(ops: list[tuple[Any, ...]]) -> None:
    world = World()
    for op in ops:
        run(world, op)
        check_no_gpu_promised_twice(world)
    for _ in range(3):  # and the cycles that follow see it through
        world.cycle()
        check_no_gpu_promised_twice(world)


@settings(max_examples=100, deadline=None)
@given(st.lists(OPS, min_size=5, max_size=40))
def test_every_job_ends_in_a_known_phase_and_a_finished_job_holds_no_pod(ops: list[tuple[Any, ...]]) -> None:
    world = World()
    for op in ops:
        run(world, op)
    world.cycle()
    for view in world.jobs.values():
        assert view.phase is not None
        if view.phase.value in ("Succeeded", "Failed"):
            assert all(p.terminating or p.phase in ("Succeeded", "Failed")
                       for p in world.pods if p.job_key == view.key), view
