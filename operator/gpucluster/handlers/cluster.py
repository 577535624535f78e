"""TrainingCluster handlers: read the indexes, plan each pool, apply, report.

Every trigger (create, spec update, resume after a restart, and a periodic
timer that catches drift) runs the same idempotent reconcile, serialised per
cluster. The spec is re-read between batches of a long scale-up, so an edit
made meanwhile is honoured at once rather than after the old plan finishes.
GPU remediation is not part of it: the remediation daemon is the one writer of
status.remediation, and the reconcile only reads it (for Degraded).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Container, Iterable, Sequence
from typing import Any

import kopf
import pydantic

from gpucluster import metrics, names
from gpucluster.api import cluster as api
from gpucluster.handlers import karpenter as karpenter_pools
from gpucluster.handlers.indexes import NodeIndex, owned_nodes
from gpucluster.handlers.state import OperatorState, state_of
from gpucluster.kube import nodes as kube_nodes
from gpucluster.kube.client import call, core, custom
from gpucluster.kube.clusters import read_cluster
from gpucluster.planning.conditions import ConditionUpdate, merge_conditions
from gpucluster.planning.karpenter import ObservedClaim
from gpucluster.planning.pools import (
    ObservedNode,
    PoolCounts,
    PoolPlan,
    PoolProvider,
    PoolShape,
    StaticCandidate,
    count_pool,
    plan_pool,
)
from gpucluster.timestamps import rfc3339

CREATE_BATCH = 1000
RESYNC_INTERVAL_S = 5.0


def shape_of(cluster_name: str, pool: api.NodePool) -> PoolShape:
    return PoolShape(
        cluster=cluster_name, name=pool.name, provider=PoolProvider(pool.provider.value),
        desired_nodes=pool.nodes, gpus_per_node=pool.gpusPerNode,
        nodes_per_rack=pool.topology.nodesPerRack, racks_per_block=pool.topology.racksPerBlock,
    )


def template_of(shape: PoolShape, pool: api.NodePool) -> kube_nodes.PoolNodeTemplate:
    return kube_nodes.PoolNodeTemplate(
        shape=shape, gpu=pool.gpu, labels=pool.labels,
        taints=[t.model_dump() for t in pool.taints],
    )


async def _static_candidates(pool: api.NodePool) -> list[StaticCandidate]:
    selector = ",".join(f"{k}={v}" for k, v in sorted((pool.nodeSelector or {}).items()))
    found = await call(core().list_node, label_selector=selector)
    return [StaticCandidate(name=str(n.metadata.name),
                            claimed_by=(n.metadata.labels or {}).get(names.LABEL_CLUSTER))
            for n in found.items]


def _names_summary(items: Iterable[str], limit: int = 5) -> str:
    listed = list(items)
    shown = ", ".join(listed[:limit])
    return shown + (f" and {len(listed) - limit} more" if len(listed) > limit else "")


async def _apply(body: Any, shape: PoolShape, pool: api.NodePool, plan: PoolPlan,
                 already_draining: set[str], report: Callable[[], Awaitable[None]]) -> list[str]:
    """Applies one pool's plan; returns error lines (empty when all went well).
    `report` writes the status between batches of a long scale-up, so that
    `kubectl get tc` shows the nodes Ready growing."""
    template = template_of(shape, pool)
    labels = (shape.cluster, shape.name, pool.gpu.value)
    errors: list[str] = []
    for start in range(0, len(plan.create), CREATE_BATCH):
        batch = plan.create[start:start + CREATE_BATCH]
        if start and (await read_cluster(shape.cluster) or {}).get("metadata", {}).get(
                "generation") != body["metadata"]["generation"]:
            raise _SpecChanged()
        batch_errors = await kube_nodes.create_nodes([template.kwok_node(n) for n in batch])
        created = len(batch) - len(batch_errors)
        metrics.nodes_created_total.labels(*labels).inc(created)
        kopf.info(body, reason="NodesCreated",
                  message=f"pool {shape.name}: created {created} {pool.gpu.value} nodes "
                          f"({_names_summary(n.name for n in batch)})")
        errors += batch_errors
        if start + CREATE_BATCH < len(plan.create):
            await report()
    if plan.delete:
        errors += await kube_nodes.delete_nodes(plan.delete)
        metrics.nodes_deleted_total.labels(*labels).inc(len(plan.delete))
        kopf.info(body, reason="NodesDeleted",
                  message=f"pool {shape.name}: deleted {len(plan.delete)} empty nodes "
                          f"({_names_summary(plan.delete)})")
    for name in plan.drain:
        await kube_nodes.set_draining(name, True, reason="scale-down")
        await kube_nodes.evict_pods(name)
    newly_draining = [n for n in plan.drain if n not in already_draining]
    if newly_draining:
        kopf.info(body, reason="NodesDraining",
                  message=f"pool {shape.name}: draining {len(newly_draining)} busy nodes before "
                          f"removal ({_names_summary(newly_draining)})")
    for name in plan.undrain:
        await kube_nodes.set_draining(name, False)
    if plan.undrain:
        kopf.info(body, reason="NodesUncordoned",
                  message=f"pool {shape.name}: scale-down no longer wanted, uncordoned "
                          f"{_names_summary(plan.undrain)}")
    for node in plan.adopt:
        existing = (await call(core().read_node, node.name)).metadata.labels or {}
        await kube_nodes.adopt_node(template, node, existing)
    if plan.adopt:
        kopf.info(body, reason="NodesAdopted",
                  message=f"pool {shape.name}: adopted {_names_summary(n.name for n in plan.adopt)}")
    for name in plan.release:
        await kube_nodes.release_node(name)
    if plan.release:
        kopf.info(body, reason="NodesReleased",
                  message=f"pool {shape.name}: released {_names_summary(plan.release)}")
    return errors


class _SpecChanged(Exception):
    """The spec changed during a scale-up: plan again from the newest one."""


async def _let_go(body: Any, selector: str, claims: Sequence[ObservedClaim],
                  ) -> tuple[list[str], list[str], list[str]]:
    """Deletes the kwok nodes matching the selector, releases the adopted
    ones, and lets Karpenter remove the karpenter ones (`claims`: those
    NodeClaims of theirs still there). Returns (deleted, released, karpenter
    nodes still to go)."""
    found = await call(core().list_node, label_selector=selector)
    by_provider: dict[str, list[str]] = {}
    for n in found.items:
        by_provider.setdefault((n.metadata.labels or {}).get(names.LABEL_PROVIDER, ""), []).append(
            str(n.metadata.name))
    kwok, karpenter = by_provider.pop(PoolProvider.KWOK, []), by_provider.pop(PoolProvider.KARPENTER, [])
    static = [name for names_ in by_provider.values() for name in names_]
    errors = await kube_nodes.delete_nodes(kwok)
    for node in static:
        await kube_nodes.release_node(node)
    karpenter = await karpenter_pools.let_go(body, selector, karpenter, claims)
    if errors:
        raise kopf.TemporaryError(f"{len(errors)} node deletions failed: {errors[:3]}", delay=5)
    return kwok, static, karpenter


async def _remove_orphans(body: Any, owned: dict[str, list[ObservedNode]],
                          pools: dict[str, api.NodePool], claims: dict[str, list[ObservedClaim]]) -> None:
    """Nodes of pools that left the spec: kwok ones are deleted, adopted ones
    released, karpenter ones left to Karpenter."""
    for pool_name in owned.keys() - pools.keys():
        deleted, released, _ = await _let_go(
            body, f"{names.LABEL_CLUSTER}={body['metadata']['name']},{names.LABEL_POOL}={pool_name}",
            claims.get(pool_name, []))
        if deleted or released:
            kopf.info(body, reason="PoolRemoved",
                      message=f"pool {pool_name} left the spec: deleted {len(deleted)} nodes, "
                              f"released {len(released)}")


def _status(body: Any, spec: api.TrainingClusterSpec, counts: dict[str, PoolCounts],
            degraded: ConditionUpdate | None, karpenter: karpenter_pools.KarpenterPass) -> dict[str, Any]:
    ready = sum(c.ready_nodes for c in counts.values())
    desired = sum(c.desired_nodes for c in counts.values())
    healthy_nodes = sum(c.healthy_nodes for c in counts.values())
    settled = all(c.nodes == c.desired_nodes and c.ready_nodes == c.desired_nodes
                  for c in counts.values())
    updates = [
        ConditionUpdate("Ready", settled and degraded is None,
                        "AllNodesReady" if settled else "NodesNotReady",
                        f"{ready}/{desired} nodes ready, {healthy_nodes} healthy"),
        ConditionUpdate("Progressing", not settled,
                        "Scaling" if not settled else "Reconciled",
                        "pools are converging to the spec" if not settled
                        else "every pool is at its declared size"),
        degraded or ConditionUpdate("Degraded", False, "AsExpected", ""),
    ]
    previous = (body.get("status") or {}).get("conditions") or []
    status = api.TrainingClusterStatus(
        observedGeneration=body["metadata"].get("generation", 0),
        pools=[api.PoolStatus(name=p.name, gpu=p.gpu.value, desiredNodes=c.desired_nodes,
                              nodes=c.nodes, readyNodes=c.ready_nodes,
                              healthyNodes=c.healthy_nodes, desiredGPUs=c.desired_gpus,
                              readyGPUs=c.ready_gpus, healthyGPUs=c.healthy_gpus,
                              quarantinedNodes=c.quarantined_nodes,
                              provisioning=karpenter.provisioning.get(p.name))
               for p in spec.pools for c in [counts[p.name]]],
        nodes=f"{ready}/{desired}",
        readyGPUs=sum(c.ready_gpus for c in counts.values()),
        healthyGPUs=sum(c.healthy_gpus for c in counts.values()),
        poolNames=",".join(p.name for p in spec.pools),
        provisioning=karpenter.summary,
        conditions=[],
    ).model_dump(exclude={"remediation"})
    status["conditions"] = merge_conditions(previous, updates, rfc3339(), status["observedGeneration"])
    return status


def _export_metrics(cluster_name: str, spec: api.TrainingClusterSpec,
                    counts: dict[str, PoolCounts]) -> None:
    for pool in spec.pools:
        c = counts[pool.name]
        labels = (cluster_name, pool.name, pool.gpu.value)
        for state, value in (("desired", c.desired_nodes), ("ready", c.ready_nodes),
                             ("healthy", c.healthy_nodes)):
            metrics.pool_nodes.labels(*labels, state).set(value)
        for state, value in (("desired", c.desired_gpus), ("ready", c.ready_gpus),
                             ("healthy", c.healthy_gpus),
                             ("unhealthy", c.ready_gpus - c.healthy_gpus)):
            metrics.pool_gpus.labels(*labels, state).set(value)


def _reconciled_status(body: Any) -> dict[str, Any]:
    """The part of the status the reconcile writes: all but remediation,
    whose one writer is the remediation daemon (a merge patch without the
    key leaves it as that daemon last wrote it)."""
    return {k: v for k, v in (body.get("status") or {}).items() if k != "remediation"}


def _budget_exhausted(body: Any, spec: api.TrainingClusterSpec) -> ConditionUpdate | None:
    """Degraded for the first pool whose faulty nodes wait for the remediation budget."""
    remediation = (body.get("status") or {}).get("remediation") or {}
    for pool in spec.pools:
        waiting = (remediation.get(pool.name) or {}).get("waiting") or []
        if waiting:
            return ConditionUpdate(
                "Degraded", True, "RemediationBudgetExhausted",
                f"pool {pool.name}: {len(waiting)} nodes with GPU faults wait for the remediation "
                f"budget (spec.pools[].remediation.maxUnavailable={pool.remediation.maxUnavailable}): "
                f"{_names_summary(waiting)}")
    return None


async def _write_status(name: str, body: Any, status: dict[str, Any]) -> None:
    if _reconciled_status(body) == status:
        return
    await call(custom().patch_cluster_custom_object_status, names.GROUP, names.VERSION,
               api.PLURAL, name, {"status": status})


async def reconcile(state: OperatorState, name: str, claims_by_cluster: kopf.Index[str, ObservedClaim],
                    logger: Any) -> None:
    await state.synced()
    async with state.reconcile_lock(name):
        started = time.monotonic()
        try:
            while True:
                try:
                    await _reconcile_once(name, state.nodes, state.pods.busy_nodes, claims_by_cluster, logger)
                    break
                except _SpecChanged:
                    logger.info("spec changed during scale-up; planning again from the newest")
        except Exception as err:
            metrics.reconcile_errors_total.labels("TrainingCluster", type(err).__name__).inc()
            raise
        finally:
            metrics.reconcile_duration_seconds.labels("TrainingCluster").observe(
                time.monotonic() - started)


async def _reconcile_once(name: str, index: NodeIndex,
                          busy_nodes: Container[str], claims_by_cluster: kopf.Index[str, ObservedClaim],
                          logger: Any) -> None:
    body = await read_cluster(name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    try:
        spec = api.TrainingClusterSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError as err:
        # The CRD schema should have caught this; say so rather than guess.
        problem = "; ".join(f"spec.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        kopf.warn(body, reason="InvalidSpec", message=problem)
        await _write_status(name, body, {**_reconciled_status(body), "conditions": merge_conditions(
            (body.get("status") or {}).get("conditions") or [],
            [ConditionUpdate("Degraded", True, "InvalidSpec", problem)], rfc3339(),
            body["metadata"].get("generation", 0))})
        return
    pools = {p.name: p for p in spec.pools}
    owned = owned_nodes(index.get(name), busy_nodes)
    plans: dict[str, tuple[PoolShape, PoolPlan]] = {}
    for pool in spec.pools:
        if pool.provider == api.Provider.KARPENTER:
            continue  # Karpenter makes the nodes: handlers/karpenter.py steps the pool
        shape = shape_of(name, pool)
        candidates = await _static_candidates(pool) if pool.provider == api.Provider.STATIC else []
        plans[pool.name] = (shape, plan_pool(shape, owned.get(pool.name, []), candidates))
    conflicts = {p: plan.conflicts for p, (_, plan) in plans.items() if plan.conflicts}
    degraded = None
    karpenter = karpenter_pools.KarpenterPass()
    if conflicts:
        message = "; ".join(
            f"pool {p}: nodes {_names_summary(c)} already belong to another TrainingCluster; "
            "narrow spec.pools[].nodeSelector or release them there" for p, c in conflicts.items())
        degraded = ConditionUpdate("Degraded", True, "StaticNodesClaimed", message)
        kopf.warn(body, reason="StaticNodesClaimed", message=message + " (nothing was changed)")
    else:
        claims = karpenter_pools.claims_of(claims_by_cluster, name)
        await _remove_orphans(body, owned, pools, claims)
        karpenter = await karpenter_pools.reconcile_pools(
            body, [(shape_of(name, p), p) for p in spec.pools], owned, claims)
        errors = list(karpenter.errors)

        async def report() -> None:
            now_owned = owned_nodes(index.get(name), busy_nodes)
            counts = {p.name: count_pool(shape_of(name, p), now_owned.get(p.name, [])) for p in spec.pools}
            status = _status(body, spec, counts, _budget_exhausted(body, spec), karpenter)
            await _write_status(name, body, status)
            body.setdefault("status", {}).update(status)

        for shape, plan in plans.values():
            pool = pools[shape.name]
            if not plan.empty:
                draining = {n.name for n in owned.get(pool.name, []) if n.draining}
                errors += await _apply(body, shape, pool, plan, draining, report)
        if errors:
            message = f"{len(errors)} node writes failed: {_names_summary(errors, 3)}"
            kopf.warn(body, reason="NodeWriteFailed", message=message)
            raise kopf.TemporaryError(message, delay=5)
        degraded = _budget_exhausted(body, spec)
        if any(not plan.empty for _, plan in plans.values()):
            # The status reports what the writes made, not the nodes before
            # them (a scale-up's last word was "0/25000" until the next resync).
            owned = owned_nodes(index.get(name), busy_nodes)
    counts = {p.name: count_pool(shape_of(name, p), owned.get(p.name, [])) for p in spec.pools}
    _export_metrics(name, spec, counts)
    await _write_status(name, body, _status(body, spec, counts, degraded, karpenter))


# Kopf passes its indexes as keyword arguments its handler protocols do not
# declare, hence the ignores on these decorators.
@kopf.on.resume(names.GROUP, names.VERSION, api.PLURAL)
@kopf.on.create(names.GROUP, names.VERSION, api.PLURAL)
@kopf.on.update(names.GROUP, names.VERSION, api.PLURAL, field="spec")  # type: ignore[arg-type]
async def cluster_changed(*, name: str, memo: Any, claims_by_cluster: kopf.Index[str, ObservedClaim],
                          logger: Any, **_: Any) -> None:
    await reconcile(state_of(memo), name, claims_by_cluster, logger)


@kopf.timer(names.GROUP, names.VERSION, api.PLURAL, interval=RESYNC_INTERVAL_S,  # type: ignore[arg-type]
            initial_delay=RESYNC_INTERVAL_S)
async def cluster_resync(*, name: str, memo: Any, claims_by_cluster: kopf.Index[str, ObservedClaim],
                         logger: Any, **_: Any) -> None:
    await reconcile(state_of(memo), name, claims_by_cluster, logger)


@kopf.on.delete(names.GROUP, names.VERSION, api.PLURAL)  # type: ignore[arg-type]
async def cluster_deleted(*, name: str, body: Any, memo: Any, claims_by_cluster: kopf.Index[str, ObservedClaim],
                          logger: Any, **_: Any) -> None:
    """Deletes the nodes the cluster created and releases those it adopted;
    waits for Karpenter to remove the nodes of karpenter pools."""
    deleted, released, karpenter = await _let_go(body, f"{names.LABEL_CLUSTER}={name}",
                                                 list(claims_by_cluster.get(name, [])))
    logger.info(f"deleted {len(deleted)} nodes, released {len(released)}")
    if karpenter:
        raise kopf.TemporaryError(f"deleted the NodePools; waiting for Karpenter to remove {len(karpenter)} "
                                  f"nodes ({_names_summary(karpenter)})", delay=5)
    state = state_of(memo)
    state.reconcile_locks.pop(name, None)
    state.planner_caches.pop(name, None)  # as large as the cluster's nodes: not kept past it
