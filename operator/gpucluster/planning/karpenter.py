"""Karpenter pools: the NodePool the operator owns for a pool, the scale-down
that picks its own victims, node numbering and topology, and NodeClaim
progress. Pure: plain data in, a plan out.

Karpenter (>= 1.8, feature gate StaticCapacity) keeps `spec.replicas`
NodeClaims of a NodePool that sets replicas. Lowering replicas lets
Karpenter choose which nodes go (unlaunched claims, then empty nodes, then
the cheapest to disrupt, and users report it ignoring do-not-disrupt). A
training pool chooses itself: a node of a running gang costs the gang all
its work since the last checkpoint. So a scale-down goes:

1. hold: `limits.nodes` drops to the new size. Karpenter counts NodeClaims
   being deleted against the limit, so while ours go it launches none.
2. drain the chosen nodes (cordon, evict) and delete their NodeClaims;
   Karpenter terminates them.
3. once they are gone, `replicas` drops to the new size and `limits.nodes`
   returns to the size plus the surge. Karpenter then counts exactly
   `replicas` claims and has nothing left to remove.

Outside a scale-down `limits.nodes` is `replicas` plus a surge of at least
one, so a replacement (a remediated node, a drifted one) can launch before
the node it replaces is gone: a limit equal to replicas deadlocks drift
(aws/karpenter-provider-aws#8873). Every step is recomputed from what is
observed (the NodePool, the claims, the nodes), so a restart anywhere
resumes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpucluster import names
from gpucluster.planning.pools import (
    NodeToCreate,
    ObservedNode,
    PoolShape,
    block_of,
    free_ordinals,
    rack_of,
    removal_order,
)

# Karpenter's disruption reasons: consolidation of either kind never touches
# a training pool; drift (a template edit) replaces nodes a budget at a time.
CONSOLIDATION_REASONS = ("Empty", "Underutilized")
DRIFT_REASON = "Drifted"
# How many slow or failed NodeClaims a pool's status names.
LISTED_CLAIMS = 20
_STAGES = ("Launched", "Registered", "Initialized", "Ready")


def nodepool_name(cluster: str, pool: str) -> str:
    return f"{cluster}-{pool}"


def provider_topology(labels: Mapping[str, str]) -> tuple[str, str] | None:
    """(block, rack) from the cloud's topology labels: on AWS the middle
    network layer is the block and the bottom one, which the instance hangs
    off, the rack. None where the node has no such labels."""
    block = labels.get(names.LABEL_AWS_NETWORK_LAYER_2, "")
    rack = labels.get(names.LABEL_AWS_NETWORK_LAYER_3, "")
    return (block, rack) if block and rack else None


@dataclass(frozen=True)
class ObservedClaim:
    """A NodeClaim as the operator sees it through its index."""

    name: str
    pool: str
    node: str = ""
    deleting: bool = False
    created: float = 0.0
    launched: bool = False
    registered: bool = False
    initialized: bool = False
    ready: bool = False
    # "Reason: message" of a launch Karpenter reported failed.
    launch_failure: str = ""

    @property
    def stage(self) -> str:
        """The furthest stage reached, e.g. 'Registered, not Initialized'."""
        reached = [s for s, done in zip(_STAGES, (self.launched, self.registered, self.initialized,
                                                  self.ready), strict=True) if done]
        missing = [s for s in _STAGES if s not in reached]
        if not missing:
            return "Ready"
        return f"{reached[-1]}, not {missing[0]}" if reached else f"not {missing[0]}"


def observe_claim(claim: Mapping[str, Any], created: float) -> ObservedClaim:
    """An ObservedClaim from a NodeClaim object; `created` is its
    creationTimestamp in epoch seconds."""
    meta, status = claim["metadata"], claim.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}

    def true(kind: str) -> bool:
        return bool(conditions.get(kind, {}).get("status") == "True")

    launched = conditions.get("Launched", {})
    # Karpenter marks every condition Unknown/AwaitingReconciliation at
    # first; any other reason on a Launched that is not True is a failure.
    failed = (bool(launched) and launched.get("status") != "True"
              and launched.get("reason") not in (None, "", "AwaitingReconciliation"))
    return ObservedClaim(
        name=meta["name"], pool=(meta.get("labels") or {}).get(names.LABEL_POOL, ""),
        node=status.get("nodeName") or "", deleting=bool(meta.get("deletionTimestamp")), created=created,
        launched=true("Launched"), registered=true("Registered"), initialized=true("Initialized"),
        ready=true("Ready"),
        launch_failure=f"{launched.get('reason')}: {launched.get('message', '')}".strip() if failed else "",
    )


@dataclass(frozen=True)
class ObservedNodePool:
    replicas: int | None
    node_limit: int | None
    applied: str
    ready: str = "Unknown"
    message: str = ""


def observe_nodepool(nodepool: Mapping[str, Any] | None) -> ObservedNodePool | None:
    if nodepool is None:
        return None
    spec = nodepool.get("spec") or {}
    limit = (spec.get("limits") or {}).get("nodes")
    ready: Mapping[str, Any] = next((c for c in (nodepool.get("status") or {}).get("conditions") or []
                                     if c.get("type") == "Ready"), {})
    return ObservedNodePool(
        replicas=spec.get("replicas"), node_limit=int(limit) if limit is not None else None,
        applied=(nodepool["metadata"].get("annotations") or {}).get(names.ANNOTATION_NODEPOOL_APPLIED, ""),
        ready=ready.get("status", "Unknown"), message=ready.get("message", ""))


@dataclass(frozen=True)
class NodeClassRef:
    group: str
    kind: str
    name: str


@dataclass(frozen=True)
class NodePoolTemplate:
    """What every NodeClaim of a karpenter pool carries: the pool's
    identity labels and taints. Changing any of it is Karpenter's drift: it
    replaces every node, `drift_budget` at a time."""

    cluster: str
    pool: str
    node_class: NodeClassRef
    instance_types: tuple[str, ...]
    labels: Mapping[str, str]
    taints: Sequence[Mapping[str, str]]
    drift_budget: int

    @property
    def name(self) -> str:
        return nodepool_name(self.cluster, self.pool)


def nodepool_manifest(template: NodePoolTemplate, replicas: int, node_limit: int) -> dict[str, Any]:
    """The NodePool, as server-side apply sends it. Its annotation
    `gpucluster.dev/applied` is a digest of the rest, so a pass that would
    send the same thing again can skip the write."""
    body: dict[str, Any] = {
        "apiVersion": f"{names.KARPENTER_GROUP}/{names.KARPENTER_VERSION}",
        "kind": "NodePool",
        "metadata": {
            "name": template.name,
            "labels": {names.LABEL_CLUSTER: template.cluster, names.LABEL_POOL: template.pool,
                       names.LABEL_MANAGED_BY: names.MANAGED_BY},
        },
        "spec": {
            "replicas": replicas,
            "limits": {"nodes": str(node_limit)},
            "disruption": {
                # Ignored by Karpenter for a NodePool with replicas, and zero
                # budgets for both reasons should it ever not be.
                "consolidationPolicy": "WhenEmpty",
                "consolidateAfter": "Never",
                "budgets": [{"nodes": "0", "reasons": list(CONSOLIDATION_REASONS)},
                            {"nodes": str(template.drift_budget), "reasons": [DRIFT_REASON]}],
            },
            "template": {
                "metadata": {"labels": dict(sorted(template.labels.items()))},
                "spec": {
                    "nodeClassRef": {"group": template.node_class.group, "kind": template.node_class.kind,
                                     "name": template.node_class.name},
                    "requirements": [{"key": names.LABEL_INSTANCE_TYPE, "operator": "In",
                                      "values": list(template.instance_types)}],
                    "taints": [dict(t) for t in template.taints],
                    # Expiry is forceful and ignores budgets: a training node
                    # lives until the pool or remediation says otherwise.
                    "expireAfter": "Never",
                },
            },
        },
    }
    body["metadata"]["annotations"] = {names.ANNOTATION_NODEPOOL_APPLIED: digest(body)}
    return body


def digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def nodepool_current(observed: ObservedNodePool | None, manifest: Mapping[str, Any]) -> bool:
    """Whether the NodePool already is what `manifest` asks: our digest, and
    the replicas and limit someone might have edited by hand."""
    if observed is None:
        return False
    spec = manifest["spec"]
    return (observed.applied == manifest["metadata"]["annotations"][names.ANNOTATION_NODEPOOL_APPLIED]
            and observed.replicas == spec["replicas"] and observed.node_limit == int(spec["limits"]["nodes"]))


@dataclass(frozen=True)
class KarpenterPlan:
    replicas: int
    node_limit: int
    # Nodes to cordon and evict, NodeClaims to delete (a scale-down's
    # victims), nodes whose scale-down is no longer wanted.
    drain: tuple[str, ...] = ()
    delete_claims: tuple[str, ...] = ()
    undrain: tuple[str, ...] = ()
    # Nodes to (re)label with their ordinal, rack and block.
    label: tuple[NodeToCreate, ...] = ()


def claim_removal_order(claim: ObservedClaim, node: ObservedNode | None) -> tuple[Any, ...]:
    """Sort key of NodeClaims to remove first: those with no node yet
    (unlaunched first), then by the node's removal_order (empty before busy,
    so never a node of a running gang while an empty one could go)."""
    if node is None:
        return (False, claim.launched, (), claim.name)
    return (True, True, removal_order(node), claim.name)


def plan_karpenter_pool(shape: PoolShape, surge: int, nodepool: ObservedNodePool | None,
                        claims: Sequence[ObservedClaim], nodes: Sequence[ObservedNode]) -> KarpenterPlan:
    """One step that brings a karpenter pool to `shape.desired_nodes`.

    Victims' NodeClaims are deleted only once the NodePool, as read at the
    start of this step, already holds (its limit at the new size): Karpenter
    sees NodePools and NodeClaims through separate watches, and a deletion
    seen before the lower limit would launch a replacement. The step that
    lowers the limit only cordons and evicts; the next one deletes."""
    desired = shape.desired_nodes
    by_name = {n.name: n for n in nodes}
    active = [c for c in claims if not c.deleting]
    deleting = [c for c in claims if c.deleting]
    current = desired if nodepool is None or nodepool.replicas is None else nodepool.replicas
    excess = len(active) - desired
    victims: list[ObservedClaim] = []
    if excess > 0 or (current > desired and deleting):
        victims = sorted(active, key=lambda c: claim_removal_order(c, by_name.get(c.node)))[:max(0, excess)]
        replicas, node_limit = max(current, len(active)), desired
    else:
        replicas, node_limit = desired, desired + max(1, surge)
    held = nodepool is not None and nodepool.node_limit is not None and nodepool.node_limit <= desired
    victim_nodes = [by_name[c.node] for c in victims if c.node in by_name]
    busy = {n.name for n in victim_nodes if n.busy}
    leaving = {c.node for c in deleting} | {n.name for n in victim_nodes}
    return KarpenterPlan(
        replicas=replicas, node_limit=node_limit,
        drain=tuple(sorted(n.name for n in victim_nodes)),
        delete_claims=tuple(sorted(c.name for c in victims if c.node not in busy)) if held else (),
        undrain=tuple(sorted(n.name for n in nodes if n.draining and n.name not in leaving)),
        label=plan_labels(shape, [n for n in nodes if n.name not in leaving]),
    )


def plan_labels(shape: PoolShape, nodes: Sequence[ObservedNode]) -> tuple[NodeToCreate, ...]:
    """Ordinals for the nodes Karpenter launched (the lowest free, by node
    name), and each node's block and rack: the cloud's where it says, else
    the pool's topology by ordinal, as for kwok nodes."""
    unnumbered = sorted(n.name for n in nodes if n.ordinal < 0)
    fresh = dict(zip(unnumbered, free_ordinals((n.ordinal for n in nodes if n.ordinal >= 0), len(unnumbered)),
                     strict=True))
    out = []
    for node in sorted(nodes, key=lambda n: n.name):
        ordinal = fresh.get(node.name, node.ordinal)
        block, rack = node.provider_topology or (block_of(shape, ordinal), rack_of(shape, ordinal))
        if (node.ordinal, node.block, node.rack) != (ordinal, block, rack):
            out.append(NodeToCreate(name=node.name, ordinal=ordinal, rack=rack, block=block))
    return tuple(out)


@dataclass(frozen=True)
class ClaimCounts:
    """A pool's NodeClaims by launch stage, and those slow or failed."""

    claims: int = 0
    launched: int = 0
    registered: int = 0
    initialized: int = 0
    ready: int = 0
    slow: tuple[ObservedClaim, ...] = ()
    failed: tuple[ObservedClaim, ...] = ()


def count_claims(claims: Sequence[ObservedClaim], now: float, slow_after: float) -> ClaimCounts:
    """Counts stages; a claim not Ready `slow_after` seconds after its
    creation is slow (GPU nodes that never finish initialising are a known
    Karpenter failure: Karpenter itself waits on them forever)."""
    live = [c for c in claims if not c.deleting]
    return ClaimCounts(
        claims=len(claims),
        launched=sum(c.launched for c in claims),
        registered=sum(c.registered for c in claims),
        initialized=sum(c.initialized for c in claims),
        ready=sum(c.ready for c in claims),
        slow=tuple(sorted((c for c in live if not c.ready and not c.launch_failure
                           and now - c.created >= slow_after), key=lambda c: c.name)),
        failed=tuple(sorted((c for c in live if c.launch_failure), key=lambda c: c.name)),
    )


def provisioning_summary(counts: Sequence[ClaimCounts], desired: int) -> str:
    """The `kubectl get tc` column: karpenter pools' claims by stage."""
    if not counts:
        return ""
    launched, registered, initialized, ready = (sum(getattr(c, stage) for c in counts)
                                                for stage in ("launched", "registered", "initialized", "ready"))
    return f"{launched}/{desired} launched, {registered} registered, {initialized} initialized, {ready} ready"
