"""Topology-aware placement of one gang on a `CapacityIndex`.

The rules, each a tie-break of the ones before it:
1. A `required` topology level is a hard limit: one rack, or one block, or
   no placement at all.
2. A gang one node can hold goes on the node it fills most tightly,
   anywhere in the pool (a partly used node before a whole one, which the
   next 8-GPU worker needs); of the nodes that tight, one in the tightest
   rack (looking at `RACKS_COMPARED` of them), then name.
3. Fewest blocks, then fewest racks. The whole gang goes in one rack if any
   rack can hold it; else in one block (of the blocks that can hold it, the
   one needing the fewest racks, looking at the tightest
   `BLOCKS_COMPARED` of them); else across the fewest blocks: the largest
   blocks taken whole and the tightest block that holds the remainder.
4. Inside a block, the same rule over its racks; inside a rack, over its
   nodes: one node if any holds the rest, else the largest nodes first. A
   worker as large as a node therefore always gets a whole node, and
   several small workers share a node when their GPUs fit.
5. Best fit: of the candidates that hold what remains, the one with the
   fewest slots, then the fewest free GPUs (the tightest fill), then name.

Because all workers of a gang are the same size, a placement exists exactly
when the allowed domain has enough slots; `fits` answers that in O(1) and
`place` finds one whenever `fits` says so.
"""

from __future__ import annotations

from bisect import bisect_left
from math import ceil

from gpucluster.planning.admission_snapshot import PendingJob, TopologyLevel
from gpucluster.planning.capacity import CapacityIndex, IndexedNode, SortKey, WorkerSizeView

# A gang that fits in no single rack but in one block is placed in the block
# needing the fewest racks among this many of the tightest candidates: enough
# to find a compact block in practice, and a bound on the work per decision
# when a large fragmented pool has hundreds of candidate blocks.
BLOCKS_COMPARED = 64

# Of the nodes that hold a one-node gang equally tightly, the one in the
# tightest rack is looked for among this many racks, then name order decides.
RACKS_COMPARED = 64

# Each node with the number of the gang's workers it gets.
Placement = tuple[tuple[IndexedNode, int], ...]


def fits(index: CapacityIndex, job: PendingJob) -> bool:
    """Whether `place` would find a placement for `job` on `index`."""
    return slots_fit(index.view(job.gpus_per_worker), job.workers, job.topology.required_level)


def slots_fit(view: WorkerSizeView, workers: int, level: TopologyLevel | None) -> bool:
    if level == "rack":
        return bool(view.racks) and view.racks[-1][0] >= workers
    if level == "block":
        return bool(view.blocks) and view.blocks[-1][0] >= workers
    return view.total >= workers


def place(index: CapacityIndex, job: PendingJob) -> Placement | None:
    """Where each worker of `job` would go on `index`, or None if it cannot
    go anywhere now. Does not change the index."""
    workers, gpus = job.workers, job.gpus_per_worker
    level = job.topology.required_level
    view = index.view(gpus)
    node = _tightest_node(index, view, workers)
    if node is not None:
        return ((node, workers),)
    rack_start = bisect_left(view.racks, (workers,))
    if rack_start < len(view.racks):
        rack = index.racks[view.racks[rack_start][2]]
        return _fill_rack(index, rack.node_keys, workers, gpus)
    if level == "rack":
        return None
    block = _block_with_fewest_racks(view, workers)
    if block is not None:
        return _fill_block(index, view, block, workers)
    if level == "block" or view.total < workers:
        return None
    placement: list[tuple[IndexedNode, int]] = []
    for block_position, block_workers in _choose(view.blocks, workers, 1):
        placement.extend(_fill_block(index, view, block_position, block_workers))
    return tuple(placement)


def _tightest_node(index: CapacityIndex, view: WorkerSizeView, workers: int) -> IndexedNode | None:
    capacity = index.tightest_capacity(workers * view.worker_gpus)
    if capacity is None:
        return None
    rack_start = bisect_left(view.racks, (workers,))
    for _, _, position in view.racks[rack_start : rack_start + RACKS_COMPARED]:
        rack = index.racks[position]
        if rack.nodes_by_capacity[capacity]:
            return index.nodes[rack.node_keys[bisect_left(rack.node_keys, (capacity,))][2]]
    return index.first_with_capacity(capacity)


def _block_with_fewest_racks(view: WorkerSizeView, workers: int) -> int | None:
    """Position of the block to hold the whole gang, or None if none can."""
    start = bisect_left(view.blocks, (workers,))
    if start == len(view.blocks):
        return None
    # No rack holds the gang (the caller tried), so the largest rack has
    # fewer slots than `workers` but more than zero: some block holds them.
    fewest_possible = ceil(workers / view.racks[-1][0])
    best: tuple[int, int] | None = None
    for _, _, position in view.blocks[start : start + BLOCKS_COMPARED]:
        racks_needed = len(_choose(view.racks_by_block[position], workers, 1))
        if best is None or racks_needed < best[0]:
            best = (racks_needed, position)
        if racks_needed <= fewest_possible:
            break
    return None if best is None else best[1]


def _fill_block(
    index: CapacityIndex, view: WorkerSizeView, block_position: int, workers: int
) -> Placement:
    placement: list[tuple[IndexedNode, int]] = []
    for rack_position, rack_workers in _choose(view.racks_by_block[block_position], workers, 1):
        node_keys = index.racks[rack_position].node_keys
        placement.extend(_fill_rack(index, node_keys, rack_workers, view.worker_gpus))
    return tuple(placement)


def _fill_rack(
    index: CapacityIndex, node_keys: list[SortKey], workers: int, worker_gpus: int
) -> Placement:
    return tuple(
        (index.nodes[position], count)
        for position, count in _choose(node_keys, workers, worker_gpus)
    )


def _choose(keys: list[SortKey], need: int, unit: int) -> list[tuple[int, int]]:
    """The fewest entries of `keys` (sorted; amount = slots x `unit`) that
    hold `need` workers: the tightest single entry holding what remains if
    there is one, else the largest entry taken whole, repeatedly. Returns
    (position, workers) pairs. The caller has checked the slots suffice."""
    picks: list[tuple[int, int]] = []
    taken: set[int] = set()
    while True:
        for i in range(bisect_left(keys, (need * unit,)), len(keys)):
            if keys[i][2] not in taken:
                picks.append((keys[i][2], need))
                return picks
        amount, _, position = _largest_untaken(keys, taken)
        slots = amount // unit
        if slots == 0:
            raise RuntimeError("capacity index out of sync: fewer slots than counted")
        taken.add(position)
        picks.append((position, slots))
        need -= slots


def _largest_untaken(keys: list[SortKey], taken: set[int]) -> SortKey:
    """The entry with the largest amount, the most preferred of those."""
    last = len(keys) - 1
    while last >= 0 and keys[last][2] in taken:
        last -= 1
    if last < 0:
        raise RuntimeError("capacity index out of sync: ran out of candidates")
    first = bisect_left(keys, (keys[last][0],))
    while keys[first][2] in taken:
        first += 1
    return keys[first]
