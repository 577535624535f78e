"""Kopf indexes: the operator's in-memory view of nodes and pods, so handlers
never LIST the cluster (at 25,000 nodes that is the difference between
working and not)."""

from __future__ import annotations

from typing import Any

import kopf

from gpucluster import names
from gpucluster.kube.nodes import ANNOTATION_DRAINING, LABEL_ORDINAL
from gpucluster.planning.pools import ObservedNode


def _condition(status: Any, kind: str) -> str | None:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return str(cond.get("status"))
    return None


def observe_node(name: str, labels: Any, annotations: Any, spec: Any, status: Any) -> ObservedNode:
    taints = spec.get("taints") or []
    allocatable = (status or {}).get("allocatable") or {}
    return ObservedNode(
        name=name,
        pool=labels.get(names.LABEL_POOL, ""),
        ordinal=int(labels.get(LABEL_ORDINAL, "0") or 0),
        ready=_condition(status, "Ready") == "True",
        gpu_healthy=_condition(status, names.CONDITION_GPU_HEALTHY) != "False"
        and not any(t.get("key") == names.TAINT_GPU_ERROR for t in taints),
        cordoned=bool(spec.get("unschedulable")),
        draining=ANNOTATION_DRAINING in annotations,
        gpus=int(allocatable.get(names.GPU_RESOURCE, labels.get(names.LABEL_GPU_COUNT, "0"))),
        block=labels.get(names.LABEL_BLOCK, ""),
        rack=labels.get(names.LABEL_RACK, ""),
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
