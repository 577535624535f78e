"""TrainingCluster against the real API server, with the operator running as
a real process and KWOK running the nodes it creates."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest
from gpucluster.kube.nodes import kwok_shard_of

from .harness import Kubectl, OperatorProcess, wait_for

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:5]}"


def pool(name: str = "h100", nodes: int = 3, **extra: Any) -> dict[str, Any]:
    return {"name": name, "gpu": "H100-80GB-HBM3", "nodes": nodes,
            "topology": {"nodesPerRack": 2, "racksPerBlock": 2}, **extra}


def training_cluster(name: str, *pools: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "gpucluster.dev/v1alpha1", "kind": "TrainingCluster",
            "metadata": {"name": name}, "spec": {"pools": list(pools)}}


def nodes_of(kubectl: Kubectl, cluster: str, pool_name: str | None = None) -> list[dict[str, Any]]:
    selector = f"gpucluster.dev/cluster={cluster}" + (
        f",gpucluster.dev/pool={pool_name}" if pool_name else "")
    return list(kubectl.get("nodes", "-l", selector)["items"])


def ready_count(nodes: list[dict[str, Any]]) -> int:
    return sum(1 for n in nodes for c in n["status"].get("conditions", [])
               if c["type"] == "Ready" and c["status"] == "True")


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions", []):
        if cond["type"] == kind:
            return dict(cond)
    return {}


def events_of(kubectl: Kubectl, name: str) -> list[dict[str, Any]]:
    return list(kubectl.get("events", "-A", "--field-selector",
                            f"involvedObject.kind=TrainingCluster,involvedObject.name={name}")["items"])


def wait_ready(kubectl: Kubectl, name: str, nodes: int, timeout: float = 60) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        tc = kubectl.get("tc", name)
        status = tc.get("status") or {}
        ok = (condition(tc, "Ready").get("status") == "True"
              and status.get("nodes") == f"{nodes}/{nodes}"
              and status.get("observedGeneration") == tc["metadata"]["generation"])
        return tc if ok else None
    return wait_for(settled, timeout=timeout, what=f"{name} Ready with {nodes} nodes")


def test_apply_scale_up_scale_down_and_delete(kubectl: Kubectl, running_operator: OperatorProcess) -> None:
    name = unique("tc")
    kubectl.apply(training_cluster(name, pool("h100", 4, labels={"team": "pretraining"}),
                                   pool("h200", 2, gpu="H200-141GB", gpusPerNode=4)))
    tc = wait_ready(kubectl, name, 6)
    assert tc["status"]["readyGPUs"] == 4 * 8 + 2 * 4
    assert {p["name"]: (p["readyNodes"], p["readyGPUs"]) for p in tc["status"]["pools"]} == {
        "h100": (4, 32), "h200": (2, 8)}
    h100 = sorted(nodes_of(kubectl, name, "h100"), key=lambda n: n["metadata"]["name"])
    labels = h100[3]["metadata"]["labels"]
    assert h100[3]["metadata"]["name"] == f"{name}-h100-00003"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.memory"] == "81559"
    assert labels["nvidia.com/gpu.family"] == "hopper"
    assert (labels["gpucluster.dev/rack"], labels["gpucluster.dev/block"]) == ("r0001", "b000")
    assert labels["team"] == "pretraining"
    assert h100[3]["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert labels["gpucluster.dev/kwok-shard"] == kwok_shard_of(f"{name}-h100-00003")
    h200 = nodes_of(kubectl, name, "h200")
    assert h200[0]["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H200"
    assert h200[0]["metadata"]["labels"]["nvidia.com/gpu.memory"] == "143771"
    assert h200[0]["status"]["allocatable"]["nvidia.com/gpu"] == "4"

    printed = kubectl.run("get", "tc", name).stdout
    assert "h100,h200" in printed and "6/6" in printed and "40" in printed

    kubectl.run("patch", "tc", name, "--type=json", "-p",
                json.dumps([{"op": "replace", "path": "/spec/pools/0/nodes", "value": 7}]))
    wait_ready(kubectl, name, 9)
    kubectl.run("patch", "tc", name, "--type=json", "-p",
                json.dumps([{"op": "replace", "path": "/spec/pools/0/nodes", "value": 1}]))
    wait_ready(kubectl, name, 3)
    assert [n["metadata"]["name"] for n in nodes_of(kubectl, name, "h100")] == [f"{name}-h100-00000"]
    reasons = {e["reason"] for e in events_of(kubectl, name)}
    assert {"NodesCreated", "NodesDeleted"} <= reasons

    kubectl.delete_cluster(name)
    assert nodes_of(kubectl, name) == []


def test_scale_down_drains_a_busy_node_and_deletes_empty_ones_first(
        kubectl: Kubectl, running_operator: OperatorProcess) -> None:
    name = unique("tc")
    kubectl.apply(training_cluster(name, pool("h100", 3)))
    wait_ready(kubectl, name, 3)
    busy = f"{name}-h100-00002"
    pod = f"{name}-worker"
    kubectl.apply({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": pod, "namespace": "default"},
                   "spec": {"nodeName": busy, "containers": [{
                       "name": "train", "image": "pytorch",
                       "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}})
    wait_for(lambda: kubectl.get("pod", pod)["status"].get("phase") == "Running", what="pod Running")
    wait_for(lambda: busy in running_operator.log_tail(200) or True, timeout=1)

    kubectl.run("patch", "tc", name, "--type=json", "-p",
                json.dumps([{"op": "replace", "path": "/spec/pools/0/nodes", "value": 1}]))
    wait_ready(kubectl, name, 1)
    assert [n["metadata"]["name"] for n in nodes_of(kubectl, name)] == [busy], \
        "the empty nodes go first; the busy one stays"

    kubectl.run("patch", "tc", name, "--type=json", "-p",
                json.dumps([{"op": "replace", "path": "/spec/pools/0/nodes", "value": 0}]))
    # Drained through the Eviction API (the pod is deleted), then the node goes.
    wait_for(lambda: nodes_of(kubectl, name) == [], timeout=60, what="busy node drained and deleted")
    assert kubectl.run("get", "pod", pod, check=False).returncode != 0
    assert "NodesDraining" in {e["reason"] for e in events_of(kubectl, name)}
    kubectl.delete_cluster(name)


def test_restart_mid_scale_up_neither_loses_nor_doubles_a_node(
        kubectl: Kubectl, running_operator: OperatorProcess) -> None:
    name = unique("tc")
    total = 400
    kubectl.apply(training_cluster(name, pool("h100", total)))
    wait_for(lambda: len(nodes_of(kubectl, name)) >= 20, timeout=60, interval=0.05,
             what="the scale-up to begin")
    running_operator.kill()
    assert len(nodes_of(kubectl, name)) < total, "the kill came too late to test anything"
    running_operator.start()
    wait_ready(kubectl, name, total, timeout=180)
    names = sorted(n["metadata"]["name"] for n in nodes_of(kubectl, name))
    assert names == [f"{name}-h100-{i:05d}" for i in range(total)]
    kubectl.delete_cluster(name)
    assert nodes_of(kubectl, name) == []


def test_an_edit_during_scale_up_converges_to_the_newest_spec(
        kubectl: Kubectl, running_operator: OperatorProcess) -> None:
    name = unique("tc")
    kubectl.apply(training_cluster(name, pool("h100", 2500)))
    wait_for(lambda: len(nodes_of(kubectl, name)) >= 10, timeout=60, interval=0.05,
             what="the scale-up to begin")
    kubectl.run("patch", "tc", name, "--type=json", "-p",
                json.dumps([{"op": "replace", "path": "/spec/pools/0/nodes", "value": 5}]))
    wait_ready(kubectl, name, 5, timeout=180)
    assert len(nodes_of(kubectl, name)) == 5
    kubectl.delete_cluster(name)


def test_static_pool_adopts_and_releases_and_a_second_claim_is_degraded(
        kubectl: Kubectl, running_operator: OperatorProcess) -> None:
    rack = unique("rack")
    machines = [f"{rack}-m{i}" for i in range(3)]
    for machine in machines:
        kubectl.apply({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": machine, "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {"datacenter-rack": rack, "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
            "status": {"allocatable": {"nvidia.com/gpu": "8", "cpu": "224", "memory": "2Ti",
                                       "pods": "110"},
                       "capacity": {"nvidia.com/gpu": "8", "cpu": "224", "memory": "2Ti",
                                    "pods": "110"}}})
    owner, rival = unique("tc"), unique("tc")
    static = pool("metal", 2, provider="static", nodeSelector={"datacenter-rack": rack},
                  taints=[{"key": "dedicated", "value": "training", "effect": "NoSchedule"}])
    kubectl.apply(training_cluster(owner, static))
    wait_ready(kubectl, owner, 2)
    adopted = sorted(n["metadata"]["name"] for n in nodes_of(kubectl, owner))
    assert adopted == machines[:2]
    node = kubectl.get("node", machines[0])
    assert node["metadata"]["labels"]["gpucluster.dev/pool"] == "metal"
    assert node["metadata"]["labels"]["nvidia.com/gpu.family"] == "hopper"
    assert {"key": "dedicated", "value": "training", "effect": "NoSchedule"} in node["spec"]["taints"]

    kubectl.apply(training_cluster(rival, copy.deepcopy(static)))
    degraded = wait_for(lambda: condition(kubectl.get("tc", rival), "Degraded")
                        if condition(kubectl.get("tc", rival), "Degraded").get("status") == "True"
                        else None, what="the rival Degraded")
    assert degraded["reason"] == "StaticNodesClaimed"
    assert machines[0] in degraded["message"]
    assert nodes_of(kubectl, rival) == [], "a conflicting claim changes nothing"
    warning = [e for e in events_of(kubectl, rival) if e["reason"] == "StaticNodesClaimed"]
    assert warning and warning[0]["type"] == "Warning"
    kubectl.delete_cluster(rival)

    kubectl.delete_cluster(owner)
    for machine in machines[:2]:
        node = kubectl.get("node", machine)
        assert "gpucluster.dev/cluster" not in node["metadata"]["labels"]
        assert "nvidia.com/gpu.family" not in node["metadata"]["labels"], "added labels are removed"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3", \
            "labels the node had before are kept"
        assert not node["spec"].get("taints")
    kubectl.run("delete", "node", *machines)


BAD_MANIFESTS = [
    ("duplicate pool names", [pool("a"), pool("a")], "Duplicate value"),
    ("unknown GPU", [pool(gpu="A100-40GB")], 'spec.pools[0].gpu: Unsupported value: "A100-40GB"'),
    ("gpusPerNode 9", [pool(gpusPerNode=9)], "spec.pools[0].gpusPerNode: Invalid value: 9"),
    ("gpusPerNode 0", [pool(gpusPerNode=0)], "spec.pools[0].gpusPerNode: Invalid value: 0"),
    ("negative nodes", [pool(nodes=-1)], "spec.pools[0].nodes: Invalid value: -1"),
    ("static without nodeSelector", [pool(provider="static")],
     "spec.pools[0].nodeSelector: Required value: nodeSelector is required when provider is static"),
    ("kwok with nodeSelector", [pool(nodeSelector={"a": "b"})],
     "spec.pools[0].nodeSelector: Forbidden: nodeSelector is only for provider static"),
    ("pool name not a label value", [pool(name="H100_Pool!")], "spec.pools[0].name: Invalid value"),
    ("label value invalid", [pool(labels={"team": "not a label value"})],
     "spec.pools[0].labels[team]: Invalid value"),
    ("unknown field", [pool(gpusPerNodes=8)], 'unknown field "spec.pools[0].gpusPerNodes"'),
]


@pytest.mark.parametrize(("case", "pools", "message"), BAD_MANIFESTS, ids=[c[0] for c in BAD_MANIFESTS])
def test_bad_manifests_are_rejected_with_the_field_named(
        kubectl: Kubectl, crds: None, case: str, pools: list[dict[str, Any]], message: str) -> None:
    result = kubectl.apply(training_cluster(unique("bad"), *pools), check=False)
    assert result.returncode != 0, f"{case} was accepted"
    assert message in result.stderr, result.stderr


def test_cluster_name_that_cannot_be_a_label_value_is_rejected(kubectl: Kubectl, crds: None) -> None:
    result = kubectl.apply(training_cluster("a" * 40, pool()), check=False)
    assert result.returncode != 0
    assert "metadata.name must be a DNS label of at most 30 characters" in result.stderr
