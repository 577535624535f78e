"""Karpenter pools (provider: karpenter): the NodeClaim index, and one
reconcile step of such a pool, which the TrainingCluster reconcile calls.
The decisions are planning/karpenter.py's; this reads, applies, reports.

Where Karpenter's CRDs are not installed the index simply stays empty: Kopf
starts watching NodeClaims when their CRD appears.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import kopf
import kubernetes

from gpucluster import metrics, names
from gpucluster.api import cluster as api
from gpucluster.kube import karpenter as kube_karpenter
from gpucluster.kube import nodes as kube_nodes
from gpucluster.kube.client import status_of
from gpucluster.planning.karpenter import (
    LISTED_CLAIMS,
    ClaimCounts,
    NodeClassRef,
    NodePoolTemplate,
    ObservedClaim,
    ObservedNodePool,
    count_claims,
    nodepool_current,
    nodepool_manifest,
    observe_claim,
    observe_nodepool,
    plan_karpenter_pool,
    provisioning_summary,
)
from gpucluster.planning.pools import ObservedNode, PoolShape
from gpucluster.planning.remediation import RemediationBudget
from gpucluster.timestamps import epoch


@kopf.index(names.KARPENTER_GROUP, names.KARPENTER_VERSION, names.KARPENTER_NODECLAIMS,
            labels={names.LABEL_CLUSTER: kopf.PRESENT})
def claims_by_cluster(*, body: Any, labels: Any, meta: Any, **_: Any) -> dict[str, ObservedClaim]:
    return {labels[names.LABEL_CLUSTER]: observe_claim(body, epoch(meta["creationTimestamp"]))}


def claims_of(index: kopf.Index[str, ObservedClaim], cluster: str) -> dict[str, list[ObservedClaim]]:
    by_pool: dict[str, list[ObservedClaim]] = {}
    for claim in index.get(cluster, []):
        by_pool.setdefault(claim.pool, []).append(claim)
    return by_pool


# Providers whose nodes remediation replaces after a fatal GPU fault.
REPLACEABLE = (api.Provider.KWOK, api.Provider.KARPENTER)


async def replace_node(cluster: str, pool: api.NodePool, name: str) -> None:
    """A kwok node is deleted and the pool creates another; a karpenter
    node's NodeClaim is deleted and Karpenter launches another."""
    if pool.provider == api.Provider.KARPENTER:
        await kube_karpenter.delete_nodeclaim_of(cluster, pool.name, name)
    else:
        await kube_nodes.delete_nodes([name])


def surge_of(pool: api.NodePool) -> int:
    """Room above replicas for replacements launching before the nodes they
    replace are gone: as many as remediation may take out at once."""
    budget = RemediationBudget(max_unavailable=pool.remediation.maxUnavailable)
    return max(1, budget.unavailable_allowed(pool.nodes))


def nodepool_template(shape: PoolShape, pool: api.NodePool) -> NodePoolTemplate:
    assert pool.nodeClassRef is not None, "the CRD requires nodeClassRef for provider karpenter"
    nodes = kube_nodes.PoolNodeTemplate(shape=shape, gpu=pool.gpu, labels=pool.labels)
    return NodePoolTemplate(
        cluster=shape.cluster, pool=shape.name,
        node_class=NodeClassRef(pool.nodeClassRef.group, pool.nodeClassRef.kind, pool.nodeClassRef.name),
        instance_types=pool.instance_types(),
        labels={**nodes.gpu_labels(), **pool.labels, names.LABEL_CLUSTER: shape.cluster,
                names.LABEL_POOL: shape.name, names.LABEL_PROVIDER: shape.provider.value,
                names.LABEL_MANAGED_BY: names.MANAGED_BY},
        taints=[t.model_dump() for t in pool.taints],
        drift_budget=surge_of(pool),
    )


async def reconcile_pool(body: Any, shape: PoolShape, pool: api.NodePool, nodes: Sequence[ObservedNode],
                         claims: Sequence[ObservedClaim]) -> tuple[api.PoolProvisioning, ClaimCounts, list[str]]:
    """One step of a karpenter pool: the NodePool's shape, a scale-down's
    victims, the nodes' labels. Returns the pool's provisioning status, its
    claim counts and the writes that failed."""
    template = nodepool_template(shape, pool)
    observed = observe_nodepool(await kube_karpenter.read_nodepool(template.name))
    plan = plan_karpenter_pool(shape, surge_of(pool), observed, claims, nodes)
    manifest = nodepool_manifest(template, plan.replicas, plan.node_limit)
    if not nodepool_current(observed, manifest):
        try:
            await kube_karpenter.apply_nodepool(manifest)
        except kubernetes.client.ApiException as err:
            # Server-side apply creates: a 404 means the API is not served.
            why = ("Karpenter's CRDs (NodePool karpenter.sh/v1) are not installed; install Karpenter (>= 1.8, "
                   "feature gate StaticCapacity=true) or use another provider" if status_of(err) == 404
                   else f"{err.status} {err.reason}: {err.body}")
            return _unapplied(template.name, observed), ClaimCounts(), [
                f"pool {shape.name}: NodePool {template.name}: {why}"]
    labels = (shape.cluster, shape.name, pool.gpu.value)
    for name in plan.drain:
        await kube_nodes.set_draining(name, True, reason="scale-down")
        await kube_nodes.evict_pods(name)
    draining = {n.name for n in nodes if n.draining}
    if newly_draining := [n for n in plan.drain if n not in draining]:
        kopf.info(body, reason="NodesDraining",
                  message=f"pool {shape.name}: scaling down to {shape.desired_nodes}: draining "
                          f"{', '.join(newly_draining)} before their NodeClaims are deleted")
    errors = await kube_karpenter.delete_nodeclaims(plan.delete_claims)
    if plan.delete_claims:
        metrics.nodes_deleted_total.labels(*labels).inc(len(plan.delete_claims) - len(errors))
        kopf.info(body, reason="NodeClaimsDeleted",
                  message=f"pool {shape.name}: deleted NodeClaims {', '.join(plan.delete_claims)} "
                          "(the nodes the pool chose to remove); Karpenter terminates them")
    for name in plan.undrain:
        await kube_nodes.set_draining(name, False)
    for node in plan.label:
        await kube_karpenter.label_node(node)
    counts = count_claims(claims, time.time(), pool.slow_launch_seconds())
    status = api.PoolProvisioning(
        nodePool=template.name,
        nodePoolReady=observed.ready if observed else "Unknown",
        message=observed.message if observed else "",
        nodeClaims=counts.claims, launched=counts.launched, registered=counts.registered,
        initialized=counts.initialized, ready=counts.ready,
        slow=[c.name for c in counts.slow[:LISTED_CLAIMS]],
        failed=[c.name for c in counts.failed[:LISTED_CLAIMS]])
    _announce(body, shape.name, status, counts)
    return status, counts, errors


def _unapplied(name: str, observed: ObservedNodePool | None) -> api.PoolProvisioning:
    return api.PoolProvisioning(nodePool=name, nodePoolReady=observed.ready if observed else "Unknown",
                                message=observed.message if observed else "the NodePool could not be written")


def _announce(body: Any, pool: str, status: api.PoolProvisioning, counts: ClaimCounts) -> None:
    """Warnings for what is newly wrong since the status last written: a
    NodePool Karpenter will not launch from, slow and failed NodeClaims."""
    before = next((p.get("provisioning") or {} for p in (body.get("status") or {}).get("pools") or []
                   if p.get("name") == pool), {})
    if status.nodePoolReady == "False" and (before.get("nodePoolReady"), before.get("message")) != (
            "False", status.message):
        kopf.warn(body, reason="NodePoolNotReady",
                  message=f"pool {pool}: Karpenter launches nothing from NodePool {status.nodePool}: "
                          f"{status.message} (check spec.pools[].nodeClassRef and instanceTypes)")
    for claim in counts.slow[:LISTED_CLAIMS]:
        if claim.name not in before.get("slow", []):
            kopf.warn(body, reason="NodeClaimSlow",
                      message=f"pool {pool}: NodeClaim {claim.name} is {claim.stage} "
                              f"{time.time() - claim.created:.0f} s after its creation"
                              + (f" (node {claim.node})" if claim.node else ""))
    for claim in counts.failed[:LISTED_CLAIMS]:
        if claim.name not in before.get("failed", []):
            kopf.warn(body, reason="NodeClaimLaunchFailed",
                      message=f"pool {pool}: NodeClaim {claim.name} failed to launch: {claim.launch_failure}")


async def remove_nodepools(selector: str, keep: Collection[str] = ()) -> list[str]:
    """Deletes the NodePools matching the selector but those of the pools in
    `keep`; returns the pools whose NodePool went."""
    gone = []
    for nodepool in await kube_karpenter.list_nodepools(selector):
        pool = (nodepool["metadata"].get("labels") or {}).get(names.LABEL_POOL, "")
        if pool not in keep:
            await kube_karpenter.delete_nodepool(nodepool["metadata"]["name"])
            gone.append(pool)
    return gone


async def let_go(body: Any, selector: str, nodes: Sequence[str], claims: Sequence[ObservedClaim]) -> list[str]:
    """Deletes the NodePools matching the selector, and so (Kubernetes'
    garbage collector, then Karpenter) their NodeClaims and `nodes`. Returns
    the nodes still to go. Once no claim is left, a node still there is an
    orphan nothing else removes (Karpenter's KWOK provider creates a node
    asynchronously, and can do so after its claim was deleted): it is
    deleted here."""
    await remove_nodepools(selector)
    if claims or not nodes:
        return list(nodes)
    errors = await kube_nodes.delete_nodes(nodes)
    kopf.warn(body, reason="OrphanNodesDeleted",
              message=f"{len(nodes)} nodes ({', '.join(nodes[:5])}) outlived their NodeClaims: "
                      + (f"deleting them failed: {errors[:3]}" if errors else "deleted them"))
    return list(nodes) if errors else []


@dataclasses.dataclass
class KarpenterPass:
    """What one reconcile of a cluster's karpenter pools reports."""

    provisioning: dict[str, api.PoolProvisioning] = dataclasses.field(default_factory=dict)
    summary: str = ""
    errors: list[str] = dataclasses.field(default_factory=list)


async def reconcile_pools(body: Any, pools: Sequence[tuple[PoolShape, api.NodePool]],
                          owned: Mapping[str, Sequence[ObservedNode]],
                          claims: Mapping[str, Sequence[ObservedClaim]]) -> KarpenterPass:
    """One step of each karpenter pool of the cluster (`claims`: its
    NodeClaims by pool), and the NodePools of pools that left the spec
    deleted (Karpenter then removes their nodes)."""
    cluster = body["metadata"]["name"]
    done = KarpenterPass()
    counts = []
    for shape, pool in pools:
        if pool.provider != api.Provider.KARPENTER:
            continue
        status, pool_counts, errors = await reconcile_pool(body, shape, pool, owned.get(pool.name, []),
                                                           claims.get(pool.name, []))
        done.provisioning[pool.name] = status
        done.errors += errors
        counts.append(pool_counts)
    kept = [shape.name for shape, pool in pools if pool.provider == api.Provider.KARPENTER]
    # A pool leaves the spec in an edit (a generation not yet reconciled);
    # claims of a pool not kept say an earlier removal is unfinished.
    edited = body["metadata"].get("generation") != (body.get("status") or {}).get("observedGeneration")
    if edited or claims.keys() - set(kept):
        for gone in await remove_nodepools(f"{names.LABEL_CLUSTER}={cluster}", kept):
            kopf.info(body, reason="PoolRemoved",
                      message=f"pool {gone} is no longer a karpenter pool of the spec: deleted its NodePool; "
                              "Karpenter drains and removes its nodes")
    done.summary = provisioning_summary(counts, sum(s.desired_nodes for s, p in pools
                                                    if p.provider == api.Provider.KARPENTER))
    return done

