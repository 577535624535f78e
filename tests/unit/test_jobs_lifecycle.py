"""Gang lifecycle, submission checks and the admission snapshot."""

from __future__ import annotations

import dataclasses

from gpucluster.planning.jobs import (
    Action,
    JobShape,
    JobView,
    Phase,
    PoolFacts,
    Problem,
    WorkerPod,
    admission_inputs,
    choose_pool,
    judge_gang,
    torchrun_env,
)
from gpucluster.planning.pools import ObservedNode

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


def test_all_running_marks_running_and_all_succeeded_succeeds() -> None:
    assert judge_gang(gang(Phase.ADMITTED), [pod(0), pod(1)], NODES, 110).action is Action.MARK_RUNNING
    assert judge_gang(gang(Phase.ADMITTED), [pod(0)], NODES, 110).action is Action.NONE
    done = judge_gang(gang(), [pod(0, "Succeeded"), pod(1, "Succeeded")], NODES, 110)
    assert done.action is Action.SUCCEED


def test_one_failed_worker_restarts_the_gang_avoiding_its_node() -> None:
    verdict = judge_gang(gang(), [pod(0), pod(1, "Failed", exit_code=1)], NODES, 110)
    assert verdict.action is Action.RESTART and verdict.exclude == {"n1"}
    assert "rank 1" in verdict.message and "exit code 1" in verdict.message


def test_pods_of_an_older_attempt_are_ignored() -> None:
    verdict = judge_gang(gang(), [pod(0), pod(1), pod(1, "Failed", attempt=0)], NODES, 110)
    assert verdict.action is Action.NONE


def test_node_not_ready_or_unhealthy_restarts() -> None:
    nodes = {**NODES, "n0": dataclasses.replace(NODES["n0"], ready=False)}
    verdict = judge_gang(gang(), [pod(0), pod(1)], nodes, 110)
    assert (verdict.action, verdict.reason, verdict.exclude) == (Action.RESTART, "NodeFailed", {"n0"})
    nodes = {**NODES, "n1": dataclasses.replace(NODES["n1"], gpu_healthy=False)}
    assert "unhealthy GPUs" in judge_gang(gang(), [pod(0), pod(1)], nodes, 110).message


def test_lost_pod_restarts_and_restarts_run_out() -> None:
    assert judge_gang(gang(), [pod(0)], NODES, 110).reason == "WorkerLost"
    spent = judge_gang(gang(restarts=2), [pod(0), pod(1, "Failed")], NODES, 110)
    assert (spent.action, spent.reason) == (Action.FAIL, "MaxRestartsExceeded")


def test_deadline() -> None:
    assert judge_gang(gang(deadline_seconds=5), [pod(0), pod(1)], NODES, 106).reason == "DeadlineExceeded"
    assert judge_gang(gang(deadline_seconds=5), [pod(0), pod(1)], NODES, 104).action is Action.NONE


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
                                             {"h100": "H100-80GB-HBM3"}, {"n3": 2})
    assert {g.key: (dict(g.gpus_by_node), g.evicting) for g in gangs} == {
        "ns/a": ({"n0": 8}, False), "ns/b": ({"n2": 8}, True)}
    assert [p.key for p in pending] == ["ns/b"]
    assert {n.name: n.allocatable_gpus for n in nodes}["n3"] == 6
