"""Submission checks, the torchrun environment and the admission snapshot."""

from __future__ import annotations

import dataclasses

from gpucluster.planning.jobs import (
    JobShape,
    JobView,
    NodeSnapshots,
    Phase,
    PoolFacts,
    Problem,
    RunningGangs,
    WorkerPod,
    admission_inputs,
    choose_pool,
)
from gpucluster.planning.pools import ObservedNode
from gpucluster.planning.torchrun import torchrun_env

NODES = {n: ObservedNode(name=n, pool="h100", ordinal=i, block="b000", rack=f"r{i // 2}")
         for i, n in enumerate(["n0", "n1", "n2", "n3"])}


def gang(phase: Phase = Phase.RUNNING, **extra: object) -> JobView:
    base = JobView(key="ns/job", namespace="ns", name="job", cluster="c", pool="h100", priority=0,
                   arrival=0.0, workers=2, gpus_per_worker=8, phase=phase, attempt=1, restarts=0,
                   max_restarts=2, nodes=("n0", "n1"), first_admitted_at=100.0)
    return dataclasses.replace(base, **extra)  # type: ignore[arg-type]


def pod(rank: int, phase: str = "Running", attempt: int = 1, **extra: object) -> WorkerPod:
    base = WorkerPod(name=f"job-{attempt}-{rank}", job_key="ns/job", attempt=attempt, rank=rank,
                     node=f"n{rank}", phase=phase, gpus=8)
    return dataclasses.replace(base, **extra)  # type: ignore[arg-type]


POOLS = [PoolFacts("h100", "H100-80GB-HBM3", 8, 4, 2, 2), PoolFacts("h200", "H200-141GB", 4, 2, 2, 1)]


def shape(**extra: object) -> JobShape:
    return dataclasses.replace(JobShape(cluster="c", pool="h100", gpu=None, workers=2, gpus_per_worker=8),
                               **extra)  # type: ignore[arg-type]


def test_choose_pool() -> None:
    assert choose_pool(shape(), True, POOLS) == POOLS[0]
    assert choose_pool(shape(pool=None, gpu="H200-141GB", gpus_per_worker=4), True, POOLS) == POOLS[1]
    cases = {
        "UnknownCluster": (shape(), False),
        "UnknownPool": (shape(pool="a100"), True),
        "UnknownGPU": (shape(pool=None, gpu="B200"), True),
        "GPUMismatch": (shape(gpu="H200-141GB"), True),
        "TooManyGPUsPerWorker": (shape(pool="h200", gpus_per_worker=8), True),
        "LargerThanPool": (shape(workers=5), True),
        "TopologyNeverFits": (shape(workers=3, topology_level="rack", topology_mode="required"), True),
    }
    for reason, (job, exists) in cases.items():
        problem = choose_pool(job, exists, POOLS)
        assert isinstance(problem, Problem) and problem.reason == reason, (reason, problem)
        assert problem.message.startswith("spec.")
    assert choose_pool(shape(workers=3, topology_level="rack"), True, POOLS) == POOLS[0], \
        "preferred topology never rejects"
    assert choose_pool(shape(workers=8, gpus_per_worker=4), True, POOLS) == POOLS[0], "2 workers per node"


def test_torchrun_environment() -> None:
    env = {e["name"]: e["value"] for e in torchrun_env("llama", "team", 3, 4, 8, 29500)}
    assert env["MASTER_ADDR"] == "llama-0.llama.team.svc" == env["PET_MASTER_ADDR"]
    assert (env["WORLD_SIZE"], env["NODE_RANK"], env["NNODES"], env["NPROC_PER_NODE"]) == ("32", "3", "4", "8")


def test_admission_inputs_count_active_gangs_evicting_leftovers_and_foreign_pods() -> None:
    running = gang(key="ns/a", nodes=("n0", "n0"), gpus_per_worker=4)
    preempted = gang(key="ns/b", phase=Phase.QUEUED, nodes=())
    leftovers = [pod(0, job_key="ns/b", node="n2")]
    nodes, gangs, pending = admission_inputs([running, preempted], NODES.values(), leftovers,
                                             {"h100": "H100-80GB-HBM3"}, {"n3": 2}, now=0.0)
    assert {g.key: (dict(g.gpus_by_node), g.evicting) for g in gangs} == {
        "ns/a": ({"n0": 8}, False), "ns/b#leftover": ({"n2": 8}, True)}
    assert [p.key for p in pending] == ["ns/b"]
    assert {n.name: n.allocatable_gpus for n in nodes}["n3"] == 6


def test_admission_inputs_carry_run_time_limits_from_the_first_admission() -> None:
    """activeDeadlineSeconds counts from the first admission: a running gang
    ends by then, a restarting one has only what is left, a new one all of it."""
    running = gang(key="ns/a", nodes=("n0",), workers=1, first_admitted_at=100.0, deadline_seconds=3600)
    restarting = gang(key="ns/r", phase=Phase.QUEUED, nodes=(), workers=1, first_admitted_at=200.0,
                      deadline_seconds=600)
    fresh = gang(key="ns/n", phase=Phase.QUEUED, nodes=(), workers=1, first_admitted_at=None,
                 deadline_seconds=900)
    unlimited = gang(key="ns/u", phase=Phase.QUEUED, nodes=(), workers=1)
    _, gangs, pending = admission_inputs([running, restarting, fresh, unlimited], NODES.values(), [],
                                         {"h100": "H100-80GB-HBM3"}, {}, now=500.0)
    assert {g.key: g.ends_by for g in gangs} == {"ns/a": 3700.0}
    assert {p.key: p.time_limit for p in pending} == {"ns/r": 300.0, "ns/n": 900.0, "ns/u": None}


def test_admission_inputs_count_pods_of_old_attempts_finished_and_deleted_jobs() -> None:
    """A GPU a pod still holds is never free, whatever became of its job."""
    running = gang(key="ns/a", nodes=("n0",), workers=1, attempt=2)
    failed = gang(key="ns/f", phase=Phase.FAILED, nodes=("n1",), workers=1)
    pods = [pod(0, job_key="ns/a", node="n0", attempt=2), pod(0, job_key="ns/a", node="n3", attempt=1),
            pod(0, job_key="ns/f", node="n1"), pod(0, job_key="ns/gone", node="n2"),
            pod(1, job_key="ns/gone", node="n2", phase="Succeeded")]
    _, gangs, _ = admission_inputs([running, failed], NODES.values(), pods, {"h100": "H100-80GB-HBM3"}, {}, now=0.0)
    assert {g.key: (dict(g.gpus_by_node), g.evicting) for g in gangs} == {
        "ns/a": ({"n0": 8}, False), "ns/a#leftover": ({"n3": 8}, True),
        "ns/f#leftover": ({"n1": 8}, True), "ns/gone#leftover": ({"n2": 8}, True)}


def test_node_snapshots_are_kept_for_nodes_that_did_not_change() -> None:
    """The capacity cache passes over a node whose snapshot is the very
    object of the last cycle; every change to what the planner reads of a
    node makes a new one."""
    products = {"h100": "H100-80GB-HBM3"}
    snapshots = NodeSnapshots()
    first = snapshots.of(NODES.values(), products, {})
    cordoned = dict(NODES, n1=dataclasses.replace(NODES["n1"], cordoned=True),
                    n2=dataclasses.replace(NODES["n2"]))  # equal, not the same object
    second = snapshots.of(cordoned.values(), products, {"n3": 2})
    assert [a is b for a, b in zip(first, second, strict=True)] == [True, False, True, False]
    assert not second[1].schedulable and second[3].allocatable_gpus == 6
    assert snapshots.of([cordoned["n0"]], products, {"n3": 2}) == [first[0]]
    again = snapshots.of(cordoned.values(), products, {"n3": 2})
    assert again[0] is first[0] and again[1] is not second[1] and again[1] == second[1]  # forgotten while gone
    reordered = snapshots.of(reversed(cordoned.values()), products, {"n3": 2})
    assert [a is b for a, b in zip(again, reversed(reordered), strict=True)] == [True] * 4
    assert snapshots.of(cordoned.values(), {"h100": "H100-SXM"}, {"n3": 2})[0].gpu_product == "H100-SXM"


def test_running_gangs_are_kept_while_their_job_is_the_same() -> None:
    """The capacity cache counts the GPUs of only the gangs that are new
    objects; a gang whose job or end changed is new."""
    running, other = gang(key="ns/a"), gang(key="ns/b", nodes=("n2", "n3"))
    gangs = RunningGangs()
    first = gangs.of([running, other], now=0.0)
    moved = dataclasses.replace(other, nodes=("n2", "n2"))
    second = gangs.of([dataclasses.replace(running), moved], now=10.0)
    assert second[0] is first[0] and second[1] is not first[1]
    assert dict(second[1].gpus_by_node) == {"n2": 16}
    unadmitted = gang(key="ns/c", first_admitted_at=None, deadline_seconds=600)  # its end moves with now
    assert gangs.of([unadmitted], now=0.0)[0].ends_by == 600.0
    assert gangs.of([unadmitted], now=5.0)[0].ends_by == 605.0
