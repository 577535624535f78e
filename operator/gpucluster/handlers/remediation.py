"""Remediation: quarantine, drain, replace or give back nodes whose GPUs the
node agent judged unhealthy, within each pool's budget.

A node event whose GPUHealthy condition disagrees with the node's quarantine
triggers its pool at once (that is the fault-to-cordon latency); the
TrainingCluster resync runs every pool again, so a restart or a budget that
frees up is picked up without any event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import kopf
import kubernetes

from gpucluster import metrics, names
from gpucluster.api import cluster as api
from gpucluster.handlers.indexes import owned_nodes
from gpucluster.kube import nodes as kube_nodes
from gpucluster.kube.client import call, custom, status_of
from gpucluster.planning.health import reason_is_fatal
from gpucluster.planning.pools import ObservedNode
from gpucluster.planning.remediation import NodeHealth, RemediationBudget, RemediationPlan, plan_remediation
from gpucluster.timestamps import epoch, rfc3339

_locks: dict[str, asyncio.Lock] = {}


def health_of(node: ObservedNode) -> NodeHealth:
    return NodeHealth(name=node.name, ready=node.ready, gpu_healthy=not node.gpu_fault,
                      fault_reason=node.gpu_fault, fatal=reason_is_fatal(node.gpu_fault),
                      quarantined=node.quarantined, busy=node.busy)


def budget_of(pool: api.NodePool) -> RemediationBudget:
    policy = pool.remediation
    return RemediationBudget(max_unavailable=policy.maxUnavailable, max_per_window=policy.maxPerWindow,
                             window_seconds=policy.windowSeconds, replace=policy.replace)


async def remediate_pool(body: Any, pool: api.NodePool, owned: Sequence[ObservedNode]) -> RemediationPlan:
    """One remediation step for one pool; returns the plan it applied."""
    cluster = body["metadata"]["name"]
    lock = _locks.setdefault(f"{cluster}/{pool.name}", asyncio.Lock())
    async with lock:
        now = time.time()
        state = ((body.get("status") or {}).get("remediation") or {}).get(pool.name) or {}
        recent = [t for t in (epoch(s) for s in state.get("recentQuarantines", []))
                  if now - t < pool.remediation.windowSeconds]
        by_name = {n.name: n for n in owned}
        plan = plan_remediation([health_of(n) for n in owned], pool.nodes, budget_of(pool), recent, now,
                                can_replace=pool.provider == api.Provider.KWOK)
        labels = (cluster, pool.name)
        for name in plan.quarantine:
            node = by_name[name]
            fatal = reason_is_fatal(node.gpu_fault)
            await kube_nodes.quarantine_node(name, node.gpu_fault, fatal, rfc3339(now))
            metrics.remediations_total.labels(*labels, "cordon", node.gpu_fault).inc()
            kopf.warn(body, reason="NodeQuarantined",
                      message=f"pool {pool.name}: {name} cordoned and tainted {names.TAINT_GPU_ERROR} "
                              f"({'fatal' if fatal else 'transient'} {node.gpu_fault})")
        for name in plan.drain:
            await kube_nodes.evict_pods(name)
            metrics.remediations_total.labels(*labels, "drain", by_name[name].gpu_fault).inc()
        for name in plan.replace:
            await kube_nodes.delete_nodes([name])
            metrics.remediations_total.labels(*labels, "replace", by_name[name].gpu_fault).inc()
            kopf.info(body, reason="NodeReplaced",
                      message=f"pool {pool.name}: {name} ({by_name[name].gpu_fault}) drained and deleted; "
                              "a new node takes its place")
        for name in plan.release:
            await kube_nodes.release_quarantine(name)
            metrics.remediations_total.labels(*labels, "uncordon", "Recovered").inc()
            kopf.info(body, reason="NodeRecovered",
                      message=f"pool {pool.name}: {name} GPUs healthy again; uncordoned")
        metrics.remediation_budget_exhausted.labels(*labels).set(1 if plan.budget_exhausted else 0)
        window = sorted(recent + [now] * len(plan.quarantine))
        new_state = {"recentQuarantines": [rfc3339(t) for t in window], "waiting": list(plan.waiting)}
        if new_state != {"recentQuarantines": state.get("recentQuarantines", []), "waiting": state.get("waiting", [])}:
            if plan.waiting and list(plan.waiting) != state.get("waiting"):
                kopf.warn(body, reason="RemediationBudgetExhausted",
                          message=f"pool {pool.name}: {len(plan.waiting)} faulty nodes wait "
                                  f"({', '.join(plan.waiting[:5])}); {plan.unavailable} of "
                                  f"{plan.unavailable + plan.allowed - len(plan.quarantine)} allowed out")
            await call(custom().patch_cluster_custom_object_status, names.GROUP, names.VERSION, api.PLURAL,
                       cluster, {"status": {"remediation": {pool.name: new_state}}})
            body.setdefault("status", {}).setdefault("remediation", {})[pool.name] = new_state
        return plan


def _needs_attention(body: Any, **_: Any) -> bool:
    """Cheap filter run on every node event: a GPU fault not yet quarantined,
    or a quarantine whose fault has cleared."""
    quarantined = kube_nodes.ANNOTATION_QUARANTINE in (body["metadata"].get("annotations") or {})
    faulty = any(c.get("type") == names.CONDITION_GPU_HEALTHY and c.get("status") == "False"
                 for c in (body.get("status") or {}).get("conditions") or [])
    return faulty != quarantined


@kopf.on.event("nodes", labels={names.LABEL_CLUSTER: kopf.PRESENT}, when=_needs_attention)  # type: ignore[arg-type]
async def gpu_health_changed(*, labels: Any, nodes_by_cluster: kopf.Index[str, ObservedNode],
                             pods_by_node: kopf.Index[str, str], **_: Any) -> None:
    cluster, pool_name = labels[names.LABEL_CLUSTER], labels.get(names.LABEL_POOL, "")
    try:
        body: Any = await call(custom().get_cluster_custom_object, names.GROUP, names.VERSION, api.PLURAL, cluster)
    except kubernetes.client.ApiException as err:
        if status_of(err) == 404:
            return  # the cluster is being deleted with its nodes
        raise
    spec = api.TrainingClusterSpec.model_validate(body["spec"])
    pool = next((p for p in spec.pools if p.name == pool_name), None)
    if pool is None:
        return
    await remediate_pool(body, pool, owned_nodes(nodes_by_cluster, pods_by_node, cluster).get(pool_name, []))
