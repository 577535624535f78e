"""Remediation: quarantine, drain, replace or give back nodes whose GPUs the
node agent judged unhealthy, within each pool's budget.

Each TrainingCluster has one remediation daemon, the only writer of its
`status.remediation`. A node event whose GPUHealthy condition disagrees with
the node's quarantine wakes it at once (that is the fault-to-cordon latency:
the node index asks for the pass);
events that arrive during a pass fold into the next one, so a storm of faults
(or the heartbeats of faulty nodes not yet quarantined) costs one plan of the
pool per pass, not one per event. Without events it passes over every pool
every few seconds, so a restart or a budget that frees up is picked up too.
A pass cordons and writes the status; the drains, replacements and releases
it plans go on in a task of their own, which the next passes do not wait for.
Being a Kopf daemon, it runs only in the active replica: peering stops it when
the replica pauses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any

import kopf
import pydantic

from gpucluster import metrics, names
from gpucluster.api import cluster as api
from gpucluster.handlers.indexes import owned_nodes
from gpucluster.handlers.karpenter import REPLACEABLE, replace_node
from gpucluster.handlers.state import ClusterRemediation, PoolRemediation, state_of
from gpucluster.kube import client
from gpucluster.kube import nodes as kube_nodes
from gpucluster.kube.client import call, custom, status_of
from gpucluster.kube.clusters import read_cluster
from gpucluster.planning.health import reason_is_fatal
from gpucluster.planning.pools import ObservedNode
from gpucluster.planning.remediation import (
    NodeHealth,
    RemediationBudget,
    RemediationPlan,
    overlay_unseen_writes,
    plan_remediation,
)
from gpucluster.timestamps import epoch, rfc3339

log = logging.getLogger(__name__)

# How long a write of ours may stay unseen in the node index before the index
# is believed over it (a write someone else undid before we saw it).
UNSEEN_WRITE_TTL_S = 120.0
# Passes over every pool without a node event asking for one.
RESYNC_INTERVAL_S = 5.0


@dataclasses.dataclass
class PoolCount:
    """A pool's nodes, all of them, and those a pass left out that are not Ready."""

    present: int = 0
    unlisted_not_ready: int = 0


def needs_a_look(node: ObservedNode) -> bool:
    """Whether remediation may plan anything for the node: a pass leaves the
    others (healthy GPUs, not quarantined) to its counts of the pool."""
    return bool(node.gpu_fault) or node.quarantined


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


async def remediate_pool(body: Any, pool: api.NodePool, owned: Sequence[ObservedNode], counts: PoolCount,
                         memory: PoolRemediation) -> RemediationPlan:
    """One remediation pass over one pool; returns the plan. It quarantines
    and writes the pool's status itself, and leaves the drains, replacements
    and releases to a follow-through task that it starts unless the last one
    is still writing. `owned` holds at least the pool's nodes with a GPU
    fault or a quarantine, or written by an earlier pass (see `needs_a_look`);
    `counts` counts all of them, and those left out that are not Ready.
    `body` is read just before the pass: this path is the only writer of
    status.remediation, so it holds every quarantine already counted."""
    cluster = body["metadata"]["name"]
    started = time.monotonic()
    now = time.time()
    status = ((body.get("status") or {}).get("remediation") or {}).get(pool.name) or {}
    recent = [t for t in (epoch(s) for s in status.get("recentQuarantines", []))
              if now - t < pool.remediation.windowSeconds]
    by_name = {n.name: n for n in owned}
    healths, memory.unseen = overlay_unseen_writes([health_of(n) for n in owned], memory.unseen, now,
                                                   UNSEEN_WRITE_TTL_S)
    plan = plan_remediation(healths, pool.nodes, budget_of(pool), recent, now,
                            can_replace=pool.provider in REPLACEABLE,
                            present_nodes=counts.present - (len(owned) - len(healths)),
                            unlisted_not_ready=counts.unlisted_not_ready)
    labels = (cluster, pool.name)

    async def quarantine(name: str) -> None:
        node = by_name[name]
        fatal = reason_is_fatal(node.gpu_fault)
        await kube_nodes.quarantine_node(name, node.gpu_fault, fatal, rfc3339(now))
        memory.remember_quarantine(name, True, time.time())
        metrics.remediations_total.labels(*labels, "cordon", node.gpu_fault).inc()
        kopf.warn(body, reason="NodeQuarantined",
                  message=f"pool {pool.name}: {name} cordoned and tainted {names.TAINT_GPU_ERROR} "
                          f"({'fatal' if fatal else 'transient'} {node.gpu_fault})")

    quarantined = await _each(plan.quarantine, quarantine)
    if not memory.following_through() and (plan.drain or plan.replace or plan.release):
        memory.follow_through = asyncio.create_task(follow_through(body, pool, plan, by_name, memory))

    metrics.remediation_budget_exhausted.labels(*labels).set(1 if plan.budget_exhausted else 0)
    window = [rfc3339(t) for t in sorted(recent + [now] * len(quarantined))]
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
    metrics.reconcile_duration_seconds.labels("Remediation").observe(time.monotonic() - started)
    return plan


async def follow_through(body: Any, pool: api.NodePool, plan: RemediationPlan,
                         by_name: Mapping[str, ObservedNode], memory: PoolRemediation) -> None:
    """A pass's drains, replacements and releases, on threads of their own:
    the pass's cordons never queue behind them."""
    client.LANE.set("drain")
    cluster = body["metadata"]["name"]
    labels = (cluster, pool.name)

    async def drain(name: str) -> None:
        remaining = await kube_nodes.evict_pods(name)
        if name not in memory.draining:
            memory.draining.add(name)
            metrics.remediations_total.labels(*labels, "drain", by_name[name].gpu_fault).inc()
            kopf.info(body, reason="NodeDraining",
                      message=f"pool {pool.name}: {name} ({by_name[name].gpu_fault}) draining; "
                              f"{remaining} pods asked to leave through the Eviction API")

    async def replace(name: str) -> None:
        await replace_node(cluster, pool, name)
        memory.remember_delete(name, time.time())
        metrics.remediations_total.labels(*labels, "replace", by_name[name].gpu_fault).inc()
        kopf.info(body, reason="NodeReplaced",
                  message=f"pool {pool.name}: {name} ({by_name[name].gpu_fault}) drained and deleted; "
                          "a new node takes its place")

    async def release(name: str) -> None:
        await kube_nodes.release_quarantine(name)
        memory.remember_quarantine(name, False, time.time())
        metrics.remediations_total.labels(*labels, "uncordon", "Recovered").inc()
        kopf.info(body, reason="NodeRecovered",
                  message=f"pool {pool.name}: {name} GPUs healthy again; uncordoned")

    memory.draining &= set(plan.drain)
    try:
        await _each(plan.drain, drain)
        await _each(plan.replace, replace)
        await _each(plan.release, release)
    except Exception as err:
        metrics.reconcile_errors_total.labels("Remediation", type(err).__name__).inc()
        log.exception("remediation of %s/%s: drains, replacements or releases failed", cluster, pool.name)


async def _remediate_cluster(name: str, passes: ClusterRemediation, wanted: set[str] | None,
                             nodes: Iterable[ObservedNode], busy_nodes: Container[str]) -> None:
    """One pass over the pools in `wanted` (None: every pool) of the cluster."""
    body = await read_cluster(name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return  # the cluster is being deleted with its nodes
    try:
        spec = api.TrainingClusterSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError:
        return  # the reconcile reports it (Degraded, InvalidSpec)
    passes.pools = {p.name: passes.pools.get(p.name) or PoolRemediation() for p in spec.pools}
    written = {name for memory in passes.pools.values()
               for name in (*memory.unseen.quarantine, *memory.unseen.deleted)}
    counts: dict[str, PoolCount] = defaultdict(PoolCount)
    looked_at = []
    for node in nodes:
        count = counts[node.pool]
        count.present += 1
        if needs_a_look(node) or node.name in written:
            looked_at.append(node)
        elif not node.ready:
            count.unlisted_not_ready += 1
    owned = owned_nodes(looked_at, busy_nodes)
    for pool in spec.pools:
        if wanted is not None and pool.name not in wanted:
            continue
        try:
            await remediate_pool(body, pool, owned.get(pool.name, []), counts[pool.name],
                                 passes.pools[pool.name])
        except Exception as err:
            # Not retried here: the next pass, within seconds, runs this pool again.
            metrics.reconcile_errors_total.labels("Remediation", type(err).__name__).inc()
            log.exception("remediation pass of %s/%s failed", name, pool.name)


async def _next_pass(passes: ClusterRemediation, stopped: kopf.DaemonStopped) -> set[str] | None:
    """Waits for a node event's call, the resync or the stop; returns the
    pools wanted (None: every pool, the resync)."""
    waiters = [asyncio.ensure_future(passes.wake.wait()), asyncio.ensure_future(stopped.wait())]
    await asyncio.wait(waiters, timeout=RESYNC_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    return passes.take_wanted() if passes.wake.is_set() else None


# The backoff lets a pass in flight finish its writes when Kopf stops the daemon.
@kopf.daemon(names.GROUP, names.VERSION, api.PLURAL, id="remediation",
             cancellation_backoff=10.0, cancellation_timeout=1.0)
async def remediation_daemon(*, name: str, stopped: kopf.DaemonStopped, memo: Any, **_: Any) -> None:
    state = state_of(memo)
    client.LANE.set("remediation")  # this daemon's task, and the writes it starts
    await state.synced()
    passes = state.remediation[name] = ClusterRemediation()
    wanted: set[str] | None = None
    try:
        while not stopped:
            try:
                await _remediate_cluster(name, passes, wanted, state.nodes.get(name), state.pods.busy_nodes)
            except Exception as err:
                metrics.reconcile_errors_total.labels("Remediation", type(err).__name__).inc()
                log.exception("remediation pass of %s failed", name)
            wanted = await _next_pass(passes, stopped)
    finally:
        await passes.finish()
        if state.remediation.get(name) is passes:
            del state.remediation[name]
        if stopped.reason is not None and kopf.DaemonStoppingReason.OPERATOR_PAUSING in stopped.reason:
            state.lose_lead()
