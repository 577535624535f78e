"""TrainingJobs whose workers really run (conftest.py: kind, or the local
real nodes): a static pool adopts the GPU nodes, and each job's pods run
rendezvous.py, torchrun's rendezvous without torch, over the job's headless
Service and cluster DNS. A rank exiting 1 and an injected GPU fault restart
the gang on the other node (a restart avoids the node where it failed, so
those two need two GPU nodes)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..integration.harness import wait_for
from .conftest import Cluster, timings

pytestmark = pytest.mark.e2e

CLUSTER = "e2e"
POOL = "real"
WORKER = (Path(__file__).parent / "rendezvous.py").read_text()
TAINT_GPU_ERROR = "nvidia.com/gpu-error"


@pytest.fixture(scope="module")
def pool(e2e: Cluster) -> Iterator[list[str]]:
    """A static pool of every GPU node; yields their names."""
    nodes = [n["metadata"]["name"] for n in e2e.gpu_nodes()]
    e2e.kubectl.apply({
        "apiVersion": "gpucluster.dev/v1alpha1", "kind": "TrainingCluster", "metadata": {"name": CLUSTER},
        "spec": {"pools": [{"name": POOL, "gpu": "H100-80GB-HBM3", "gpusPerNode": 8, "nodes": len(nodes),
                            "provider": "static",
                            "nodeSelector": {"nvidia.com/gpu.present": "true", **e2e.node_selector},
                            "topology": {"nodesPerRack": 1, "racksPerBlock": len(nodes)}}]}})
    wait_for(lambda: condition(e2e.kubectl.get("tc", CLUSTER), "Ready") == "True", timeout=120, interval=2,
             what=f"TrainingCluster {CLUSTER} Ready with {nodes} adopted")
    yield nodes
    e2e.kubectl.run("delete", "tc", CLUSTER, "--timeout=120s", check=False)


def condition(obj: dict[str, Any], kind: str) -> str | None:
    return next((c["status"] for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind), None)


def job_manifest(name: str, gpus_per_worker: int, **env: str) -> dict[str, Any]:
    return {
        "apiVersion": "gpucluster.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"cluster": CLUSTER, "pool": POOL, "workers": 2, "gpusPerWorker": gpus_per_worker,
                 "maxRestarts": 2, "nodeFailureGraceSeconds": 0, "activeDeadlineSeconds": 600,
                 "template": {"spec": {"containers": [{
                     "name": "trainer", "image": "gpucluster:e2e", "imagePullPolicy": "Never",
                     "command": ["python", "-c", WORKER],
                     "env": [{"name": "ATTEMPT",
                              "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['gpucluster.dev/attempt']"}}},
                             *({"name": k, "value": v} for k, v in env.items())]}]}}}}


@pytest.fixture()
def job(e2e: Cluster) -> Iterator[str]:
    name = f"rdzv-{uuid.uuid4().hex[:5]}"
    yield name
    e2e.kubectl.run("delete", "tj", "-n", "default", name, "--timeout=120s", check=False)


def status(e2e: Cluster, job: str) -> dict[str, Any]:
    return dict(e2e.kubectl.get("tj", "-n", "default", job).get("status") or {})


def wait_phase(e2e: Cluster, job: str, phase: str, timeout: float = 300) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        now = status(e2e, job)
        assert now.get("phase") != "Failed", now
        return now if now.get("phase") == phase else None
    return wait_for(reached, timeout=timeout, interval=2, what=f"{job} {phase}")


def worker_logs(e2e: Cluster, job: str, attempt: int) -> dict[int, str]:
    pods = e2e.kubectl.get("pods", "-n", "default", "-l", f"gpucluster.dev/job={job},gpucluster.dev/attempt={attempt}")
    return {int(p["metadata"]["labels"]["gpucluster.dev/rank"]):
            e2e.kubectl.run("logs", "-n", "default", p["metadata"]["name"]).stdout for p in pods["items"]}


def test_a_two_worker_job_rendezvouses_and_succeeds(e2e: Cluster, pool: list[str], job: str) -> None:
    # A node per worker where there are two: the ranks meet across nodes.
    gpus = 8 if len(pool) >= 2 else 4
    started = time.monotonic()
    e2e.kubectl.apply(job_manifest(job, gpus))
    done = wait_phase(e2e, job, "Succeeded")
    timings[f"a 2 x {gpus} GPU TrainingJob, created to Succeeded"] = time.monotonic() - started
    assert done["restarts"] == 0
    logs = worker_logs(e2e, job, done["attempt"])
    world = 2 * gpus
    assert f"store: {world} ranks from 2 pods" in logs[0], logs[0]
    for rank, log in logs.items():
        assert log.count(f"all {world} ranks agreed") == gpus, log
        assert f"MASTER_ADDR {job}-0.{job}.default.svc -> " in log, log
        assert log.rstrip().endswith("done"), (rank, log)


def needs_two(pool: list[str]) -> None:
    if len(pool) < 2:
        pytest.skip("a gang restart avoids the node it failed on: needs a second GPU node")


def test_a_rank_exiting_1_restarts_the_gang_on_the_other_node(e2e: Cluster, pool: list[str], job: str) -> None:
    needs_two(pool)
    e2e.kubectl.apply(job_manifest(job, 4, FAIL_RANK="1"))
    done = wait_phase(e2e, job, "Succeeded")
    assert (done["restarts"], done["attempt"]) == (1, 1), done
    first = done["excludedNodes"]
    assert len(first) == 1 and first[0] not in done["nodes"], done
    logs = worker_logs(e2e, job, 1)
    assert all(log.rstrip().endswith("done") for log in logs.values()), logs


def allocatable_gpus(e2e: Cluster, node: str) -> int:
    return int(e2e.kubectl.get("node", node)["status"]["allocatable"].get("nvidia.com/gpu", "0"))


def test_a_gpu_fault_quarantines_the_node_and_the_gang_restarts_elsewhere(
        e2e: Cluster, pool: list[str], job: str) -> None:
    needs_two(pool)
    kubectl = e2e.kubectl
    e2e.kubectl.apply(job_manifest(job, 4, HOLD="1"))
    running = wait_phase(e2e, job, "Running")
    wait_for(lambda: all("holding" in log for log in worker_logs(e2e, job, 0).values()), timeout=180, interval=2,
             what="both ranks past the rendezvous")
    node = running["nodes"][0]
    # XID 94, a contained ECC error: transient. The device plugin reports
    # the GPU Unhealthy to the kubelet, the agent writes GPUHealthy=False.
    kubectl.run("annotate", "node", node, "--overwrite", "gpucluster.dev/inject-fault=gpu=3,xid=94")
    try:
        wait_for(lambda: allocatable_gpus(e2e, node) == 7, timeout=60, interval=2,
                 what=f"{node}: the faulty GPU out of allocatable")
        wait_for(lambda: any(t["key"] == TAINT_GPU_ERROR for t in kubectl.get("node", node)["spec"].get("taints", [])),
                 timeout=60, interval=2, what=f"{node} quarantined")
        done = wait_phase(e2e, job, "Succeeded")
        assert done["restarts"] == 1 and node not in done["nodes"], done
        assert node in done["excludedNodes"]
    finally:
        kubectl.run("annotate", "node", node, "gpucluster.dev/inject-fault-")
    # A transient fault that clears gives the node back.
    wait_for(lambda: not any(t["key"] == TAINT_GPU_ERROR
                             for t in kubectl.get("node", node)["spec"].get("taints", [])),
             timeout=120, interval=2, what=f"{node} released from quarantine")
    wait_for(lambda: allocatable_gpus(e2e, node) == 8, timeout=60, interval=2, what=f"{node}: 8 GPUs again")
