"""The local control plane itself: KWOK GPU nodes, the real scheduler, RBAC."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from .harness import Kubectl, node_ready, wait_for

pytestmark = pytest.mark.integration

H100_GFD_LABELS = {
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.count": "8",
    "nvidia.com/gpu.memory": "81559",
    "nvidia.com/gpu.family": "hopper",
    "nvidia.com/gpu.compute.major": "9",
    "nvidia.com/gpu.compute.minor": "0",
}


def fake_h100_node(name: str) -> dict[str, object]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                     "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                                "foundation-test": "true", **H100_GFD_LABELS}},
        "status": {"capacity": {"cpu": "224", "memory": "2Ti", "pods": "110",
                                "nvidia.com/gpu": "8"},
                   "allocatable": {"cpu": "220", "memory": "2000Gi", "pods": "110",
                                   "nvidia.com/gpu": "8"}},
    }


def gpu_pod(name: str, node_name: str, gpus: int = 8) -> dict[str, object]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node_name},
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "train", "image": "nvcr.io/nvidia/pytorch:25.01-py3",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        },
    }


def test_kwok_h100_node_becomes_ready_with_gfd_labels(kubectl: Kubectl) -> None:
    name = f"foundation-{uuid.uuid4().hex[:6]}"
    kubectl.apply(fake_h100_node(name))
    try:
        wait_for(lambda: node_ready(kubectl, name), timeout=30, what=f"node {name} Ready")
        node = kubectl.get("node", name)
        assert {k: node["metadata"]["labels"][k] for k in H100_GFD_LABELS} == H100_GFD_LABELS
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    finally:
        kubectl.run("delete", "node", name, "--wait=false")


def test_scheduler_binds_8_gpu_pod_and_leaves_second_pending(kubectl: Kubectl) -> None:
    name = f"foundation-{uuid.uuid4().hex[:6]}"
    kubectl.apply(fake_h100_node(name))
    first, second = f"{name}-a", f"{name}-b"
    try:
        wait_for(lambda: node_ready(kubectl, name), timeout=30, what=f"node {name} Ready")
        kubectl.apply(gpu_pod(first, name))
        wait_for(lambda: kubectl.get("pod", first)["status"].get("phase") == "Running",
                 timeout=30, what=f"{first} Running")
        assert kubectl.get("pod", first)["spec"]["nodeName"] == name
        kubectl.apply(gpu_pod(second, name))

        def unschedulable_message() -> str:
            pod = kubectl.get("pod", second)
            for cond in pod["status"].get("conditions", []):
                if cond["type"] == "PodScheduled" and cond["status"] == "False":
                    return str(cond.get("message", ""))
            return ""

        message = wait_for(unschedulable_message, timeout=30, what=f"{second} unschedulable")
        assert "Insufficient nvidia.com/gpu" in message
        assert kubectl.get("pod", second)["status"]["phase"] == "Pending"
    finally:
        kubectl.run("delete", "pod", first, second, "--grace-period=0", "--force",
                    "--ignore-not-found", check=False)
        kubectl.run("delete", "node", name, "--wait=false")


def test_rbac_forbids_a_service_account_without_a_role(kubectl: Kubectl) -> None:
    account = f"norole-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "serviceaccount", "-n", "default", account)
    try:
        token = kubectl.run("create", "token", "-n", "default", account).stdout.strip()
        config = json.loads(Path(kubectl.kubeconfig).read_text())
        server = config["clusters"][0]["cluster"]["server"]
        ca = config["clusters"][0]["cluster"]["certificate-authority"]
        request = urllib.request.Request(f"{server}/api/v1/namespaces/default/pods",
                                         headers={"Authorization": f"Bearer {token}"})
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(request, context=ssl.create_default_context(cafile=ca))
        assert denied.value.code == 403
        body = json.loads(denied.value.read())
        assert body["reason"] == "Forbidden"
        assert f"system:serviceaccount:default:{account}" in body["message"]
        # The token itself is valid: the API server knows who is asking.
        who = kubectl.run("auth", "can-i", "list", "pods", "-n", "default",
                          f"--as=system:serviceaccount:default:{account}", check=False)
        assert who.stdout.strip() == "no"
    finally:
        kubectl.run("delete", "serviceaccount", "-n", "default", account)
