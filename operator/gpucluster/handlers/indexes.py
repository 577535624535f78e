"""Kopf indexes: the operator's in-memory view of nodes and pods, so handlers
never LIST the cluster (at 25,000 nodes that is the difference between
working and not)."""

from __future__ import annotations

import dataclasses
from typing import Any

import kopf

from gpucluster import names
from gpucluster.kube.nodes import ANNOTATION_DRAINING, ANNOTATION_QUARANTINE, LABEL_ORDINAL
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


@kopf.index("nodes", labels={names.LABEL_CLUSTER: kopf.PRESENT})
def nodes_by_cluster(*, name: str, labels: Any, annotations: Any, spec: Any, status: Any,
                     **_: Any) -> dict[str, ObservedNode]:
    return {labels[names.LABEL_CLUSTER]: observe_node(name, labels, annotations, spec, status)}


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


def owned_nodes(index: kopf.Index[str, ObservedNode], busy_nodes: kopf.Index[str, str],
                cluster_name: str, pool: str | None = None) -> dict[str, list[ObservedNode]]:
    """The cluster's nodes by pool (or of one pool), each marked busy when a
    pod keeps it so."""
    by_pool: dict[str, list[ObservedNode]] = {}
    for node in index.get(cluster_name, []):
        if pool is not None and node.pool != pool:
            continue
        busy = node.name in busy_nodes
        by_pool.setdefault(node.pool, []).append(dataclasses.replace(node, busy=busy))
    return by_pool
