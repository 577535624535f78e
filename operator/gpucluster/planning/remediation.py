"""Remediation of GPU faults under a budget: which nodes to quarantine now,
which to drain, replace or give back, and which must wait.

A node whose GPUHealthy condition turns False is cordoned and tainted
`nvidia.com/gpu-error` at once (its gangs restart elsewhere), as long as the
pool's budget allows. A fatal fault is then drained and, in a kwok pool,
replaced by a new node; a static node stays quarantined for a person. A
transient fault that clears is given back (uncordoned) without replacement.

The budget is NVSentinel's circuit breaker: at most `maxUnavailable` nodes of
a pool out at once (quarantined, NotReady or missing), and at most
`maxPerWindow` new quarantines in a sliding window. A storm that would pass
either waits, and the pool reports its budget exhausted, so a bad driver
push or a flapping sensor never empties a pool.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RemediationBudget:
    max_unavailable: int | str = "10%"
    max_per_window: int = 0
    window_seconds: float = 600.0
    replace: bool = True

    def unavailable_allowed(self, desired_nodes: int) -> int:
        """maxUnavailable as a node count; a percent rounds down, but never
        to zero while the percent is positive (a pool must be able to heal)."""
        if isinstance(self.max_unavailable, int):
            return self.max_unavailable
        percent = int(self.max_unavailable.rstrip("%"))
        return max(1 if percent > 0 else 0, math.floor(desired_nodes * percent / 100))


@dataclass(frozen=True)
class NodeHealth:
    name: str
    ready: bool = True
    gpu_healthy: bool = True
    fault_reason: str = ""
    fatal: bool = False
    quarantined: bool = False
    busy: bool = False


@dataclass(frozen=True)
class RemediationPlan:
    quarantine: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    replace: tuple[str, ...] = ()
    release: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    unavailable: int = 0
    allowed: int = 0

    @property
    def budget_exhausted(self) -> bool:
        return bool(self.waiting)


def plan_remediation(
    nodes: Sequence[NodeHealth],
    desired_nodes: int,
    budget: RemediationBudget,
    recent_quarantines: Sequence[float],
    now: float,
    can_replace: bool,
    present_nodes: int | None = None,
    unlisted_not_ready: int = 0,
) -> RemediationPlan:
    """One step of remediation for one pool. `nodes` may leave out the nodes
    with healthy GPUs and no quarantine, for which nothing is planned, when
    `present_nodes` counts every node of the pool and `unlisted_not_ready`
    those of them left out that are not Ready: at 25,000 nodes, a pass then
    looks at the faulty few, not at every node still coming up."""
    quarantined = [n for n in nodes if n.quarantined]
    release = tuple(n.name for n in quarantined if n.gpu_healthy and n.ready)
    fatal = [n for n in quarantined if not n.gpu_healthy and n.fatal]
    drain = tuple(n.name for n in fatal if n.busy)
    replace = tuple(n.name for n in fatal if not n.busy and can_replace and budget.replace)

    missing = max(0, desired_nodes - (len(nodes) if present_nodes is None else present_nodes))
    not_ready = sum(1 for n in nodes if not n.ready and not n.quarantined) + unlisted_not_ready
    unavailable = len(quarantined) - len(release) + not_ready + missing
    allowed_by_count = budget.unavailable_allowed(desired_nodes) - unavailable
    if budget.max_per_window > 0:
        in_window = sum(1 for t in recent_quarantines if now - t < budget.window_seconds)
        allowed = min(allowed_by_count, budget.max_per_window - in_window)
    else:
        allowed = allowed_by_count
    allowed = max(0, allowed)
    # Fatal before transient, then by name, so the same nodes go first on
    # every step while the budget is short.
    faulty = sorted((n for n in nodes if not n.gpu_healthy and n.ready and not n.quarantined),
                    key=lambda n: (not n.fatal, n.name))
    quarantine = tuple(n.name for n in faulty[:allowed])
    waiting = tuple(n.name for n in faulty[allowed:])
    return RemediationPlan(quarantine=quarantine, drain=drain, replace=replace, release=release,
                           waiting=waiting, unavailable=unavailable + len(quarantine), allowed=allowed)


@dataclass(frozen=True)
class UnseenWrites:
    """Remediation writes the node index has not shown yet: quarantines and
    releases (node -> (quarantined, when written)) and replacement deletes
    (node -> when). A pass that ran on the bare index before a node's next
    watch event would quarantine, and count against the budget, the same
    node twice."""

    quarantine: Mapping[str, tuple[bool, float]] = dataclasses.field(default_factory=dict)
    deleted: Mapping[str, float] = dataclasses.field(default_factory=dict)


def overlay_unseen_writes(
    nodes: Sequence[NodeHealth], unseen: UnseenWrites, now: float, ttl_seconds: float
) -> tuple[list[NodeHealth], UnseenWrites]:
    """The pool as the planner must see it: the index corrected by our writes
    it has not shown yet, and those writes still unseen. A write is dropped
    once the index shows it, once its node is gone, or after `ttl_seconds`
    (someone undid it before we saw it, and the index is right)."""
    present = {n.name for n in nodes}
    deleted = {name: at for name, at in unseen.deleted.items()
               if name in present and now - at <= ttl_seconds}
    quarantine: dict[str, tuple[bool, float]] = {}
    corrected = []
    for node in nodes:
        if node.name in deleted:
            continue
        write = unseen.quarantine.get(node.name)
        if write is not None and write[0] != node.quarantined and now - write[1] <= ttl_seconds:
            quarantine[node.name] = write
            node = dataclasses.replace(node, quarantined=write[0])
        corrected.append(node)
    return corrected, UnseenWrites(quarantine, deleted)
