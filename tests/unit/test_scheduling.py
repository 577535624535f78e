"""Admission planner: tables of snapshots and expected plans, in the style of
Kueue's scheduler tests. The default cluster is one pool of 2 blocks x 2
racks x 2 nodes x 8 GPUs, nodes named b<block>r<rack>n<node>."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pytest
from gpucluster.planning.scheduling import (
    AdmissionCycle,
    AdmissionPlan,
    NodeSnapshot,
    PendingJob,
    Preemption,
    RunningGang,
    TopologyLevel,
    TopologyMode,
    TopologyRequest,
    plan_admissions,
    queue_order,
)

H100 = "H100-80GB-HBM3"
H200 = "H200-141GB"
HOUR = 3600.0


def cluster(
    blocks: int = 2,
    racks: int = 2,
    nodes: int = 2,
    gpus: int = 8,
    *,
    pool: str = "h100",
    product: str = H100,
    prefix: str = "",
    down: Iterable[str] = (),
) -> list[NodeSnapshot]:
    unschedulable = set(down)
    return [
        NodeSnapshot(
            name=f"{prefix}b{b}r{r}n{n}",
            pool=pool,
            gpu_product=product,
            allocatable_gpus=gpus,
            block=f"b{b}",
            rack=f"r{r}",
            schedulable=f"{prefix}b{b}r{r}n{n}" not in unschedulable,
        )
        for b in range(blocks)
        for r in range(racks)
        for n in range(nodes)
    ]


def job(
    key: str,
    workers: int,
    gpus: int,
    *,
    priority: int = 0,
    arrival: float = 0.0,
    level: TopologyLevel | None = None,
    mode: TopologyMode = "preferred",
    excluded: Iterable[str] = (),
    pool: str = "h100",
    limit: float | None = None,
) -> PendingJob:
    return PendingJob(
        key=key,
        priority=priority,
        arrival=arrival,
        workers=workers,
        gpus_per_worker=gpus,
        pool=pool,
        topology=TopologyRequest(level, mode),
        excluded_nodes=frozenset(excluded),
        time_limit=limit,
    )


def gang(
    key: str,
    usage: Mapping[str, int],
    *,
    priority: int = 0,
    admitted_at: float = 0.0,
    evicting: bool = False,
    pool: str = "h100",
    ends_by: float | None = None,
) -> RunningGang:
    return RunningGang(key, priority, pool, dict(usage), admitted_at, evicting, ends_by)


def whole(*names: str) -> dict[str, int]:
    return dict.fromkeys(names, 8)


@dataclass
class Case:
    name: str
    pending: list[PendingJob]
    nodes: list[NodeSnapshot] = field(default_factory=cluster)
    running: list[RunningGang] = field(default_factory=list)
    now: float = 0.0
    admitted: dict[str, tuple[str, ...]] = field(default_factory=dict)
    preempted: dict[str, str] = field(default_factory=dict)  # victim -> preemptor
    unschedulable: set[str] = field(default_factory=set)
    positions: dict[str, int] = field(default_factory=dict)
    reserved: dict[str, tuple[str, ...]] | None = None  # checked when given


CASES = [
    # --- placement -------------------------------------------------------
    Case(
        "an 8-GPU worker takes a whole node",
        pending=[job("a", 1, 8)],
        admitted={"a": ("b0r0n0",)},
    ),
    Case(
        "small workers share a node",
        pending=[job("a", 2, 4)],
        admitted={"a": ("b0r0n0", "b0r0n0")},
    ),
    Case(
        "a gang that fits one rack stays in one rack",
        pending=[job("a", 2, 8)],
        admitted={"a": ("b0r0n0", "b0r0n1")},
    ),
    Case(
        "a gang that fits one block stays in one block",
        pending=[job("a", 4, 8)],
        admitted={"a": ("b0r0n0", "b0r0n1", "b0r1n0", "b0r1n1")},
    ),
    Case(
        "a gang larger than a block spans the fewest blocks and racks",
        pending=[job("a", 6, 8)],
        admitted={
            "a": ("b0r0n0", "b0r0n1", "b0r1n0", "b0r1n1", "b1r0n0", "b1r0n1"),
        },
    ),
    Case(
        "one block with two whole racks beats one with three partial racks",
        nodes=cluster(2, 3, 2),
        running=[gang("x", whole("b0r0n0", "b0r1n0", "b0r2n0"))],
        pending=[job("a", 3, 8)],
        # b0 has 3 free nodes in 3 racks; b1 is empty: 2 racks hold 3 workers.
        admitted={"a": ("b1r0n0", "b1r0n1", "b1r1n0")},
    ),
    Case(
        "a small worker fills the tightest hole, keeping whole nodes whole",
        running=[gang("x", {"b1r1n1": 7, "b0r1n0": 4})],
        pending=[job("a", 1, 1), job("b", 1, 4, arrival=1)],
        admitted={"a": ("b1r1n1",), "b": ("b0r1n0",)},
    ),
    Case(
        "a whole-node worker goes to the rack with the fewest free nodes",
        running=[gang("x", whole("b1r1n0"))],
        pending=[job("a", 1, 8)],
        admitted={"a": ("b1r1n1",)},
    ),
    Case(
        "a two-node gang takes the tightest rack that holds it",
        running=[gang("x", whole("b0r0n0", "b0r1n0", "b1r0n0"))],
        pending=[job("a", 2, 8)],
        admitted={"a": ("b1r1n0", "b1r1n1")},
    ),
    Case(
        "unschedulable and excluded nodes get nothing",
        nodes=cluster(1, 1, 4, down=["b0r0n0"]),
        pending=[job("a", 2, 8, excluded=["b0r0n1"])],
        admitted={"a": ("b0r0n2", "b0r0n3")},
    ),
    Case(
        "a node a running gang over-commits (a GPU failed) takes nothing",
        nodes=cluster(1, 1, 2, gpus=4),
        running=[gang("x", {"b0r0n0": 6})],
        pending=[job("a", 2, 2)],
        admitted={"a": ("b0r0n1", "b0r0n1")},
    ),
    # --- topology constraints -------------------------------------------
    Case(
        "a required rack is never spanned, even when the pool has room",
        running=[gang("x", whole("b0r0n0", "b0r1n0", "b1r0n0", "b1r1n0"))],
        pending=[job("a", 2, 8, level="rack", mode="required")],
        positions={"a": 1},
        reserved={"a": ("b0r0n0", "b0r0n1")},
    ),
    Case(
        "a preferred rack relaxes to the block",
        running=[gang("x", whole("b0r0n0", "b0r1n0", "b1r0n0", "b1r1n0"))],
        pending=[job("a", 2, 8, level="rack", mode="preferred")],
        admitted={"a": ("b0r0n1", "b0r1n1")},
    ),
    Case(
        "a required block is never spanned",
        running=[gang("x", whole("b0r0n0", "b1r0n0"))],
        pending=[job("a", 4, 8, level="block", mode="required")],
        positions={"a": 1},
    ),
    Case(
        "a required block may span racks inside it",
        running=[gang("x", whole("b0r0n0", "b1r0n0", "b1r0n1"))],
        pending=[job("a", 3, 8, level="block", mode="required")],
        admitted={"a": ("b0r0n1", "b0r1n0", "b0r1n1")},
    ),
    # --- queue, head and backfill ----------------------------------------
    Case(
        "priority first, then arrival, then key",
        nodes=cluster(1, 1, 2),
        pending=[
            job("late", 1, 8, arrival=5),
            job("urgent", 1, 8, priority=10, arrival=9),
            job("b-early", 1, 8, arrival=1),
            job("a-early", 1, 8, arrival=1),
        ],
        admitted={"urgent": ("b0r0n0",), "a-early": ("b0r0n1",)},
        positions={"b-early": 1, "late": 2},
    ),
    Case(
        "deadlock: two jobs each above half the pool, one runs whole",
        pending=[job("a", 5, 8), job("b", 5, 8, arrival=1)],
        admitted={"a": ("b0r0n0", "b0r0n1", "b0r1n0", "b0r1n1", "b1r0n0")},
        positions={"b": 1},
    ),
    Case(
        "deadlock with small workers: never a partial gang",
        nodes=cluster(1, 1, 2),
        pending=[job("a", 10, 1), job("b", 10, 1, arrival=1)],
        admitted={"a": ("b0r0n0",) * 8 + ("b0r0n1",) * 2},
        positions={"b": 1},
    ),
    Case(
        "a small job backfills beside the head's reservation",
        running=[gang("x", whole("b0r0n0", "b0r0n1", "b0r1n0", "b1r0n0", "b1r0n1"))],
        pending=[job("head", 4, 8, arrival=0), job("small", 1, 8, arrival=1)],
        # The five nodes x frees hold the head: it reserves four of them (b0's
        # three, then one of b1's) and none of the three idle now.
        reserved={"head": ("b0r0n0", "b0r0n1", "b0r1n0", "b1r0n0")},
        admitted={"small": ("b0r1n1",)},
        positions={"head": 1},
    ),
    Case(
        "the reservation waits for one large gang rather than many small ones",
        nodes=cluster(2, 1, 2),
        running=[
            gang("large", whole("b0r0n0", "b0r0n1")),
            gang("small-1", {"b1r0n0": 1}),
            gang("small-2", {"b1r0n1": 1}),
        ],
        pending=[job("head", 2, 8), job("fill", 1, 4, arrival=1)],
        reserved={"head": ("b0r0n0", "b0r0n1")},
        admitted={"fill": ("b1r0n0",)},
        positions={"head": 1},
    ),
    Case(
        "the head reserves the nodes of the gang it waits for, not idle ones",
        nodes=cluster(1, 1, 8),
        running=[gang("a", whole(*(f"b0r0n{n}" for n in range(6))))],
        pending=[job("b", 6, 8), job("c", 1, 8, arrival=1), job("d", 1, 8, arrival=2)],
        # b waits for a whatever it reserves; a's six nodes are all it needs.
        reserved={"b": tuple(f"b0r0n{n}" for n in range(6))},
        admitted={"c": ("b0r0n6",), "d": ("b0r0n7",)},
        positions={"b": 1},
    ),
    Case(
        "a head needing idle nodes besides a gang's takes those nearest the gang",
        nodes=cluster(2, 1, 4),
        running=[gang("a", whole("b1r0n0", "b1r0n1", "b1r0n2"))],
        pending=[job("head", 6, 8), job("c", 1, 8, arrival=1), job("d", 1, 8, arrival=2)],
        # a frees three nodes; of the three idle ones the head still needs,
        # the one in a's block first.
        reserved={"head": ("b0r0n0", "b0r0n1", "b1r0n0", "b1r0n1", "b1r0n2", "b1r0n3")},
        admitted={"c": ("b0r0n2",), "d": ("b0r0n3",)},
        positions={"head": 1},
    ),
    Case(
        "of two gangs either of which lets the head in, it waits for the larger",
        nodes=cluster(1, 1, 8),
        running=[
            gang("large", whole("b0r0n0", "b0r0n1", "b0r0n2", "b0r0n3")),
            gang("small", whole("b0r0n4", "b0r0n5")),
        ],
        pending=[job("head", 4, 8), job("c", 1, 8, arrival=1), job("d", 1, 8, arrival=2)],
        # Waiting for small would hold back both idle nodes as well.
        reserved={"head": ("b0r0n0", "b0r0n1", "b0r0n2", "b0r0n3")},
        admitted={"c": ("b0r0n6",), "d": ("b0r0n7",)},
        positions={"head": 1},
    ),
    Case(
        "of gangs freeing as much, the head waits for the one admitted first",
        nodes=cluster(1, 1, 4),
        running=[
            gang("young", whole("b0r0n0", "b0r0n1"), admitted_at=5 * HOUR),
            gang("old", whole("b0r0n2", "b0r0n3"), admitted_at=1 * HOUR),
        ],
        now=6 * HOUR,
        pending=[job("head", 2, 8)],
        reserved={"head": ("b0r0n2", "b0r0n3")},
        positions={"head": 1},
    ),
    Case(
        "a job admitted this cycle is waited for after the gangs already running",
        nodes=cluster(1, 1, 4),
        running=[gang("running", whole("b0r0n0", "b0r0n1"))],
        now=HOUR,
        pending=[job("first", 2, 8, priority=1), job("head", 2, 8)],
        admitted={"first": ("b0r0n2", "b0r0n3")},
        reserved={"head": ("b0r0n0", "b0r0n1")},
        positions={"head": 1},
    ),
    Case(
        "the head reserves none of its excluded nodes, even where it waits anyway",
        nodes=cluster(1, 1, 4),
        running=[gang("a", whole("b0r0n0", "b0r0n1", "b0r0n2"))],
        pending=[job("head", 3, 8, excluded=["b0r0n0"])],
        reserved={"head": ("b0r0n1", "b0r0n2", "b0r0n3")},
        positions={"head": 1},
    ),
    Case(
        "a head requiring a block waits in the block where the fewest gangs end",
        nodes=cluster(2, 1, 4),
        running=[
            gang("wide", whole("b0r0n0", "b0r0n1", "b1r0n0", "b1r0n1")),
            gang("small", whole("b1r0n2")),
        ],
        pending=[job("head", 4, 8, level="block", mode="required"), job("c", 1, 8, arrival=1)],
        # In b0 only wide must end (its two nodes and two idle ones); in b1
        # wide and small.
        reserved={"head": ("b0r0n0", "b0r0n1", "b0r0n2", "b0r0n3")},
        admitted={"c": ("b1r0n3",)},
        positions={"head": 1},
    ),
    Case(
        "the same head without a required block takes the nodes wide frees in both",
        nodes=cluster(2, 1, 4),
        running=[
            gang("wide", whole("b0r0n0", "b0r0n1", "b1r0n0", "b1r0n1")),
            gang("small", whole("b1r0n2")),
        ],
        pending=[job("head", 4, 8), job("c", 1, 8, arrival=1), job("d", 1, 8, arrival=2)],
        reserved={"head": ("b0r0n0", "b0r0n1", "b1r0n0", "b1r0n1")},
        admitted={"c": ("b1r0n3",), "d": ("b0r0n2",)},
        positions={"head": 1},
    ),
    Case(
        "nothing backfills on the head's reserved nodes",
        running=[gang("x", whole("b0r0n0", "b0r0n1", "b0r1n0", "b0r1n1", "b1r0n0"))],
        pending=[job("head", 8, 8, arrival=0), job("small", 1, 1, arrival=1)],
        positions={"head": 1, "small": 2},
    ),
    # --- backfill on run-time limits ------------------------------------
    Case(
        "a job whose limit ends it before the head starts backfills on the reservation",
        nodes=cluster(1, 1, 4),
        running=[gang("a", whole("b0r0n0", "b0r0n1"), ends_by=2 * HOUR)],
        now=HOUR,
        pending=[job("head", 4, 8, limit=HOUR), job("short", 2, 8, arrival=1, limit=HOUR / 2)],
        reserved={"head": ("b0r0n0", "b0r0n1", "b0r0n2", "b0r0n3")},
        admitted={"short": ("b0r0n2", "b0r0n3")},
        positions={"head": 1},
    ),
    Case(
        "a job that could outlast the head's start does not",
        nodes=cluster(1, 1, 4),
        running=[gang("a", whole("b0r0n0", "b0r0n1"), ends_by=2 * HOUR)],
        now=HOUR,
        pending=[job("head", 4, 8), job("long", 2, 8, arrival=1, limit=HOUR + 1),
                 job("unlimited", 1, 8, arrival=2)],
        positions={"head": 1, "long": 2, "unlimited": 3},
    ),
    Case(
        "no limit-based backfill when a gang the head waits for has no limit",
        nodes=cluster(1, 1, 4),
        running=[gang("a", whole("b0r0n0"), ends_by=2 * HOUR), gang("b", whole("b0r0n1"))],
        now=HOUR,
        pending=[job("head", 4, 8), job("short", 1, 8, arrival=1, limit=60)],
        positions={"head": 1, "short": 2},
    ),
    Case(
        "the head's start is bounded by the last limit of the gangs it waits for",
        nodes=cluster(1, 1, 4),
        running=[
            gang("long", whole("b0r0n0", "b0r0n1"), ends_by=10 * HOUR),
            gang("short-1", whole("b0r0n2"), ends_by=2 * HOUR),
            gang("short-2", whole("b0r0n3"), ends_by=3 * HOUR),
        ],
        now=HOUR,
        # The fewest gangs to end is long alone (by 10 h): fill (ends by
        # 10 h) may use short-1's node once free, but every node is busy.
        pending=[job("head", 2, 8), job("fill", 1, 8, arrival=1, limit=9 * HOUR)],
        reserved={"head": ("b0r0n0", "b0r0n1")},
        positions={"head": 1, "fill": 2},
    ),
    Case(
        "a backfill on the reservation ends before the head starts, at the boundary too",
        nodes=cluster(1, 1, 2),
        running=[gang("a", whole("b0r0n0"), ends_by=3 * HOUR)],
        now=HOUR,
        pending=[job("head", 2, 8), job("exact", 1, 8, arrival=1, limit=2 * HOUR)],
        reserved={"head": ("b0r0n0", "b0r0n1")},
        admitted={"exact": ("b0r0n1",)},
        positions={"head": 1},
    ),
    Case(
        "a head no drain can help reserves nothing and backfill goes on",
        nodes=cluster(1, 1, 4, down=["b0r0n0", "b0r0n1"]),
        running=[gang("x", whole("b0r0n2"))],
        pending=[job("head", 3, 8), job("small", 1, 8, arrival=1)],
        admitted={"small": ("b0r0n3",)},
        positions={"head": 1},
        reserved={},
    ),
    Case(
        "each pool is its own queue",
        nodes=cluster(1, 1, 1) + cluster(1, 1, 1, pool="h200", product=H200, prefix="x"),
        pending=[
            job("big", 2, 8),
            job("h200", 1, 8, pool="h200", arrival=1),
            job("also-h100", 1, 8, arrival=2),
        ],
        admitted={"h200": ("xb0r0n0",), "also-h100": ("b0r0n0",)},
        unschedulable={"big"},
    ),
    # --- unschedulable ----------------------------------------------------
    Case(
        "never fits: unknown pool, worker too big, gang too big, level too small",
        nodes=cluster(1, 2, 2, gpus=4),
        pending=[
            job("nopool", 1, 1, pool="a100"),
            job("wide", 1, 8),
            job("huge", 5, 4),
            job("rack", 3, 4, level="rack", mode="required"),
            job("fine", 3, 4, level="block", mode="required"),
        ],
        unschedulable={"nopool", "wide", "huge", "rack"},
        admitted={"fine": ("b0r0n0", "b0r0n1", "b0r1n0")},
    ),
    Case(
        "cordoned nodes still count for 'could ever fit'",
        nodes=cluster(1, 1, 2, down=["b0r0n0", "b0r0n1"]),
        pending=[job("a", 2, 8)],
        positions={"a": 1},
    ),
    # --- preemption -------------------------------------------------------
    Case(
        "the head evicts the gang that loses the fewest GPU-hours",
        nodes=cluster(1, 1, 2),
        running=[
            gang("old", whole("b0r0n0"), priority=0, admitted_at=0),
            gang("young", whole("b0r0n1"), priority=0, admitted_at=9 * HOUR),
        ],
        now=10 * HOUR,
        pending=[job("urgent", 1, 8, priority=5)],
        preempted={"young": "urgent"},
        positions={"urgent": 1},
        reserved={"urgent": ("b0r0n1",)},
    ),
    Case(
        "equal or higher priority is never preempted",
        nodes=cluster(1, 1, 2),
        running=[
            gang("peer", whole("b0r0n0"), priority=5),
            gang("boss", whole("b0r0n1"), priority=9),
        ],
        pending=[job("urgent", 1, 8, priority=5)],
        positions={"urgent": 1},
    ),
    Case(
        "no preemption when evicting every candidate still would not admit",
        nodes=cluster(1, 1, 2),
        running=[
            gang("low", whole("b0r0n0"), priority=0),
            gang("boss", whole("b0r0n1"), priority=9),
        ],
        pending=[job("urgent", 2, 8, priority=5)],
        positions={"urgent": 1},
    ),
    Case(
        "a cheap victim that turns out unnecessary is spared",
        nodes=cluster(1, 2, 2),
        running=[
            gang("tiny", {"b0r0n0": 1}, admitted_at=9 * HOUR),
            gang("mid", {"b0r0n0": 7, "b0r0n1": 8}, admitted_at=5 * HOUR),
            gang("full", whole("b0r1n0", "b0r1n1"), priority=9),
        ],
        now=10 * HOUR,
        # tiny alone does not help; mid alone does; tiny is dropped again.
        pending=[job("urgent", 1, 8, priority=5)],
        preempted={"mid": "urgent"},
        positions={"urgent": 1},
    ),
    Case(
        "preemption checks placement, not GPU counts",
        nodes=cluster(1, 2, 1),
        running=[
            gang("a", {"b0r0n0": 4}, admitted_at=9 * HOUR),
            gang("b", {"b0r1n0": 4}, admitted_at=8 * HOUR),
            gang("c", {"b0r0n0": 4}, admitted_at=0),
        ],
        now=10 * HOUR,
        # Evicting the cheapest, a, makes 8 GPUs free in all (4 on each
        # node): enough by count, not for an 8-GPU worker. Adding b empties
        # a node, and a is then dropped again as unnecessary.
        pending=[job("urgent", 1, 8, priority=5)],
        preempted={"b": "urgent"},
        reserved={"urgent": ("b0r1n0",)},
        positions={"urgent": 1},
    ),
    Case(
        "a required level restricts victims to where the gang can fit",
        nodes=cluster(2, 1, 2),
        running=[
            gang("cheap", whole("b0r0n0"), admitted_at=9 * HOUR),
            gang("other", whole("b1r0n0"), admitted_at=5 * HOUR),
            gang("boss", whole("b0r0n1"), priority=9),
        ],
        now=10 * HOUR,
        pending=[job("urgent", 2, 8, priority=5, level="block", mode="required")],
        preempted={"other": "urgent"},
        reserved={"urgent": ("b1r0n0", "b1r0n1")},
        positions={"urgent": 1},
    ),
    Case(
        "a head waiting on evicting gangs picks no new victims",
        nodes=cluster(1, 1, 2),
        running=[
            gang("leaving", whole("b0r0n0"), evicting=True),
            gang("low", whole("b0r0n1")),
        ],
        pending=[job("urgent", 1, 8, priority=5)],
        reserved={"urgent": ("b0r0n0",)},
        positions={"urgent": 1},
    ),
    Case(
        "backfill never lands on the preemptor's reserved nodes",
        nodes=cluster(1, 2, 2),
        running=[
            gang("young", whole("b0r0n0"), admitted_at=9 * HOUR),
            gang("old", whole("b0r1n0"), admitted_at=0),
        ],
        now=10 * HOUR,
        pending=[
            job("urgent", 2, 8, priority=5, level="rack", mode="required"),
            job("small", 1, 8, priority=1),
            job("smaller", 1, 8, arrival=1),
        ],
        preempted={"young": "urgent"},
        reserved={"urgent": ("b0r0n0", "b0r0n1")},
        admitted={"small": ("b0r1n1",)},
        positions={"urgent": 1, "smaller": 2},
    ),
    Case(
        "only the head preempts",
        nodes=cluster(1, 1, 2),
        running=[gang("low", whole("b0r0n0", "b0r0n1"), priority=0)],
        pending=[job("boss", 3, 8, priority=9), job("urgent", 1, 8, priority=5)],
        unschedulable={"boss"},
        preempted={"low": "urgent"},
        positions={"urgent": 1},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_table(case: Case) -> None:
    plan = plan_admissions(case.nodes, case.running, case.pending, now=case.now)
    assert dict(plan.admissions) == case.admitted
    assert {p.victim: p.preemptor for p in plan.preemptions} == case.preempted
    assert set(plan.unschedulable) == case.unschedulable
    assert dict(plan.queue_positions) == case.positions
    if case.reserved is not None:
        assert dict(plan.reservations) == case.reserved


def test_unschedulable_reasons_say_why() -> None:
    plan = plan_admissions(
        cluster(1, 2, 2, gpus=4),
        [],
        [
            job("nopool", 1, 1, pool="a100"),
            job("wide", 1, 8),
            job("huge", 5, 4),
            job("rack", 3, 4, level="rack", mode="required"),
        ],
        now=0,
    )
    assert plan.unschedulable == {
        "nopool": "pool 'a100' has no nodes",
        "wide": "needs 8 GPUs per worker, but the largest node of pool 'h100' has 4 "
        "(H100-80GB-HBM3)",
        "huge": "needs 5 workers x 4 GPUs, but pool 'h100' holds at most 4 such workers "
        "(16 GPUs on 4 nodes)",
        "rack": "requires one rack for 3 workers x 4 GPUs, but the largest rack of pool "
        "'h100' holds at most 2",
    }


def test_racks_with_the_same_label_in_different_blocks_are_different_racks() -> None:
    plan = plan_admissions(
        cluster(2, 1, 2), [], [job("a", 3, 8, level="rack", mode="required")], now=0
    )
    assert "a" in plan.unschedulable


def test_preempted_head_is_admitted_once_the_victims_are_gone() -> None:
    nodes = cluster(1, 1, 2)
    low = gang("low", whole("b0r0n0", "b0r0n1"))
    urgent = job("urgent", 2, 8, priority=5)
    first = plan_admissions(nodes, [low], [urgent], now=HOUR)
    assert first.preemptions == (Preemption("low", "urgent"),)
    assert first.admissions == {}
    evicting = gang("low", whole("b0r0n0", "b0r0n1"), evicting=True)
    second = plan_admissions(nodes, [evicting], [urgent], now=HOUR + 1)
    assert second.preemptions == ()
    assert second.admissions == {}
    third = plan_admissions(nodes, [], [urgent], now=HOUR + 2)
    assert third.admissions == {"urgent": ("b0r0n0", "b0r0n1")}


def test_cycle_rejects_out_of_order_and_repeated_decisions() -> None:
    cycle = AdmissionCycle(cluster(1, 1, 2), [], now=0)
    cycle.decide(job("b", 1, 8, arrival=1))
    with pytest.raises(ValueError, match="out of queue order"):
        cycle.decide(job("a", 1, 8, arrival=0))
    with pytest.raises(ValueError, match="twice"):
        cycle.decide(job("b", 1, 8, arrival=1))


def test_cycle_reports_each_decision() -> None:
    nodes = cluster(1, 1, 3)
    running = [gang("low", whole("b0r0n0"))]
    jobs = queue_order(
        [
            job("now", 1, 8, priority=9),
            job("head", 2, 8, priority=5),
            job("fill", 1, 1, priority=1),
            job("stuck", 1, 8, priority=1, arrival=1),
            job("never", 1, 16),
        ]
    )
    cycle = AdmissionCycle(nodes, running, now=HOUR)
    decisions = {j.key: cycle.decide(j) for j in jobs}
    assert decisions == {
        "now": "admitted",
        "head": "preempting",
        "fill": "waiting",
        "stuck": "waiting",
        "never": "unschedulable",
    }
    plan: AdmissionPlan = cycle.plan()
    assert plan.queue_positions == {"head": 1, "fill": 2, "stuck": 3}


def test_a_clock_times_each_decision_and_changes_nothing_decided() -> None:
    nodes = cluster(1, 1, 3)
    running = [gang("low", whole("b0r0n0"))]
    jobs = [job("now", 1, 8, priority=9), job("head", 2, 8, priority=5), job("fill", 1, 1, arrival=1),
            job("never", 1, 16, arrival=2)]
    ticks = iter(range(100))
    timed = plan_admissions(nodes, running, jobs, now=HOUR, clock=lambda: float(next(ticks)) ** 2)
    # Decisions n = 0, 1, 2, 3 start at tick 2n and end at 2n + 1: (2n+1)^2 - (2n)^2 = 4n + 1.
    assert timed.decision_seconds == (1.0, 5.0, 9.0, 13.0)
    untimed = plan_admissions(nodes, running, jobs, now=HOUR)
    assert untimed.decision_seconds == ()
    assert timed == untimed


def test_inputs_are_validated() -> None:
    with pytest.raises(ValueError):
        job("a", 0, 8)
    with pytest.raises(ValueError):
        job("a", 1, 0)
    with pytest.raises(ValueError):
        TopologyRequest(None, "required")
    with pytest.raises(ValueError):
        NodeSnapshot("n", "p", H100, -1, "b", "r")
