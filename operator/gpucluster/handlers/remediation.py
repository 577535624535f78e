"""Remediation: quarantine, drain, replace or give back nodes whose GPUs the
node agent judged unhealthy, within each pool's budget.

A node event whose GPUHealthy condition disagrees with the node's quarantine
marks its pool for a pass at once (that is the fault-to-cordon latency). Passes
of one pool run one at a time and coalesce: every event that arrives during a
pass folds into the next one, so a storm of faults (or the heartbeats of
faulty nodes not yet quarantined) costs one plan of the pool per pass, not one
per event. The TrainingCluster resync runs every pool again, so a restart or a
budget that frees up is picked up without any event.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import kopf

from gpucluster import metrics, names
from gpucluster.api import cluster as api
from gpucluster.handlers.indexes import owned_nodes
from gpucluster.handlers.karpenter import REPLACEABLE, replace_node
from gpucluster.kube import nodes as kube_nodes
from gpucluster.kube.client import call, custom, status_of
from gpucluster.kube.clusters import read_cluster
from gpucluster.planning.health import reason_is_fatal
from gpucluster.planning.pools import ObservedNode
from gpucluster.planning.remediation import (
    NodeHealth,
    RemediationBudget,
    RemediationPlan,
    UnseenWrites,
    overlay_unseen_writes,
    plan_remediation,
)
from gpucluster.timestamps import epoch, rfc3339

log = logging.getLogger(__name__)

# How long a write of ours may stay unseen in the node index before the index
# is believed over it (a write someone else undid before we saw it).
UNSEEN_WRITE_TTL_S = 120.0


@dataclasses.dataclass
class _PoolRemediation:
    """What one pool's remediation keeps between passes."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    unseen: UnseenWrites = dataclasses.field(default_factory=UnseenWrites)
    draining: set[str] = dataclasses.field(default_factory=set)
    # The quarantine times this process wrote to status.remediation, so a
    # pass handed an older copy of the status (the resync's, read before a
    # long scale-up) still counts them against the window.
    quarantined_at: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    pass_wanted: bool = False
    passes: asyncio.Task[None] | None = None


_pools: dict[tuple[str, str], _PoolRemediation] = {}


def _pool_state(cluster: str, pool: str) -> _PoolRemediation:
    return _pools.setdefault((cluster, pool), _PoolRemediation())


def forget_cluster(cluster: str) -> None:
    for key in [k for k in _pools if k[0] == cluster]:
        state = _pools.pop(key)
        if state.passes is not None:
            state.passes.cancel()


def health_of(node: ObservedNode) -> NodeHealth:
    return NodeHealth(name=node.name, ready=node.ready, gpu_healthy=not node.gpu_fault,
                      fault_reason=node.gpu_fault, fatal=reason_is_fatal(node.gpu_fault),
                      quarantined=node.quarantined, busy=node.busy)


def budget_of(pool: api.NodePool) -> RemediationBudget:
    policy = pool.remediation
    return RemediationBudget(max_unavailable=policy.maxUnavailable, max_per_window=policy.maxPerWindow,
                             window_seconds=policy.windowSeconds, replace=policy.replace)


async def _each(names_: Sequence[str], write: Any) -> list[str]:
    """Runs one node write per name concurrently; returns the names written.
    A node already gone (404) is skipped quietly; any other error is logged
    and the node is left for the next pass."""
    results = await asyncio.gather(*(write(n) for n in names_), return_exceptions=True)
    done = []
    for name, result in zip(names_, results, strict=True):
        if isinstance(result, BaseException):
            if status_of(result) != 404:
                log.warning("remediation write to node %s failed: %s", name, result)
            continue
        done.append(name)
    return done


async def remediate_pool(body: Any, pool: api.NodePool, owned: Sequence[ObservedNode]) -> RemediationPlan:
    """One remediation pass over one pool; returns the plan it applied."""
    cluster = body["metadata"]["name"]
    state = _pool_state(cluster, pool.name)
    async with state.lock:
        started = time.monotonic()
        now = time.time()
        status = ((body.get("status") or {}).get("remediation") or {}).get(pool.name) or {}
        written: collections.Counter[str] = collections.Counter(status.get("recentQuarantines", []))
        written |= state.quarantined_at
        recent = [t for t in (epoch(s) for s in written.elements()) if now - t < pool.remediation.windowSeconds]
        by_name = {n.name: n for n in owned}
        healths, state.unseen = overlay_unseen_writes([health_of(n) for n in owned], state.unseen, now,
                                                      UNSEEN_WRITE_TTL_S)
        plan = plan_remediation(healths, pool.nodes, budget_of(pool), recent, now,
                                can_replace=pool.provider in REPLACEABLE)
        quarantine_writes = dict(state.unseen.quarantine)
        deletes = dict(state.unseen.deleted)
        labels = (cluster, pool.name)

        async def quarantine(name: str) -> None:
            node = by_name[name]
            fatal = reason_is_fatal(node.gpu_fault)
            await kube_nodes.quarantine_node(name, node.gpu_fault, fatal, rfc3339(now))
            quarantine_writes[name] = (True, time.time())
            metrics.remediations_total.labels(*labels, "cordon", node.gpu_fault).inc()
            kopf.warn(body, reason="NodeQuarantined",
                      message=f"pool {pool.name}: {name} cordoned and tainted {names.TAINT_GPU_ERROR} "
                              f"({'fatal' if fatal else 'transient'} {node.gpu_fault})")

        async def drain(name: str) -> None:
            remaining = await kube_nodes.evict_pods(name)
            if name not in state.draining:
                state.draining.add(name)
                metrics.remediations_total.labels(*labels, "drain", by_name[name].gpu_fault).inc()
                kopf.info(body, reason="NodeDraining",
                          message=f"pool {pool.name}: {name} ({by_name[name].gpu_fault}) draining; "
                                  f"{remaining} pods asked to leave through the Eviction API")

        async def replace(name: str) -> None:
            await replace_node(cluster, pool, name)
            deletes[name] = time.time()
            metrics.remediations_total.labels(*labels, "replace", by_name[name].gpu_fault).inc()
            kopf.info(body, reason="NodeReplaced",
                      message=f"pool {pool.name}: {name} ({by_name[name].gpu_fault}) drained and deleted; "
                              "a new node takes its place")

        async def release(name: str) -> None:
            await kube_nodes.release_quarantine(name)
            quarantine_writes[name] = (False, time.time())
            metrics.remediations_total.labels(*labels, "uncordon", "Recovered").inc()
            kopf.info(body, reason="NodeRecovered",
                      message=f"pool {pool.name}: {name} GPUs healthy again; uncordoned")

        # Quarantine first and alone: it is what takes the faulty GPUs out of
        # scheduling, and the rest can wait the few milliseconds.
        quarantined = await _each(plan.quarantine, quarantine)
        state.draining &= set(plan.drain)  # the drain is retried each pass, announced once
        await _each(plan.drain, drain)
        await _each(plan.replace, replace)
        await _each(plan.release, release)
        state.unseen = UnseenWrites(quarantine_writes, deletes)

        metrics.remediation_budget_exhausted.labels(*labels).set(1 if plan.budget_exhausted else 0)
        window = [rfc3339(t) for t in sorted(recent + [now] * len(quarantined))]
        state.quarantined_at = collections.Counter(window)
        new_status = {"recentQuarantines": window, "waiting": list(plan.waiting)}
        old_status = {"recentQuarantines": status.get("recentQuarantines", []),
                      "waiting": status.get("waiting", [])}
        if new_status != old_status:
            if plan.waiting and list(plan.waiting) != status.get("waiting"):
                kopf.warn(body, reason="RemediationBudgetExhausted",
                          message=f"pool {pool.name}: {len(plan.waiting)} faulty nodes wait "
                                  f"({', '.join(plan.waiting[:5])}); {plan.unavailable} of "
                                  f"{plan.unavailable + plan.allowed - len(plan.quarantine)} allowed out")
            await call(custom().patch_cluster_custom_object_status, names.GROUP, names.VERSION, api.PLURAL,
                       cluster, {"status": {"remediation": {pool.name: new_status}}})
            body.setdefault("status", {}).setdefault("remediation", {})[pool.name] = new_status
        metrics.reconcile_duration_seconds.labels("Remediation").observe(time.monotonic() - started)
        return plan


async def _passes(cluster: str, pool_name: str, state: _PoolRemediation,
                  nodes_by_cluster: kopf.Index[str, ObservedNode], pods_by_node: kopf.Index[str, str]) -> None:
    """Runs passes of one pool while events keep asking for one."""
    while state.pass_wanted:
        state.pass_wanted = False
        try:
            body = await read_cluster(cluster)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return  # the cluster is being deleted with its nodes
            spec = api.TrainingClusterSpec.model_validate(body["spec"])
            pool = next((p for p in spec.pools if p.name == pool_name), None)
            if pool is None:
                return
            await remediate_pool(body, pool, owned_nodes(nodes_by_cluster, pods_by_node, cluster,
                                                         pool_name).get(pool_name, []))
        except Exception as err:
            # Not retried here: the cluster resync runs this pool again within seconds.
            metrics.reconcile_errors_total.labels("Remediation", type(err).__name__).inc()
            log.exception("remediation pass of %s/%s failed", cluster, pool_name)


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
    state = _pool_state(cluster, pool_name)
    state.pass_wanted = True
    if state.passes is None or state.passes.done():
        state.passes = asyncio.create_task(_passes(cluster, pool_name, state, nodes_by_cluster, pods_by_node),
                                           name=f"remediation {cluster}/{pool_name}")
