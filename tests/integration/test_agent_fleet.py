"""The agent's fleet mode against the real API server and KWOK: it writes
GPUHealthy and the GPU annotations onto KWOK GPU nodes in one patch of
nodes/status, follows faults injected with kubectl, keeps the conditions
KWOK writes, and writes nothing more once nodes show their verdicts."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from gpucluster.agent.exporter import DcgmCollector
from gpucluster.agent.fleet import Fleet, FleetRunner, fleet_watcher
from gpucluster.agent.nodestatus import KubeNodeClient, connect
from gpucluster.names import (
    ANNOTATION_HEALTHY_GPUS,
    ANNOTATION_INJECT_FAULT,
    ANNOTATION_UNHEALTHY_GPUS,
    CONDITION_GPU_HEALTHY,
)

from .harness import Kubectl, wait_for

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:6]
SELECTOR = f"agent-fleet-test={RUN}"
PRODUCTS = {"h100": "NVIDIA-H100-80GB-HBM3", "h200": "NVIDIA-H200"}


def kwok_node(name: str, product: str, kwok: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"} if kwok else {},
            "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                       "agent-fleet-test": RUN, "nvidia.com/gpu.product": product,
                       "nvidia.com/gpu.count": "8"},
        },
        "status": {"capacity": {"cpu": "224", "memory": "2Ti", "pods": "110",
                                "nvidia.com/gpu": "8"},
                   "allocatable": {"cpu": "220", "memory": "2000Gi", "pods": "110",
                                   "nvidia.com/gpu": "8"}},
    }


NODES = [f"fleet-{RUN}-h100-{i}" for i in range(3)] + [f"fleet-{RUN}-h200-0"]
NOT_KWOK = f"fleet-{RUN}-real-0"


def start_fleet(kubeconfig: str) -> FleetRunner:
    core = connect(kubeconfig, pool_size=6)
    fleet = Fleet(KubeNodeClient(core))
    watcher = fleet_watcher(core, fleet, node_selector=SELECTOR, watch_timeout_s=30)
    runner = FleetRunner(fleet, watcher, interval=1.0, writers=4)
    runner.start()
    return runner


@pytest.fixture(scope="module")
def nodes(kubectl: Kubectl) -> Iterator[list[str]]:
    for name in NODES:
        kubectl.apply(kwok_node(name, PRODUCTS[name.split("-")[2]]))
    kubectl.apply(kwok_node(NOT_KWOK, PRODUCTS["h100"], kwok=False))
    yield NODES
    kubectl.run("delete", "node", *NODES, NOT_KWOK, "--wait=false", check=False)


@pytest.fixture(scope="module")
def fleet(nodes: list[str], kubeconfig: str) -> Iterator[FleetRunner]:
    runner = start_fleet(kubeconfig)
    yield runner
    runner.stop()


def condition(kubectl: Kubectl, name: str, type_: str = CONDITION_GPU_HEALTHY) -> dict | None:
    node = kubectl.get("node", name)
    return next((c for c in node["status"].get("conditions", []) if c["type"] == type_), None)


def annotations(kubectl: Kubectl, name: str) -> dict[str, str]:
    return kubectl.get("node", name)["metadata"].get("annotations", {})


def writers_of_our_fields(kubectl: Kubectl, name: str) -> tuple[list[dict], list[dict]]:
    """The managedFields entries that own the healthy-gpus annotation, and
    those that own the GPUHealthy condition."""
    entries = kubectl.get("node", name, "--show-managed-fields")["metadata"].get("managedFields", [])
    fields = [entry.get("fieldsV1", {}) for entry in entries]
    annotation = [entry for entry, f in zip(entries, fields, strict=True)
                  if f"f:{ANNOTATION_HEALTHY_GPUS}" in f.get("f:metadata", {}).get("f:annotations", {})]
    key = 'k:' + json.dumps({"type": CONDITION_GPU_HEALTHY}, separators=(",", ":"))
    condition = [entry for entry, f in zip(entries, fields, strict=True)
                 if key in f.get("f:status", {}).get("f:conditions", {})]
    return annotation, condition


def shows(kubectl: Kubectl, name: str, status: str, reason: str) -> dict | None:
    found = condition(kubectl, name)
    return found if found and (found["status"], found["reason"]) == (status, reason) else None


def test_every_kwok_gpu_node_gets_its_verdict(kubectl: Kubectl, fleet: FleetRunner) -> None:
    for name in NODES:
        found = wait_for(lambda n=name: shows(kubectl, n, "True", "GPUsHealthy"), timeout=60,
                         what=f"GPUHealthy=True on {name}")
        assert found["message"] == "all 8 GPUs healthy"
        assert annotations(kubectl, name)[ANNOTATION_HEALTHY_GPUS] == "8"
        # Annotation and condition went in together, through nodes/status:
        # the API server files them under one manager of the status subresource.
        annotation, ours = writers_of_our_fields(kubectl, name)
        assert annotation and all(entry.get("subresource") == "status" for entry in annotation), annotation
        assert any(entry in ours for entry in annotation), (annotation, ours)
        # KWOK's conditions stay beside ours.
        wait_for(lambda n=name: condition(kubectl, n, "Ready"), timeout=60,
                 what=f"KWOK's Ready condition on {name}")
    assert condition(kubectl, NOT_KWOK) is None
    assert sorted(fleet.fleet.node_names()) == sorted(NODES)


def test_an_injected_fault_turns_the_node_unhealthy(kubectl: Kubectl, fleet: FleetRunner) -> None:
    name = NODES[0]
    wait_for(lambda: shows(kubectl, name, "True", "GPUsHealthy"), timeout=60)
    kubectl.run("annotate", "node", name, "--overwrite", f"{ANNOTATION_INJECT_FAULT}=gpu=3,xid=79")
    broken = wait_for(lambda: shows(kubectl, name, "False", "GPUFellOffBus"), timeout=30,
                      what="GPUFellOffBus")
    assert "GPU 3 (GPU-" in broken["message"]
    assert annotations(kubectl, name)[ANNOTATION_HEALTHY_GPUS] == "7"
    assert annotations(kubectl, name)[ANNOTATION_UNHEALTHY_GPUS] == "3"

    # A second fault changes the message, not the status: the transition time stays.
    kubectl.run("annotate", "node", name, "--overwrite",
                f"{ANNOTATION_INJECT_FAULT}=gpu=3,xid=79;gpu=5,fault=overtemp")
    worse = wait_for(lambda: (c := condition(kubectl, name)) and "GPU 5" in c["message"] and c,
                     timeout=30, what="the over-temperature in the message")
    assert worse["lastTransitionTime"] == broken["lastTransitionTime"]
    assert annotations(kubectl, name)[ANNOTATION_UNHEALTHY_GPUS] == "3,5"

    # Clearing the annotation ends the transient fault; the fatal one stays.
    kubectl.run("annotate", "node", name, f"{ANNOTATION_INJECT_FAULT}-")
    wait_for(lambda: annotations(kubectl, name).get(ANNOTATION_UNHEALTHY_GPUS) == "3",
             timeout=30, what="the over-temperature to clear")
    assert shows(kubectl, name, "False", "GPUFellOffBus")

    kubectl.run("annotate", "node", name, "--overwrite",
                f"{ANNOTATION_INJECT_FAULT}=gpu=all,fault=reset")
    wait_for(lambda: shows(kubectl, name, "True", "GPUsHealthy"), timeout=30, what="the reset")
    assert ANNOTATION_UNHEALTHY_GPUS not in annotations(kubectl, name)


@pytest.mark.timeout(600)
def test_no_writes_once_nodes_show_their_verdicts(kubectl: Kubectl, fleet: FleetRunner,
                                                  kubeconfig: str) -> None:
    name = NODES[1]
    wait_for(lambda: shows(kubectl, name, "True", "GPUsHealthy"), timeout=60)
    ready = wait_for(lambda: condition(kubectl, name, "Ready"), timeout=60)
    writes = fleet.fleet.writes_done
    # KWOK's heartbeat rewrites the node's conditions: ours must survive it,
    # and the fleet must not write again because of it. It comes 150 s to
    # 450 s after the node last changed (hack/kwok.yaml: a kubelet's 5
    # minutes on average), here the fleet's verdict.
    wait_for(lambda: (c := condition(kubectl, name, "Ready"))
             and c.get("lastHeartbeatTime") != ready.get("lastHeartbeatTime"),
             timeout=480, interval=2, what="a KWOK heartbeat")
    assert shows(kubectl, name, "True", "GPUsHealthy")
    assert fleet.fleet.writes_done == writes

    # A second fleet (a restart) finds every node showing its verdict.
    restarted = start_fleet(kubeconfig)
    try:
        wait_for(lambda: sorted(restarted.fleet.node_names()) == sorted(NODES), timeout=30)
        wait_for(lambda: all(restarted.fleet.verdict_of(n) for n in NODES), timeout=30)
        assert restarted.fleet.writes_done == 0
    finally:
        restarted.stop()


def test_metrics_for_every_node(fleet: FleetRunner) -> None:
    wait_for(lambda: len(fleet.fleet.node_names()) == len(NODES), timeout=60)
    families = {m.name: m for m in DcgmCollector(fleet.fleet.snapshot).collect()}
    temps = families["DCGM_FI_DEV_GPU_TEMP"].samples
    assert {s.labels["Hostname"] for s in temps} == set(NODES)
    assert len(temps) == 8 * len(NODES)
    h200 = {s.labels["modelName"] for s in temps if "h200" in s.labels["Hostname"]}
    assert h200 == {"NVIDIA H200"}
