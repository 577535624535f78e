"""Pool reconciliation: from a pool's spec and the nodes observed for it, what
to create, adopt, drain, delete and release. Pure: plain data in, a plan out.

The labels on the nodes are the whole state. A kwok node's name carries its
ordinal (`<cluster>-<pool>-<ordinal>`), so a restart at any moment can neither
duplicate a node (the name already exists) nor leak one (the labels say whose
it is).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from functools import cached_property
from operator import attrgetter

ORDINAL_DIGITS = 5


class PoolProvider(StrEnum):
    KWOK = "kwok"
    STATIC = "static"
    KARPENTER = "karpenter"


@dataclass(frozen=True)
class PoolShape:
    """What a pool's spec asks for, in the terms planning needs."""

    cluster: str
    name: str
    provider: PoolProvider
    desired_nodes: int
    gpus_per_node: int
    nodes_per_rack: int
    racks_per_block: int


@dataclass(frozen=True)
class ObservedNode:
    """A node as the operator sees it through its index. A node Karpenter
    launched has ordinal -1 until the operator numbers it."""

    name: str
    pool: str
    ordinal: int
    ready: bool = True
    gpu_healthy: bool = True
    cordoned: bool = False
    busy: bool = False
    draining: bool = False
    gpus: int = 8
    block: str = ""
    rack: str = ""
    gpu_fault: str = ""
    quarantined: bool = False
    # When Ready last left True, and when GPUHealthy last turned False
    # (epoch seconds; None when unknown or not in that state).
    not_ready_since: float | None = None
    gpu_fault_since: float | None = None
    # (block, rack) from the cloud's own topology labels, where it has them.
    provider_topology: tuple[str, str] | None = None

    @cached_property
    def fingerprint(self) -> int:
        """The hash of its fields. Every admission cycle fingerprints every
        node (lifecycle.planner_inputs), 25,000 of them, nearly all the same
        objects as the cycle before: frozen, so hashed once."""
        return hash(_observed_fields(self))

    def __hash__(self) -> int:
        return self.fingerprint


_observed_fields = attrgetter(*(f.name for f in fields(ObservedNode)))


@dataclass(frozen=True)
class StaticCandidate:
    """An existing node that a static pool's nodeSelector matches."""

    name: str
    claimed_by: str | None = None


@dataclass(frozen=True)
class NodeToCreate:
    name: str
    ordinal: int
    rack: str
    block: str


@dataclass(frozen=True)
class PoolPlan:
    create: tuple[NodeToCreate, ...] = ()
    adopt: tuple[NodeToCreate, ...] = ()
    delete: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    undrain: tuple[str, ...] = ()
    release: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not (self.create or self.adopt or self.delete or self.drain or self.undrain
                    or self.release)


def node_name(cluster: str, pool: str, ordinal: int) -> str:
    return f"{cluster}-{pool}-{ordinal:0{ORDINAL_DIGITS}d}"


def ordinal_of(cluster: str, pool: str, name: str) -> int | None:
    """The ordinal in a kwok node's name, or None when the name is not one of ours."""
    prefix = f"{cluster}-{pool}-"
    suffix = name[len(prefix):]
    if not name.startswith(prefix) or len(suffix) != ORDINAL_DIGITS or not suffix.isdigit():
        return None
    return int(suffix)


def rack_of(shape: PoolShape, ordinal: int) -> str:
    return f"r{ordinal // shape.nodes_per_rack:04d}"


def block_of(shape: PoolShape, ordinal: int) -> str:
    return f"b{ordinal // (shape.nodes_per_rack * shape.racks_per_block):03d}"


def _placed(shape: PoolShape, name: str, ordinal: int) -> NodeToCreate:
    return NodeToCreate(name=name, ordinal=ordinal, rack=rack_of(shape, ordinal),
                        block=block_of(shape, ordinal))


def free_ordinals(taken: Iterable[int], count: int) -> list[int]:
    """The `count` lowest ordinals not taken: scale-up refills holes first so
    racks and blocks stay full."""
    used = set(taken)
    free: list[int] = []
    candidate = 0
    while len(free) < count:
        if candidate not in used:
            free.append(candidate)
        candidate += 1
    return free


def removal_order(node: ObservedNode) -> tuple[bool, bool, bool, bool, int]:
    """Sort key of nodes to remove first: empty before busy (never a busy node
    while an empty one could go), then already draining, broken before
    healthy, and the highest ordinal first so the low racks stay whole."""
    return (node.busy, not node.draining, node.ready and node.gpu_healthy, node.ready,
            -node.ordinal)


def plan_pool(
    shape: PoolShape,
    owned: Sequence[ObservedNode],
    static_candidates: Sequence[StaticCandidate] = (),
) -> PoolPlan:
    """One step that brings the pool to its desired size.

    Scale-down deletes empty nodes at once and drains busy ones (cordon and
    evict, again on every step until they are empty; they are deleted in a
    later step, once empty). A static pool adopts
    and releases nodes but never deletes one. Nodes draining for a scale-down
    that is no longer wanted are uncordoned.
    """
    excess = len(owned) - shape.desired_nodes
    if shape.provider is PoolProvider.STATIC:
        return _plan_static(shape, owned, static_candidates, excess)
    if excess < 0:
        ordinals = free_ordinals((n.ordinal for n in owned), -excess)
        creates = tuple(_placed(shape, node_name(shape.cluster, shape.name, o), o)
                        for o in ordinals)
        return PoolPlan(create=creates, undrain=_undrain(owned, ()))
    leaving = sorted(owned, key=removal_order)[:excess]
    delete = tuple(n.name for n in leaving if not n.busy)
    drain = tuple(n.name for n in leaving if n.busy)
    return PoolPlan(delete=delete, drain=drain, undrain=_undrain(owned, leaving))


def _undrain(owned: Sequence[ObservedNode], leaving: Sequence[ObservedNode]) -> tuple[str, ...]:
    leaving_names = {n.name for n in leaving}
    return tuple(n.name for n in owned if n.draining and n.name not in leaving_names)


def _plan_static(
    shape: PoolShape,
    owned: Sequence[ObservedNode],
    candidates: Sequence[StaticCandidate],
    excess: int,
) -> PoolPlan:
    owned_names = {n.name for n in owned}
    conflicts = tuple(sorted(
        c.name for c in candidates
        if c.claimed_by not in (None, shape.cluster) and c.name not in owned_names
    ))
    if conflicts:
        return PoolPlan(conflicts=conflicts)
    if excess >= 0:
        leaving = sorted(owned, key=removal_order)[:excess]
        release = tuple(n.name for n in leaving if not n.busy)
        drain = tuple(n.name for n in leaving if n.busy)
        return PoolPlan(release=release, drain=drain, undrain=_undrain(owned, leaving))
    free = sorted(c.name for c in candidates if c.claimed_by is None and c.name not in owned_names)
    chosen = free[:-excess]
    ordinals = free_ordinals((n.ordinal for n in owned), len(chosen))
    adopt = tuple(_placed(shape, name, o) for name, o in zip(chosen, ordinals, strict=True))
    return PoolPlan(adopt=adopt, undrain=_undrain(owned, ()))


@dataclass(frozen=True)
class PoolCounts:
    desired_nodes: int
    nodes: int
    ready_nodes: int
    healthy_nodes: int
    desired_gpus: int
    ready_gpus: int
    healthy_gpus: int
    quarantined_nodes: int


def count_pool(shape: PoolShape, owned: Sequence[ObservedNode]) -> PoolCounts:
    ready = [n for n in owned if n.ready]
    healthy = [n for n in ready if n.gpu_healthy and not n.cordoned]
    return PoolCounts(
        desired_nodes=shape.desired_nodes,
        nodes=len(owned),
        ready_nodes=len(ready),
        healthy_nodes=len(healthy),
        desired_gpus=shape.desired_nodes * shape.gpus_per_node,
        ready_gpus=sum(n.gpus for n in ready),
        healthy_gpus=sum(n.gpus for n in healthy),
        quarantined_nodes=sum(1 for n in owned if n.quarantined),
    )
