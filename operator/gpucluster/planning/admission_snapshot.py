"""What the TrainingJob admission planner reads: plain frozen snapshots of the
nodes, the running gangs and the pending jobs, built by the handlers from Kopf
indexes at the start of a cycle. Nothing here does I/O or imports Kopf."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

TopologyLevel = Literal["block", "rack"]
TopologyMode = Literal["required", "preferred"]

_LEVELS: frozenset[str] = frozenset({"block", "rack"})
_MODES: frozenset[str] = frozenset({"required", "preferred"})


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """One GPU node as the planner sees it in this cycle.

    `block` and `rack` are the node's topology labels. A rack is identified by
    its block and its own name together, so `rack-1` may repeat in every block.
    `schedulable` is the handler's verdict (Ready, not cordoned, GPUs healthy):
    an unschedulable node gets no new worker, but still counts as part of its
    pool when deciding whether a job could *ever* fit, because remediation is
    expected to bring it back.
    """

    name: str
    pool: str
    gpu_product: str
    allocatable_gpus: int
    block: str
    rack: str
    schedulable: bool = True

    def __post_init__(self) -> None:
        if self.allocatable_gpus < 0:
            raise ValueError(f"node {self.name}: allocatable_gpus must be >= 0")


@dataclass(frozen=True, slots=True)
class RunningGang:
    """An admitted job whose pods hold GPUs.

    `gpus_by_node` is what the gang holds on each node (node name -> GPUs).
    `evicting` marks a gang already chosen as a preemption victim whose pods
    are still terminating: its GPUs are not free yet (nobody may be placed on
    them), but a waiting preemptor counts on them instead of picking new
    victims every cycle. `ends_by` is when the gang ends at the latest (its
    run-time limit, on the clock of `admitted_at`), None when it has none.
    """

    key: str
    priority: int
    pool: str
    gpus_by_node: Mapping[str, int]
    admitted_at: float
    evicting: bool = False
    ends_by: float | None = None

    @property
    def gpus(self) -> int:
        return sum(self.gpus_by_node.values())


@dataclass(frozen=True, slots=True)
class TopologyRequest:
    """How close together a gang's workers must be.

    `level` None asks for nothing. `required` makes the level a hard limit:
    the gang is placed inside a single block (or a single rack) or not at all.
    `preferred` is the default behaviour of the planner anyway (it always packs
    a gang into one rack, else one block, else the fewest blocks), so it
    records the user's intent without constraining admission.
    """

    level: TopologyLevel | None = None
    mode: TopologyMode = "preferred"

    def __post_init__(self) -> None:
        if self.level is not None and self.level not in _LEVELS:
            raise ValueError(f"topology level must be one of {sorted(_LEVELS)}")
        if self.mode not in _MODES:
            raise ValueError(f"topology mode must be one of {sorted(_MODES)}")
        if self.mode == "required" and self.level is None:
            raise ValueError("a required topology needs a level")

    @property
    def required_level(self) -> TopologyLevel | None:
        """The level the gang may never span beyond, if any."""
        return self.level if self.mode == "required" else None


@dataclass(frozen=True, slots=True)
class PendingJob:
    """A TrainingJob waiting for admission: `workers` pods of
    `gpus_per_worker` GPUs each, every worker's GPUs on one node.

    Queue order is priority (highest first), then `arrival` (earliest first),
    then `key`. `excluded_nodes` are nodes a gang restart must avoid (the
    nodes its failed ranks ran on). `time_limit` is how long it runs at most
    if admitted now (what is left of its run-time limit), None when it has
    no limit: only a job with one may backfill onto a waiting head's nodes.
    """

    key: str
    priority: int
    arrival: float
    workers: int
    gpus_per_worker: int
    pool: str
    topology: TopologyRequest = field(default_factory=TopologyRequest)
    excluded_nodes: frozenset[str] = frozenset()
    time_limit: float | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"job {self.key}: workers must be >= 1")
        if self.gpus_per_worker < 1:
            raise ValueError(f"job {self.key}: gpus_per_worker must be >= 1")

    @property
    def gpus(self) -> int:
        return self.workers * self.gpus_per_worker

    @property
    def queue_key(self) -> tuple[int, float, str]:
        """Sorts the queue: priority descending, then arrival, then key."""
        return (-self.priority, self.arrival, self.key)
