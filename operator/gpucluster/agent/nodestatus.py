"""The node agent's kube adapter: writes a verdict onto its Node as the
GPUHealthy condition and the healthy/unhealthy GPU annotations, and reads
the fault-injection annotation of fake nodes.

Writes only what differs from the node as last seen, in one strategic merge
patch of the nodes/status subresource that carries the annotations, the
condition, or both: the Node status strategy keeps the spec as it was but
takes metadata from a status patch, so one request (one resourceVersion, one
watch event) brings the node to its verdict. status.conditions merges by
condition type, so the kubelet's (or KWOK's) conditions stay as they are;
GPUHealthy's lastTransitionTime moves only when its status does.

Needs RBAC: get on nodes and patch on nodes/status, never patch on nodes
(fleet mode also lists and watches nodes: kube/watch.py).
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import kubernetes

from gpucluster.kube.client import read_reply
from gpucluster.names import (
    ANNOTATION_HEALTHY_GPUS,
    ANNOTATION_UNHEALTHY_GPUS,
    CONDITION_GPU_HEALTHY,
)
from gpucluster.planning.health import NodeVerdict

STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class NodeClient(Protocol):
    """The Node calls the agent makes; KubeNodeClient talks to the API server."""

    def get(self, name: str) -> dict[str, Any]: ...

    def patch_health(
        self, name: str, annotations: Mapping[str, str | None],
        condition: Mapping[str, str] | None,
    ) -> str:
        """One patch of the node's status subresource: the annotation changes
        (None removes one; empty for none) and the GPUHealthy condition (None
        for none), at least one of them. Returns the Node's resourceVersion
        after it."""
        ...


def health_patch(
    annotations: Mapping[str, str | None], condition: Mapping[str, str] | None
) -> dict[str, Any]:
    """The body of a patch_health: only the parts it carries."""
    if not annotations and condition is None:
        raise ValueError("a health patch needs annotation changes or a condition")
    body: dict[str, Any] = {}
    if annotations:
        body["metadata"] = {"annotations": dict(annotations)}
    if condition is not None:
        body["status"] = {"conditions": [dict(condition)]}
    return body


def gpu_condition_of(node: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == CONDITION_GPU_HEALTHY:
            return dict(condition)
    return None


def condition_matches(verdict: NodeVerdict, condition: Mapping[str, Any] | None) -> bool:
    return condition is not None and (
        condition.get("status"), condition.get("reason"), condition.get("message")
    ) == (verdict.condition_status, verdict.reason, verdict.message)


def gpu_condition(
    verdict: NodeVerdict, previous: Mapping[str, Any] | None, now: datetime
) -> dict[str, str]:
    """The GPUHealthy node condition for a verdict, keeping the previous
    lastTransitionTime while the status stays the same."""
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    transition = stamp
    if previous is not None and previous.get("status") == verdict.condition_status:
        transition = str(previous.get("lastTransitionTime") or stamp)
    return {
        "type": CONDITION_GPU_HEALTHY,
        "status": verdict.condition_status,
        "reason": verdict.reason,
        "message": verdict.message,
        "lastHeartbeatTime": stamp,
        "lastTransitionTime": transition,
    }


def annotation_changes(
    verdict: NodeVerdict, annotations: Mapping[str, str]
) -> dict[str, str | None]:
    """The annotation writes that bring a node to a verdict (None removes):
    healthy-gpus is the count, unhealthy-gpus the comma-separated indices of
    the unhealthy GPUs, absent when there are none."""
    unhealthy = ",".join(str(index) for index in verdict.unhealthy_indices) or None
    wanted = {ANNOTATION_HEALTHY_GPUS: str(verdict.healthy_gpus),
              ANNOTATION_UNHEALTHY_GPUS: unhealthy}
    return {key: value for key, value in wanted.items() if annotations.get(key) != value}


def node_matches(verdict: NodeVerdict, node: Mapping[str, Any]) -> bool:
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    return condition_matches(verdict, gpu_condition_of(node)) and not annotation_changes(
        verdict, annotations
    )


class NodeStatusWriter:
    def __init__(
        self, nodes: NodeClient, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._nodes = nodes
        self._clock = clock

    def sync(
        self, name: str, verdict: NodeVerdict, node: Mapping[str, Any] | None = None
    ) -> str | None:
        """Bring the node to the verdict; `node` is the node as last seen (read
        when not given), patched once at most. Returns the node's
        resourceVersion after the patch, None when nothing had to be written."""
        if node is None:
            node = self._nodes.get(name)
        annotations = (node.get("metadata") or {}).get("annotations") or {}
        changes = annotation_changes(verdict, annotations)
        previous = gpu_condition_of(node)
        condition = (None if condition_matches(verdict, previous)
                     else gpu_condition(verdict, previous, self._clock()))
        if not changes and condition is None:
            return None
        return self._nodes.patch_health(name, changes, condition)


class KubeNodeClient:
    """NodeClient over the kubernetes client. Nodes come back as plain dicts:
    the fleet reads thousands of them, and the client's model objects cost
    more to build than the agent needs."""

    def __init__(self, core: kubernetes.client.CoreV1Api) -> None:
        self.core = core

    def get(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(read_reply(self.core.read_node(name, _preload_content=False)))
        return body

    def patch_health(
        self, name: str, annotations: Mapping[str, str | None],
        condition: Mapping[str, str] | None,
    ) -> str:
        response: Any = self.core.patch_node_status(
            name, health_patch(annotations, condition),
            _content_type=STRATEGIC_MERGE_PATCH, _preload_content=False,
        )
        return str(json.loads(read_reply(response))["metadata"]["resourceVersion"])


def connect(
    kubeconfig: str | None = None, in_cluster: bool | None = None, pool_size: int = 4
) -> kubernetes.client.CoreV1Api:
    """A CoreV1Api from a kubeconfig or the pod's service account. With
    neither asked for, in-cluster when running in a pod, else the default
    kubeconfig."""
    if in_cluster is None:
        in_cluster = kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ
    configuration = kubernetes.client.Configuration()
    if in_cluster:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    else:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
    # One connection per concurrent writer, so the fleet's writers never queue
    # on the client's pool.
    configuration.connection_pool_maxsize = pool_size
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))


class MemoryNodeClient:
    """NodeClient over Nodes held in memory, with the API server's semantics
    for the agent's patch (annotations merge, null removes; conditions merge
    by type; a patch that changes nothing keeps the resourceVersion). It
    records every patch the agent sends. For tests, and for trying the agent
    without a cluster; `annotate` plays someone else (kubectl) annotating a
    node."""

    def __init__(self, nodes: Iterable[Mapping[str, Any]] = ()) -> None:
        self.nodes = {node["metadata"]["name"]: copy.deepcopy(dict(node)) for node in nodes}
        # One entry per patch_health: (node name, the parts it carried, of
        # "annotations" and "condition").
        self.writes: list[tuple[str, tuple[str, ...]]] = []
        self._lock = threading.Lock()
        # One counter for all nodes, as etcd's revision, above any version given.
        self._version = max((int(rv) for node in self.nodes.values()
                             if str(rv := node["metadata"].get("resourceVersion", "")).isdigit()),
                            default=0)

    def get(self, name: str) -> dict[str, Any]:
        with self._lock:
            if name not in self.nodes:
                raise LookupError(f"node {name} not found")
            return copy.deepcopy(self.nodes[name])

    def patch_health(
        self, name: str, annotations: Mapping[str, str | None],
        condition: Mapping[str, str] | None,
    ) -> str:
        body = health_patch(annotations, condition)  # what KubeNodeClient would send
        with self._lock:
            node = self._node(name)
            changed = False
            if "metadata" in body:
                changed = self._merge_annotations(node, body["metadata"]["annotations"])
            for patched in (body.get("status") or {}).get("conditions", []):
                changed = self._merge_condition(node, patched) or changed
            self.writes.append((name, tuple(part for part, key in (
                ("annotations", "metadata"), ("condition", "status")) if key in body)))
            return self._new_version(name) if changed else str(node["metadata"]["resourceVersion"])

    def annotate(self, name: str, changes: Mapping[str, str | None]) -> str:
        """Someone else's patch of the node's annotations (a user's kubectl
        annotate, a fault injection): not one of the agent's writes, so not
        recorded in `writes`."""
        with self._lock:
            node = self._node(name)
            self._merge_annotations(node, changes)
            return self._new_version(name)

    def _node(self, name: str) -> dict[str, Any]:
        if name not in self.nodes:
            raise LookupError(f"node {name} not found")
        node = self.nodes[name]
        node["metadata"].setdefault("resourceVersion", "0")
        return node

    @staticmethod
    def _merge_annotations(node: dict[str, Any], changes: Mapping[str, str | None]) -> bool:
        metadata = node["metadata"]
        annotations = metadata["annotations"] = metadata.get("annotations") or {}
        changed = False
        for key, value in changes.items():
            if value is None:
                changed = annotations.pop(key, None) is not None or changed
            elif annotations.get(key) != value:
                annotations[key] = value
                changed = True
        return changed

    @staticmethod
    def _merge_condition(node: dict[str, Any], condition: Mapping[str, str]) -> bool:
        status = node["status"] = node.get("status") or {}
        conditions = status["conditions"] = status.get("conditions") or []
        for existing in conditions:
            if existing.get("type") == condition["type"]:
                merged = {**existing, **condition}
                if merged == existing:
                    return False
                existing.update(condition)
                return True
        conditions.append(dict(condition))
        return True

    def _new_version(self, name: str) -> str:
        self._version += 1
        self.nodes[name]["metadata"]["resourceVersion"] = str(self._version)
        return str(self._version)
