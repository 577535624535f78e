"""End to end on kind, where a Docker engine is: the chart installed from the
image hack/kind-e2e.sh built, with the fake GPU device plugin on every node
and the node agent (fake GPUs) on the node labelled as a GPU node.

Skipped unless KIND_CLUSTER names the cluster (hack/kind-e2e.sh sets it and
KUBECONFIG); run with `pytest -m kind tests/e2e`."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ..integration.harness import Kubectl, wait_for

pytestmark = [
    pytest.mark.kind,
    pytest.mark.skipif(not os.environ.get("KIND_CLUSTER"),
                       reason="needs a kind cluster with the chart installed: hack/kind-e2e.sh"),
]

NAMESPACE = os.environ.get("GPUCLUSTER_E2E_NAMESPACE", "gpucluster-system")
IMAGE = os.environ.get("GPUCLUSTER_E2E_IMAGE", "gpucluster:e2e")
GPUS_PER_NODE = 8  # the chart's devicePlugin.gpus


@pytest.fixture(scope="module")
def kubectl() -> Kubectl:
    from gpucluster import devcluster

    built = devcluster.bin_dir() / "kubectl"
    binary = built if built.exists() else shutil.which("kubectl")
    assert binary, "kubectl: hack/build-binaries.sh builds it"
    return Kubectl(os.environ["KUBECONFIG"], str(os.path.dirname(binary)))


def allocatable_gpus(node: dict[str, Any]) -> int:
    return int(node["status"].get("allocatable", {}).get("nvidia.com/gpu", "0"))


def gpu_node(kubectl: Kubectl) -> dict[str, Any]:
    nodes = kubectl.get("nodes", "-l", "nvidia.com/gpu.present=true")["items"]
    assert nodes, "hack/kind-e2e.sh labels the worker nvidia.com/gpu.present=true"
    return dict(nodes[0])


def test_the_operator_is_available_and_holds_the_peering(kubectl: Kubectl) -> None:
    kubectl.run("-n", NAMESPACE, "rollout", "status", "deployment", "-l",
                "app.kubernetes.io/component=operator", "--timeout=180s")
    peering = wait_for(lambda: kubectl.get("clusterkopfpeering", "gpucluster").get("status"), timeout=60,
                       what="the operator's keep-alive in the peering object")
    assert len(peering) == 1


def test_the_device_plugin_offers_fake_gpus_on_every_node(kubectl: Kubectl) -> None:
    kubectl.run("-n", NAMESPACE, "rollout", "status", "daemonset", "-l",
                "app.kubernetes.io/component=device-plugin", "--timeout=180s")

    def every_node_offers() -> bool:
        nodes = kubectl.get("nodes")["items"]
        return bool(nodes) and all(allocatable_gpus(n) == GPUS_PER_NODE for n in nodes)
    wait_for(every_node_offers, timeout=120, interval=2, what=f"{GPUS_PER_NODE} nvidia.com/gpu on every node")


def test_the_agent_writes_its_nodes_gpu_verdict(kubectl: Kubectl) -> None:
    kubectl.run("-n", NAMESPACE, "rollout", "status", "daemonset", "-l",
                "app.kubernetes.io/component=agent", "--timeout=180s")

    def verdict() -> dict[str, Any] | None:
        node = gpu_node(kubectl)
        return next((c for c in node["status"].get("conditions", []) if c["type"] == "GPUHealthy"), None)
    condition = wait_for(verdict, timeout=120, interval=2, what="GPUHealthy on the GPU node")
    assert (condition["status"], condition["reason"]) == ("True", "GPUsHealthy")
    assert gpu_node(kubectl)["metadata"]["annotations"]["gpucluster.dev/healthy-gpus"] == str(GPUS_PER_NODE)


@pytest.fixture()
def gpu_pod(kubectl: Kubectl) -> Iterator[str]:
    name = f"gpu-smoke-{uuid.uuid4().hex[:5]}"
    node = gpu_node(kubectl)["metadata"]["name"]
    kubectl.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
        "spec": {"restartPolicy": "Never", "nodeSelector": {"kubernetes.io/hostname": node},
                 "containers": [{"name": "smoke", "image": IMAGE, "imagePullPolicy": "Never",
                                 "command": ["python", "-c",
                                             "import os; print(os.environ['NVIDIA_VISIBLE_DEVICES'])"],
                                 "resources": {"limits": {"nvidia.com/gpu": "2"}}}]}})
    yield name
    kubectl.run("delete", "pod", "-n", "default", name, "--wait=false", check=False)


def test_a_pod_asking_for_gpus_runs_with_them(kubectl: Kubectl, gpu_pod: str) -> None:
    wait_for(lambda: (kubectl.get("pod", "-n", "default", gpu_pod).get("status") or {}).get("phase")
             == "Succeeded", timeout=120, interval=2, what=f"{gpu_pod} Succeeded")
    visible = kubectl.run("logs", "-n", "default", gpu_pod).stdout.strip().split(",")
    # The device plugin's Allocate names the two GPUs it gave, by UUID.
    assert len(visible) == 2 and all(re.fullmatch(r"GPU-[0-9a-f-]{36}", v) for v in visible), visible


def test_an_injected_fault_takes_the_gpu_out_of_allocatable(kubectl: Kubectl) -> None:
    node = gpu_node(kubectl)["metadata"]["name"]
    kubectl.run("annotate", "node", node, "--overwrite", "gpucluster.dev/inject-fault=gpu=3,xid=79")
    try:
        wait_for(lambda: allocatable_gpus(kubectl.get("node", node)) == GPUS_PER_NODE - 1, timeout=60,
                 interval=2, what="the faulty GPU reported Unhealthy to the kubelet")
    finally:
        kubectl.run("annotate", "node", node, "--overwrite", "gpucluster.dev/inject-fault=gpu=all,fault=reset")
    wait_for(lambda: allocatable_gpus(kubectl.get("node", node)) == GPUS_PER_NODE, timeout=60, interval=2,
             what="the GPU back after its reset")
