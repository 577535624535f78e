"""Writing the verdict onto the Node: the condition, its transition time, the
annotations, only what differs, and all of it in one patch of nodes/status."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from gpucluster.agent.nodestatus import (
    STRATEGIC_MERGE_PATCH,
    KubeNodeClient,
    MemoryNodeClient,
    NodeStatusWriter,
    annotation_changes,
    gpu_condition,
    gpu_condition_of,
    node_matches,
)
from gpucluster.names import (
    ANNOTATION_HEALTHY_GPUS,
    ANNOTATION_UNHEALTHY_GPUS,
    CONDITION_GPU_HEALTHY,
)
from gpucluster.planning.health import GpuReading, XidEvent, node_verdict

NOW = 1_800_000_000.0
T0 = datetime(2027, 1, 15, 8, 0, tzinfo=UTC)
READY = {"type": "Ready", "status": "True", "reason": "KubeletReady",
         "message": "kubelet is posting ready status",
         "lastTransitionTime": "2027-01-01T00:00:00Z"}


def verdict(*lost: int):
    readings = [
        GpuReading(index=i, uuid=f"GPU-{i}", name="NVIDIA H200",
                   xid_events=(XidEvent(79, NOW),) if i in lost else ())
        for i in range(8)
    ]
    return node_verdict(readings, expected_gpus=8, now=NOW)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def new_node(name: str = "gpu-node-1") -> dict:
    return {"metadata": {"name": name, "annotations": {"keep": "me"}},
            "status": {"conditions": [dict(READY)]}}


def test_condition_and_its_transition_time() -> None:
    healthy = gpu_condition(verdict(), None, T0)
    assert healthy == {
        "type": CONDITION_GPU_HEALTHY, "status": "True", "reason": "GPUsHealthy",
        "message": "all 8 GPUs healthy", "lastHeartbeatTime": "2027-01-15T08:00:00Z",
        "lastTransitionTime": "2027-01-15T08:00:00Z",
    }
    later = T0 + timedelta(hours=1)
    still = gpu_condition(verdict(), healthy, later)
    assert still["lastTransitionTime"] == "2027-01-15T08:00:00Z"
    assert still["lastHeartbeatTime"] == "2027-01-15T09:00:00Z"
    broken = gpu_condition(verdict(3), still, later)
    assert (broken["status"], broken["reason"]) == ("False", "GPUFellOffBus")
    assert broken["lastTransitionTime"] == "2027-01-15T09:00:00Z"
    # Another fault while already False: the transition time stays.
    worse = gpu_condition(verdict(3, 4), broken, later + timedelta(minutes=5))
    assert worse["lastTransitionTime"] == "2027-01-15T09:00:00Z"


def test_annotation_changes() -> None:
    assert annotation_changes(verdict(), {}) == {ANNOTATION_HEALTHY_GPUS: "8"}
    assert annotation_changes(verdict(), {ANNOTATION_HEALTHY_GPUS: "8"}) == {}
    assert annotation_changes(verdict(2, 5), {ANNOTATION_HEALTHY_GPUS: "8"}) == {
        ANNOTATION_HEALTHY_GPUS: "6", ANNOTATION_UNHEALTHY_GPUS: "2,5",
    }
    assert annotation_changes(verdict(), {ANNOTATION_HEALTHY_GPUS: "6",
                                          ANNOTATION_UNHEALTHY_GPUS: "2,5"}) == {
        ANNOTATION_HEALTHY_GPUS: "8", ANNOTATION_UNHEALTHY_GPUS: None,
    }


def test_writer_writes_what_differs_and_keeps_other_conditions() -> None:
    nodes = MemoryNodeClient([new_node()])
    clock = Clock()
    writer = NodeStatusWriter(nodes, clock)

    assert writer.sync("gpu-node-1", verdict())
    node = nodes.get("gpu-node-1")
    assert node["metadata"]["annotations"] == {"keep": "me", ANNOTATION_HEALTHY_GPUS: "8"}
    assert [c["type"] for c in node["status"]["conditions"]] == ["Ready", CONDITION_GPU_HEALTHY]
    assert node["status"]["conditions"][0] == READY
    assert node_matches(verdict(), node)
    assert nodes.writes == [("gpu-node-1", ("annotations", "condition"))]  # one patch

    clock.now += timedelta(minutes=1)
    assert not writer.sync("gpu-node-1", verdict())  # nothing differs: no write
    assert len(nodes.writes) == 1

    clock.now += timedelta(minutes=1)
    assert writer.sync("gpu-node-1", verdict(7), nodes.get("gpu-node-1"))
    assert nodes.writes[1:] == [("gpu-node-1", ("annotations", "condition"))]
    condition = gpu_condition_of(nodes.get("gpu-node-1"))
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("False", "GPUFellOffBus")
    assert condition["lastTransitionTime"] == "2027-01-15T08:02:00Z"
    assert "GPU 7 (GPU-7)" in condition["message"]
    annotations = nodes.get("gpu-node-1")["metadata"]["annotations"]
    assert annotations[ANNOTATION_UNHEALTHY_GPUS] == "7"


def test_a_condition_written_by_someone_else_is_corrected() -> None:
    node = new_node()
    node["status"]["conditions"].append({
        "type": CONDITION_GPU_HEALTHY, "status": "True", "reason": "Manual", "message": "",
        "lastTransitionTime": "2027-01-01T00:00:00Z",
    })
    node["metadata"]["annotations"][ANNOTATION_HEALTHY_GPUS] = "8"
    nodes = MemoryNodeClient([node])
    assert NodeStatusWriter(nodes, Clock()).sync("gpu-node-1", verdict())
    assert nodes.writes == [("gpu-node-1", ("condition",))]
    condition = gpu_condition_of(nodes.get("gpu-node-1"))
    assert condition is not None and condition["reason"] == "GPUsHealthy"
    assert condition["lastTransitionTime"] == "2027-01-01T00:00:00Z"  # status unchanged


def test_annotations_changed_by_someone_else_are_written_alone() -> None:
    nodes = MemoryNodeClient([new_node()])
    clock = Clock()
    writer = NodeStatusWriter(nodes, clock)
    first = writer.sync("gpu-node-1", verdict())
    written = gpu_condition_of(nodes.get("gpu-node-1"))
    nodes.annotate("gpu-node-1", {ANNOTATION_HEALTHY_GPUS: "3"})  # not the agent's write
    assert len(nodes.writes) == 1

    clock.now += timedelta(minutes=1)
    second = writer.sync("gpu-node-1", verdict())
    assert nodes.writes[1:] == [("gpu-node-1", ("annotations",))]
    assert first is not None and second is not None and int(second) > int(first)
    node = nodes.get("gpu-node-1")
    assert node["metadata"]["annotations"][ANNOTATION_HEALTHY_GPUS] == "8"
    assert gpu_condition_of(node) == written  # the condition untouched, heartbeat too
    assert node["metadata"]["resourceVersion"] == second


def test_memory_client_merges_as_the_api_server_does() -> None:
    nodes = MemoryNodeClient([new_node()])
    other = {"type": "Other", "status": "True"}
    nodes.patch_health("gpu-node-1", {}, other)
    rv = nodes.patch_health("gpu-node-1", {"keep": None, "new": "1"}, dict(READY, status="False"))
    node = nodes.get("gpu-node-1")
    assert node["metadata"]["annotations"] == {"new": "1"}  # null removes
    # Merged by type, in place: Ready keeps its place and its other fields.
    assert [(c["type"], c["status"]) for c in node["status"]["conditions"]] == [
        ("Ready", "False"), ("Other", "True")]
    assert node["status"]["conditions"][0]["reason"] == "KubeletReady"
    # A patch that changes nothing leaves the resourceVersion, but is a write.
    assert nodes.patch_health("gpu-node-1", {"new": "1"}, None) == rv
    assert len(nodes.writes) == 3
    with pytest.raises(ValueError):
        nodes.patch_health("gpu-node-1", {}, None)


class RecordingCore:
    """The CoreV1Api calls KubeNodeClient may make, recorded."""

    class Reply:
        def __init__(self, body: dict[str, Any]) -> None:
            self.data = json.dumps(body).encode()

        def release_conn(self) -> None:
            pass

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []

    def patch_node_status(self, name: str, body: dict[str, Any], **kwargs: Any) -> Reply:
        self.calls.append(("patch_node_status", name, body, kwargs))
        return self.Reply({"metadata": {"name": name, "resourceVersion": "42"}})

    def patch_node(self, name: str, body: dict[str, Any], **kwargs: Any) -> Reply:
        self.calls.append(("patch_node", name, body, kwargs))
        return self.Reply({"metadata": {"name": name, "resourceVersion": "42"}})


def test_kube_client_sends_one_status_patch_with_only_what_differs() -> None:
    core = RecordingCore()
    nodes = KubeNodeClient(core)  # type: ignore[arg-type]
    condition = gpu_condition(verdict(), None, T0)
    assert nodes.patch_health("n", {ANNOTATION_HEALTHY_GPUS: "8",
                                    ANNOTATION_UNHEALTHY_GPUS: None}, condition) == "42"
    nodes.patch_health("n", {ANNOTATION_HEALTHY_GPUS: "7"}, None)
    nodes.patch_health("n", {}, condition)
    assert [call[0] for call in core.calls] == ["patch_node_status"] * 3
    assert [call[2] for call in core.calls] == [
        {"metadata": {"annotations": {ANNOTATION_HEALTHY_GPUS: "8",
                                      ANNOTATION_UNHEALTHY_GPUS: None}},
         "status": {"conditions": [condition]}},
        {"metadata": {"annotations": {ANNOTATION_HEALTHY_GPUS: "7"}}},
        {"status": {"conditions": [condition]}},
    ]
    assert all(call[3]["_content_type"] == STRATEGIC_MERGE_PATCH for call in core.calls)
