"""What applying a TrainingCluster change would do, decided before it is made.

`gpucluster plan` reads the live state and calls this with the pools the
manifest declares. Nodes are planned by `planning.pools.plan_pool`, the very
function each reconcile calls, so the plan and the apply cannot disagree;
the rest follows from it: gangs on nodes that go (and the GPU-hours since
their admission), jobs that could no longer fit their pool
(`planning.jobs.choose_pool`, the submission check), and what the change
takes out of each pool's remediation budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gpucluster.planning.jobs import JobShape, PoolFacts, Problem, choose_pool
from gpucluster.planning.pools import ObservedNode, PoolPlan, PoolShape, StaticCandidate, plan_pool
from gpucluster.planning.remediation import RemediationBudget


@dataclass(frozen=True)
class LiveGang:
    """An admitted job, as the plan needs it."""

    key: str
    pool: str
    nodes: frozenset[str]
    gpus: int
    admitted_at: float


@dataclass(frozen=True)
class LiveJob:
    """A job not finished: its shape, to check against the new pools."""

    key: str
    shape: JobShape


@dataclass(frozen=True)
class PoolChange:
    name: str
    nodes_before: int
    nodes_after: int
    create: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    removed: bool = False  # the pool left the spec: every node goes
    # Gangs on nodes that go: key -> GPU-hours since their admission.
    evicted: Mapping[str, float] = field(default_factory=dict)
    unavailable_now: int = 0
    unavailable_allowed: int = 0

    @property
    def changes(self) -> bool:
        return bool(self.create or self.delete or self.drain or self.removed)


@dataclass(frozen=True)
class ClusterChange:
    pools: tuple[PoolChange, ...]
    unschedulable: Mapping[str, str]  # job key -> why it would never fit

    @property
    def changes(self) -> bool:
        return any(p.changes for p in self.pools) or bool(self.unschedulable)


@dataclass(frozen=True)
class PoolDeclaration:
    shape: PoolShape
    facts: PoolFacts
    budget: RemediationBudget
    static_candidates: tuple[StaticCandidate, ...] = ()


def plan_change(pools: Sequence[PoolDeclaration], owned: Mapping[str, Sequence[ObservedNode]],
                gangs: Sequence[LiveGang], jobs: Sequence[LiveJob], now: float) -> ClusterChange:
    """Per pool, what the reconcile would do with these declarations; `owned`
    holds the live nodes by pool (busy marked), including pools that would
    leave the spec."""
    changes = []
    declared = {p.shape.name for p in pools}
    for declaration in pools:
        nodes = list(owned.get(declaration.shape.name, ()))
        plan: PoolPlan = plan_pool(declaration.shape, nodes, declaration.static_candidates)
        going = set(plan.delete) | set(plan.drain)
        changes.append(PoolChange(
            name=declaration.shape.name, nodes_before=len(nodes),
            nodes_after=len(nodes) + len(plan.create) + len(plan.adopt) - len(plan.delete) - len(plan.release),
            create=tuple(n.name for n in (*plan.create, *plan.adopt)), delete=(*plan.delete, *plan.release),
            drain=plan.drain, evicted=_evicted(gangs, going, now),
            unavailable_now=sum(1 for n in nodes if n.quarantined or not n.ready),
            unavailable_allowed=declaration.budget.unavailable_allowed(declaration.shape.desired_nodes)))
    for name in sorted(owned.keys() - declared):
        nodes = list(owned[name])
        changes.append(PoolChange(name=name, nodes_before=len(nodes), nodes_after=0, removed=True,
                                  delete=tuple(sorted(n.name for n in nodes)),
                                  evicted=_evicted(gangs, {n.name for n in nodes}, now)))
    facts = [p.facts for p in pools]
    unschedulable = {}
    for job in jobs:
        verdict = choose_pool(job.shape, True, facts)
        if isinstance(verdict, Problem):
            unschedulable[job.key] = verdict.message
    return ClusterChange(tuple(changes), unschedulable)


def _evicted(gangs: Sequence[LiveGang], going: set[str], now: float) -> dict[str, float]:
    return {g.key: round(g.gpus * max(0.0, now - g.admitted_at) / 3600, 2)
            for g in gangs if g.nodes & going}
