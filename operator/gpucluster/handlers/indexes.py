"""The operator's in-memory view of nodes (a watch of its own, NodeIndex) and
pods (Kopf indexes), so handlers never LIST the cluster (at 25,000 nodes that
is the difference between working and not)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

import kopf

from gpucluster import names
from gpucluster.kube.nodes import ANNOTATION_DRAINING, ANNOTATION_QUARANTINE, LABEL_ORDINAL
from gpucluster.kube.watch import NodeWatcher
from gpucluster.planning.karpenter import provider_topology
from gpucluster.planning.pools import ObservedNode
from gpucluster.timestamps import epoch


def _condition_of(status: Any, kind: str) -> dict[str, Any]:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def _transition_time(condition: dict[str, Any]) -> float | None:
    stamp = condition.get("lastTransitionTime")
    return epoch(stamp) if stamp else None


def observe_node(name: str, labels: Any, annotations: Any, spec: Any, status: Any) -> ObservedNode:
    taints = spec.get("taints") or []
    allocatable = (status or {}).get("allocatable") or {}
    gpu_condition = _condition_of(status, names.CONDITION_GPU_HEALTHY)
    ready_condition = _condition_of(status, "Ready")
    ready = ready_condition.get("status") == "True"
    gpu_fault = gpu_condition.get("status") == "False"
    return ObservedNode(
        name=name,
        pool=labels.get(names.LABEL_POOL, ""),
        ordinal=int(labels.get(LABEL_ORDINAL, "-1") or -1),
        ready=ready,
        gpu_healthy=not gpu_fault and not any(t.get("key") == names.TAINT_GPU_ERROR for t in taints),
        gpu_fault=gpu_condition.get("reason", "") if gpu_fault else "",
        not_ready_since=_transition_time(ready_condition) if not ready else None,
        gpu_fault_since=_transition_time(gpu_condition) if gpu_fault else None,
        quarantined=ANNOTATION_QUARANTINE in annotations,
        cordoned=bool(spec.get("unschedulable")),
        draining=ANNOTATION_DRAINING in annotations,
        gpus=int(allocatable.get(names.GPU_RESOURCE, labels.get(names.LABEL_GPU_COUNT, "0"))),
        block=labels.get(names.LABEL_BLOCK, ""),
        rack=labels.get(names.LABEL_RACK, ""),
        provider_topology=provider_topology(labels),
    )


@kopf.index("pods")
def pods_by_node(*, namespace: str | None, name: str, spec: Any, status: Any, meta: Any,
                 **_: Any) -> dict[str, str] | None:
    """Pods that keep a node busy: bound, not finished, not a DaemonSet's."""
    node = spec.get("nodeName")
    if not node or (status or {}).get("phase") in ("Succeeded", "Failed"):
        return None
    if any(o.get("kind") == "DaemonSet" for o in meta.get("ownerReferences") or []):
        return None
    return {node: f"{namespace}/{name}"}


def owned_nodes(nodes: Iterable[ObservedNode], busy_nodes: kopf.Index[str, str],
                pool: str | None = None) -> dict[str, list[ObservedNode]]:
    """The nodes by pool (or of one pool), each marked busy when a pod keeps
    it so."""
    by_pool: dict[str, list[ObservedNode]] = {}
    for node in nodes:
        if pool is not None and node.pool != pool:
            continue
        if node.name in busy_nodes:
            node = dataclasses.replace(node, busy=True)
        by_pool.setdefault(node.pool, []).append(node)
    return by_pool


class NodeIndex:
    """The cluster's Nodes as ObservedNodes, by TrainingCluster, fed by a
    watch of our own rather than a kopf.index.

    Why not Kopf: at 25,000 nodes, Node events (KWOK's status posts, the
    agents' GPU health writes) are most of the operator's traffic, and Kopf
    gives each one its full per-object treatment (a worker task, cause
    detection, diff-base bookkeeping) although no change handler watches
    Nodes. Profiled at 5,000 nodes (py-spy), that treatment took more of the
    event loop than every decision the operator makes; here an event costs
    one JSON parse and one ObservedNode. The watch also runs while peering
    holds this replica back, so a standby takes over with its index warm.

    The watch thread hands each node to the event loop, which alone touches
    the index; handlers read it there, after `synced` (Kopf's own indexes
    give the same promise: complete before any handler runs)."""

    def __init__(self, on_attention: Callable[[str, str], None] | None = None) -> None:
        self._by_cluster: dict[str, dict[str, ObservedNode]] = {}
        self._cluster_of: dict[str, str] = {}
        self._on_attention = on_attention
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: NodeWatcher | None = None
        self.synced = asyncio.Event()

    def get(self, cluster: str) -> Collection[ObservedNode]:
        nodes = self._by_cluster.get(cluster)
        return nodes.values() if nodes is not None else ()

    def by_name(self, cluster: str) -> dict[str, ObservedNode]:
        """A copy of the cluster's nodes by name (copied in C: 25,000 in a
        fraction of a millisecond), which the watch does not change under
        its holder."""
        return dict(self._by_cluster.get(cluster, {}))

    def start(self, core: Any) -> None:
        self._loop = asyncio.get_running_loop()
        self._watcher = NodeWatcher(core, self, label_selector=names.LABEL_CLUSTER)
        self._watcher.start("node-index")

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()

    # -- the watch thread's side ---------------------------------------------

    def replace_all(self, nodes: Iterator[Mapping[str, Any]]) -> None:
        listed = [_observed(node) for node in nodes]
        self._call(self._replace, listed)

    def observe(self, event_type: str, node: Mapping[str, Any]) -> None:
        if event_type == "DELETED":
            self._call(self._forget, node["metadata"]["name"])
        else:
            self._call(self._put, *_observed(node))

    def _call(self, apply: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: the operator is exiting
            self._loop.call_soon_threadsafe(apply, *args)

    # -- the event loop's side -----------------------------------------------

    def _replace(self, listed: list[tuple[str, ObservedNode]]) -> None:
        self._by_cluster, self._cluster_of = {}, {}
        for cluster, node in listed:
            self._put(cluster, node)
        self.synced.set()

    def _put(self, cluster: str, node: ObservedNode) -> None:
        if self._cluster_of.get(node.name, cluster) != cluster:
            self._forget(node.name)
        self._cluster_of[node.name] = cluster
        self._by_cluster.setdefault(cluster, {})[node.name] = node
        if self._on_attention is not None and bool(node.gpu_fault) != node.quarantined:
            self._on_attention(cluster, node.pool)

    def _forget(self, name: str) -> None:
        cluster = self._cluster_of.pop(name, None)
        if cluster is not None:
            nodes = self._by_cluster[cluster]
            del nodes[name]
            if not nodes:
                del self._by_cluster[cluster]


def _observed(node: Mapping[str, Any]) -> tuple[str, ObservedNode]:
    meta = node["metadata"]
    labels = meta.get("labels") or {}
    return labels.get(names.LABEL_CLUSTER, ""), observe_node(
        meta["name"], labels, meta.get("annotations") or {}, node.get("spec") or {}, node.get("status") or {})
