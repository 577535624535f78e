"""TrainingJob on the real API server: the operator admits gangs onto KWOK
nodes of a TrainingCluster, queues, preempts, restarts and finishes them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .harness import Kubectl, OperatorProcess, finish_pod, set_node_ready, wait_for
from .test_trainingcluster import condition, training_cluster, wait_ready

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:5]}"


@pytest.fixture()
def gpu_cluster(kubectl: Kubectl, running_operator: OperatorProcess) -> Iterator[str]:
    """4 H100 nodes of 8 GPUs: 2 racks of 2 nodes in one block."""
    name = unique("jobs")
    kubectl.apply(training_cluster(name, {"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": 4,
                                          "topology": {"nodesPerRack": 2, "racksPerBlock": 2}}))
    wait_ready(kubectl, name, 4)
    yield name
    kubectl.run("delete", "tj", "--all", "-n", "default", "--wait=true", "--timeout=60s")
    kubectl.delete_cluster(name)


def training_job(name: str, cluster: str, workers: int, gpus: int = 8, **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "gpucluster.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"cluster": cluster, "pool": "h100", "workers": workers, "gpusPerWorker": gpus,
                     "template": {"spec": {"containers": [{"name": "trainer", "image": "pytorch",
                                                           "command": ["torchrun", "train.py"]}]}},
                     **extra}}


def job(kubectl: Kubectl, name: str) -> dict[str, Any]:
    return dict(kubectl.get("tj", "-n", "default", name))


def phase_is(kubectl: Kubectl, name: str, *phases: str) -> dict[str, Any] | None:
    current = job(kubectl, name)
    return current if (current.get("status") or {}).get("phase") in phases else None


def wait_phase(kubectl: Kubectl, name: str, *phases: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(lambda: phase_is(kubectl, name, *phases), timeout=timeout,
                    what=f"{name} in {phases}")


def worker_pods(kubectl: Kubectl, name: str) -> list[dict[str, Any]]:
    pods = kubectl.get("pods", "-n", "default", "-l", f"gpucluster.dev/job={name}")["items"]
    return sorted((p for p in pods if not p["metadata"].get("deletionTimestamp")),
                  key=lambda p: int(p["metadata"]["labels"]["gpucluster.dev/rank"]))


def job_event_messages(kubectl: Kubectl, name: str) -> list[tuple[str, str]]:
    items = kubectl.get("events", "-n", "default", "--field-selector",
                        f"involvedObject.kind=TrainingJob,involvedObject.name={name}")["items"]
    return [(e["reason"], e["message"]) for e in items]


def job_events(kubectl: Kubectl, name: str) -> list[str]:
    return [reason for reason, _ in job_event_messages(kubectl, name)]


def test_gang_is_admitted_whole_with_torchrun_environment(kubectl: Kubectl, gpu_cluster: str) -> None:
    name = unique("train")
    kubectl.apply(training_job(name, gpu_cluster, workers=2, topology={"level": "rack", "mode": "required"}))
    running = wait_phase(kubectl, name, "Running")
    assert running["status"]["workersReady"] == "2/2"
    pods = worker_pods(kubectl, name)
    assert len(pods) == 2
    nodes = [p["spec"]["nodeName"] for p in pods]
    assert nodes == running["status"]["nodes"]
    racks = {kubectl.get("node", n)["metadata"]["labels"]["gpucluster.dev/rack"] for n in nodes}
    assert len(racks) == 1, "a required rack gang stays in one rack"
    env = {e["name"]: e["value"] for e in pods[1]["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == f"{name}-0.{name}.default.svc"
    assert (env["WORLD_SIZE"], env["NODE_RANK"], env["NPROC_PER_NODE"], env["MASTER_PORT"]) == \
        ("16", "1", "8", "29500")
    assert pods[1]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pods[0]["spec"]["hostname"] == f"{name}-0" and pods[0]["spec"]["subdomain"] == name
    # The job's node-failure grace, not the node controller's taint eviction
    # (the API server's default: 300 s), ends a gang on a node that is down.
    down = {t["key"]: t for t in pods[0]["spec"]["tolerations"] if t.get("effect") == "NoExecute"}
    assert set(down) == {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}
    assert not any("tolerationSeconds" in t for t in down.values())
    service = kubectl.get("service", "-n", "default", name)
    assert service["spec"]["clusterIP"] == "None"
    assert pods[0]["metadata"]["ownerReferences"][0]["name"] == name
    assert condition(running, "Admitted")["status"] == "True"
    assert {"Queued", "Admitted", "Running"} <= set(job_events(kubectl, name))

    for pod in pods:
        finish_pod(kubectl, "default", pod["metadata"]["name"], 0)
    done = wait_phase(kubectl, name, "Succeeded")
    assert done["status"]["completedAt"]
    kubectl.run("delete", "tj", "-n", "default", name, "--timeout=60s")
    # The garbage collector learns of a new CRD at its discovery resync (30 s),
    # so on a fresh cluster the first owner deletion may wait that long.
    wait_for(lambda: not kubectl.get("pods", "-n", "default", "-l", f"gpucluster.dev/job={name}")["items"],
             timeout=90, what="pods garbage-collected with their job")


def test_queue_by_priority_then_arrival_and_never_partial(kubectl: Kubectl, gpu_cluster: str) -> None:
    big = unique("big")
    kubectl.apply(training_job(big, gpu_cluster, workers=3, priority=10))
    wait_phase(kubectl, big, "Running")
    low, high = unique("low"), unique("high")
    kubectl.apply(training_job(low, gpu_cluster, workers=2, priority=1))
    kubectl.apply(training_job(high, gpu_cluster, workers=2, priority=5))
    wait_for(lambda: (job(kubectl, high).get("status") or {}).get("queuePosition") == 1
             and (job(kubectl, low).get("status") or {}).get("queuePosition") == 2, what="queue positions")
    # One node is free, but neither 2-node gang may start on half of its GPUs.
    assert worker_pods(kubectl, low) == [] and worker_pods(kubectl, high) == []
    for pod in worker_pods(kubectl, big):
        finish_pod(kubectl, "default", pod["metadata"]["name"], 0)
    wait_phase(kubectl, high, "Running")
    wait_phase(kubectl, low, "Running")
    assert len(worker_pods(kubectl, high)) == 2


def test_preemption_evicts_the_whole_lower_gang_for_a_higher_job(kubectl: Kubectl, gpu_cluster: str) -> None:
    low = unique("low")
    kubectl.apply(training_job(low, gpu_cluster, workers=4, priority=1))
    wait_phase(kubectl, low, "Running")
    urgent = unique("urgent")
    kubectl.apply(training_job(urgent, gpu_cluster, workers=2, priority=100))
    wait_phase(kubectl, urgent, "Running", timeout=60)
    evicted = wait_phase(kubectl, low, "Queued")
    assert evicted["status"]["reason"] == "Preempted"
    assert urgent in evicted["status"]["message"]
    assert worker_pods(kubectl, low) == [], "the whole gang goes, not part of it"
    assert "Preempted" in job_events(kubectl, low)


def test_worker_failure_restarts_the_gang_then_fails_after_max_restarts(
        kubectl: Kubectl, gpu_cluster: str) -> None:
    name = unique("flaky")
    kubectl.apply(training_job(name, gpu_cluster, workers=2, maxRestarts=1))
    first = wait_phase(kubectl, name, "Running")
    pods = worker_pods(kubectl, name)
    failed_node = pods[1]["spec"]["nodeName"]
    finish_pod(kubectl, "default", pods[1]["metadata"]["name"], 1)
    second = wait_for(lambda: phase_is(kubectl, name, "Running")
                      if job(kubectl, name)["status"].get("attempt") == 1 else None,
                      timeout=60, what="the gang's second attempt running")
    assert second["status"]["restarts"] == 1
    assert failed_node in second["status"]["excludedNodes"]
    assert failed_node not in second["status"]["nodes"]
    assert [p["metadata"]["labels"]["gpucluster.dev/attempt"] for p in worker_pods(kubectl, name)] == ["1", "1"]
    assert first["status"]["nodes"] != second["status"]["nodes"]
    assert "GangRestart" in job_events(kubectl, name)

    finish_pod(kubectl, "default", worker_pods(kubectl, name)[0]["metadata"]["name"], 137)
    failed = wait_phase(kubectl, name, "Failed", timeout=60)
    assert failed["status"]["reason"] == "MaxRestartsExceeded"
    assert "exit code 137" in failed["status"]["message"]
    wait_for(lambda: worker_pods(kubectl, name) == [], what="failed gang's pods removed")


def test_node_down_past_the_grace_restarts_the_gang_once_elsewhere(kubectl: Kubectl, gpu_cluster: str) -> None:
    name = unique("nodefail")
    kubectl.apply(training_job(name, gpu_cluster, workers=2, nodeFailureGraceSeconds=5))
    running = wait_phase(kubectl, name, "Running")
    lost = running["status"]["nodes"][0]
    set_node_ready(kubectl, lost, False)
    try:
        unready = wait_for(lambda: phase_is(kubectl, name, "Running")
                           if job(kubectl, name)["status"].get("reason") == "NodeUnready" else None,
                           timeout=30, what="the gang waiting out the node's grace")
        assert f"node {lost} is NotReady" in unready["status"]["message"]
        assert unready["status"]["restarts"] == 0
        again = wait_for(lambda: phase_is(kubectl, name, "Running")
                         if job(kubectl, name)["status"].get("attempt") == 1 else None,
                         timeout=60, what="the gang restarted on healthy nodes")
        assert lost not in again["status"]["nodes"] and lost in again["status"]["excludedNodes"]
        assert again["status"]["reason"] == "AllWorkersRunning"
        assert again["status"]["restarts"] == 1
        restarts = [m for r, m in job_event_messages(kubectl, name) if r == "GangRestart"]
        assert len(restarts) == 1 and f"node {lost} is NotReady" in restarts[0]
    finally:
        set_node_ready(kubectl, lost, True)


def test_a_short_not_ready_blip_restarts_nothing(kubectl: Kubectl, gpu_cluster: str) -> None:
    """Kubelets miss heartbeats; a 3 s NotReady is inside the default 60 s grace."""
    name = unique("blip")
    kubectl.apply(training_job(name, gpu_cluster, workers=2))
    running = wait_phase(kubectl, name, "Running")
    blipped = running["status"]["nodes"][1]
    set_node_ready(kubectl, blipped, False)
    try:
        wait_for(lambda: job(kubectl, name)["status"].get("reason") == "NodeUnready", timeout=15,
                 what="the operator noticing the NotReady node")
        time.sleep(3)
    finally:
        set_node_ready(kubectl, blipped, True)
    wait_for(lambda: job(kubectl, name)["status"].get("reason") == "AllWorkersRunning", timeout=60,
             what="the gang back to AllWorkersRunning")
    time.sleep(3)
    after = job(kubectl, name)["status"]
    assert (after["phase"], after["attempt"], after["restarts"]) == ("Running", 0, 0)
    assert after["nodes"] == running["status"]["nodes"]
    assert "GangRestart" not in job_events(kubectl, name)
    assert {"NodeUnready", "NodeRecovered"} <= set(job_events(kubectl, name))


def test_an_edit_that_ends_a_gang_frees_its_gpus_before_they_are_promised_again(
        kubectl: Kubectl, gpu_cluster: str) -> None:
    """The bug of a GPU promised twice: a running 3-worker gang's spec edited
    into one the operator refuses; its pods must be gone before a 4-worker
    job takes every node. A shape edit is refused by the API server."""
    first = unique("edited")
    kubectl.apply(training_job(first, gpu_cluster, workers=3))
    running = wait_phase(kubectl, first, "Running")
    refused = kubectl.run("patch", "tj", first, "-n", "default", "--type=merge",
                          "-p", '{"spec": {"pool": "no-such-pool"}}', check=False)
    assert refused.returncode != 0 and "immutable while the job is Admitted or Running" in refused.stderr
    kubectl.run("patch", "tj", first, "-n", "default", "--type=merge",
                "-p", '{"spec": {"priorityClassName": "no-such-class"}}')
    failed = wait_phase(kubectl, first, "Failed")
    assert failed["status"]["reason"] == "UnknownPriorityClass"
    assert "spec.priorityClassName" in failed["status"]["message"]
    second = unique("whole")
    kubectl.apply(training_job(second, gpu_cluster, workers=4))
    admitted = wait_phase(kubectl, second, "Admitted", "Running")
    assert sorted(admitted["status"]["nodes"]) == sorted(
        n["metadata"]["name"] for n in kubectl.get("nodes", "-l", f"gpucluster.dev/cluster={gpu_cluster}")["items"])
    assert worker_pods(kubectl, first) == [], "the edited gang's pods are gone before its GPUs are promised again"
    assert running["status"]["nodes"]


def test_deadline_fails_the_job(kubectl: Kubectl, gpu_cluster: str) -> None:
    name = unique("short")
    kubectl.apply(training_job(name, gpu_cluster, workers=1, activeDeadlineSeconds=2))
    failed = wait_phase(kubectl, name, "Failed", timeout=30)
    assert failed["status"]["reason"] == "DeadlineExceeded"


def test_jobs_that_can_never_fit_fail_with_the_field_named(kubectl: Kubectl, gpu_cluster: str) -> None:
    cases = {
        "LargerThanPool": (training_job(unique("huge"), gpu_cluster, workers=5), "spec.workers=5"),
        "TopologyNeverFits": (training_job(unique("rack"), gpu_cluster, workers=3,
                                           topology={"level": "rack", "mode": "required"}), "spec.topology"),
        "UnknownCluster": (training_job(unique("lost"), "no-such-cluster", workers=1), "spec.cluster"),
        "UnknownPool": (training_job(unique("pool"), gpu_cluster, workers=1) | {}, "spec.pool"),
    }
    cases["UnknownPool"][0]["spec"]["pool"] = "a100"
    for reason, (manifest, field) in cases.items():
        kubectl.apply(manifest)
        failed = wait_phase(kubectl, manifest["metadata"]["name"], "Failed")
        assert failed["status"]["reason"] == reason
        assert field in failed["status"]["message"]
        assert reason in job_events(kubectl, manifest["metadata"]["name"])
    # Fixing the spec requeues the job: nothing the user wrote is lost.
    fixed = cases["UnknownPool"][0]
    kubectl.run("patch", "tj", "-n", "default", fixed["metadata"]["name"], "--type=merge",
                "-p", '{"spec": {"pool": "h100"}}')
    wait_phase(kubectl, fixed["metadata"]["name"], "Running")


BAD_JOBS = [
    ("gpusPerWorker 9", {"gpusPerWorker": 9}, "spec.gpusPerWorker: Invalid value: 9"),
    ("no pool nor gpu", {"pool": None}, "set spec.pool"),
    ("zero workers", {"workers": 0}, "spec.workers: Invalid value: 0"),
    ("no containers", {"template": {"spec": {"containers": []}}}, "spec.template.spec.containers"),
    ("bad topology level", {"topology": {"level": "row"}}, "spec.topology.level: Unsupported value"),
    ("priority and class", {"priority": 1, "priorityClassName": "high"}, "not both"),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_bad_jobs_are_rejected_by_the_schema(kubectl: Kubectl, crds: None, case: str,
                                             change: dict[str, Any], message: str) -> None:
    manifest = training_job(unique("bad"), "colossus", workers=1)
    manifest["spec"].update(change)
    manifest["spec"] = {k: v for k, v in manifest["spec"].items() if v is not None}
    result = kubectl.apply(manifest, check=False)
    assert result.returncode != 0, f"{case} was accepted"
    assert message in result.stderr, result.stderr


def test_deadlock_plain_pods_versus_gangs(kubectl: Kubectl, gpu_cluster: str) -> None:
    """Two jobs that each need 3 of the 4 nodes. As plain pods through the
    default scheduler both end partly placed and neither can run; as
    TrainingJobs one runs whole, then the other."""
    plain = []
    # Interleaved, as two jobs' pods arrive at a busy scheduler.
    for rank in range(3):
        for job_name in ("plain-a", "plain-b"):
            pod = f"{job_name}-{rank}-{uuid.uuid4().hex[:4]}"
            plain.append(pod)
            kubectl.apply({"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": pod, "namespace": "default", "labels": {"deadlock": job_name}},
                           "spec": {"nodeSelector": {"gpucluster.dev/cluster": gpu_cluster},
                                    "containers": [{"name": "t", "image": "pytorch", "resources": {
                                        "limits": {"nvidia.com/gpu": "8"}}}]}})

    def bound(job_name: str) -> int:
        pods = kubectl.get("pods", "-n", "default", "-l", f"deadlock={job_name}")["items"]
        return sum(1 for p in pods if p["spec"].get("nodeName"))

    wait_for(lambda: bound("plain-a") + bound("plain-b") == 4, what="the scheduler filling the pool")
    placed = (bound("plain-a"), bound("plain-b"))
    assert placed == (2, 2), f"each job holds 2 of the 3 nodes it needs and neither can run: {placed}"
    kubectl.run("delete", "pod", "-n", "default", *plain, "--grace-period=0", "--force")

    first, second = unique("gang-a"), unique("gang-b")
    kubectl.apply(training_job(first, gpu_cluster, workers=3))
    kubectl.apply(training_job(second, gpu_cluster, workers=3))
    wait_phase(kubectl, first, "Running")
    waiting = job(kubectl, second)
    assert waiting["status"]["phase"] == "Queued" and worker_pods(kubectl, second) == []
    for pod in worker_pods(kubectl, first):
        finish_pod(kubectl, "default", pod["metadata"]["name"], 0)
    wait_phase(kubectl, first, "Succeeded")
    wait_phase(kubectl, second, "Running")
    assert len(worker_pods(kubectl, second)) == 3


def test_priority_class_name_sets_the_priority(kubectl: Kubectl, gpu_cluster: str) -> None:
    klass = unique("urgent")
    kubectl.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                   "metadata": {"name": klass}, "value": 12345, "description": "test"})
    name = unique("classy")
    try:
        kubectl.apply(training_job(name, gpu_cluster, workers=1, priorityClassName=klass))
        running = wait_phase(kubectl, name, "Running")
        assert running["status"]["priority"] == 12345
        missing = unique("noclass")
        kubectl.apply(training_job(missing, gpu_cluster, workers=1, priorityClassName="no-such-class"))
        failed = wait_phase(kubectl, missing, "Failed")
        assert failed["status"]["reason"] == "UnknownPriorityClass"
        assert "spec.priorityClassName" in failed["status"]["message"]
    finally:
        kubectl.run("delete", "priorityclass", klass)
