"""The node agent's kube adapter: writes a verdict onto its Node as the
GPUHealthy condition and the healthy/unhealthy GPU annotations, and reads
the fault-injection annotation of fake nodes.

Writes only what differs from the node as last seen. The condition goes in
with a strategic merge patch of status.conditions, which merges by condition
type, so the kubelet's (or KWOK's) conditions stay as they are; its
lastTransitionTime moves only when its status does.

Needs RBAC: get/list/watch/patch on nodes and patch on nodes/status.
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
    """The Node calls the agent makes; KubeNodeClient talks to the API server.
    The patches return the Node's resourceVersion after them."""

    def get(self, name: str) -> dict[str, Any]: ...

    def patch_annotations(self, name: str, changes: Mapping[str, str | None]) -> str: ...

    def patch_condition(self, name: str, condition: Mapping[str, str]) -> str: ...


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
        when not given). Returns the node's resourceVersion after the writes,
        None when nothing had to be written."""
        if node is None:
            node = self._nodes.get(name)
        annotations = (node.get("metadata") or {}).get("annotations") or {}
        changes = annotation_changes(verdict, annotations)
        written = self._nodes.patch_annotations(name, changes) if changes else None
        previous = gpu_condition_of(node)
        if condition_matches(verdict, previous):
            return written
        return self._nodes.patch_condition(name, gpu_condition(verdict, previous, self._clock()))


class KubeNodeClient:
    """NodeClient over the kubernetes client. Nodes come back as plain dicts:
    the fleet reads thousands of them, and the client's model objects cost
    more to build than the agent needs."""

    def __init__(self, core: kubernetes.client.CoreV1Api) -> None:
        self.core = core

    def get(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(read_reply(self.core.read_node(name, _preload_content=False)))
        return body

    def patch_annotations(self, name: str, changes: Mapping[str, str | None]) -> str:
        response: Any = self.core.patch_node(
            name, {"metadata": {"annotations": dict(changes)}},
            _content_type=STRATEGIC_MERGE_PATCH, _preload_content=False,
        )
        return str(json.loads(read_reply(response))["metadata"]["resourceVersion"])

    def patch_condition(self, name: str, condition: Mapping[str, str]) -> str:
        response: Any = self.core.patch_node_status(
            name, {"status": {"conditions": [dict(condition)]}},
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
    """NodeClient over Nodes held in memory, with the API server's merge
    semantics for the two patches the agent sends (annotations merge, null
    removes; conditions merge by type). It records every write. For tests,
    and for trying the agent without a cluster."""

    def __init__(self, nodes: Iterable[Mapping[str, Any]] = ()) -> None:
        self.nodes = {node["metadata"]["name"]: copy.deepcopy(dict(node)) for node in nodes}
        self.writes: list[tuple[str, str]] = []  # (node name, "annotations" | "condition")
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

    def patch_annotations(self, name: str, changes: Mapping[str, str | None]) -> str:
        with self._lock:
            metadata = self.nodes[name].setdefault("metadata", {})
            annotations = metadata.setdefault("annotations", {})
            for key, value in changes.items():
                if value is None:
                    annotations.pop(key, None)
                else:
                    annotations[key] = value
            self.writes.append((name, "annotations"))
            return self._new_version(name)

    def patch_condition(self, name: str, condition: Mapping[str, str]) -> str:
        with self._lock:
            status = self.nodes[name].setdefault("status", {})
            conditions = [c for c in status.get("conditions") or []
                          if c.get("type") != condition["type"]]
            status["conditions"] = [*conditions, dict(condition)]
            self.writes.append((name, "condition"))
            return self._new_version(name)

    def _new_version(self, name: str) -> str:
        self._version += 1
        self.nodes[name]["metadata"]["resourceVersion"] = str(self._version)
        return str(self._version)
