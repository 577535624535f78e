"""Whether a job could ever fit its pool: what tells a job that only has to
wait from one that no amount of waiting admits.

"Ever" means on every node the pool has in the snapshot, empty: nodes that
are unschedulable now count (remediation is expected to bring them back), and
a job's excluded nodes count too (a gang restart's exclusions are temporary;
the handler clears them). A pool still scaling up is judged on the nodes it
has so far, so the handler should report the reason as a condition and keep
judging every cycle rather than fail the job at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from operator import attrgetter

from gpucluster.planning.admission_snapshot import NodeSnapshot, PendingJob


class PoolInventory:
    """The nodes of one pool by topology, with slots per worker size cached.

    Cost: one pass over the nodes when built; then per worker size, a pass
    over the distinct rack and block shapes (GPUs per node, counted), of
    which a pool of uniform racks has a handful whatever its size.
    """

    def __init__(self, pool: str, nodes: Sequence[NodeSnapshot]) -> None:
        self.pool = pool
        self._node_count = len(nodes)
        self._total_gpus = sum(node.allocatable_gpus for node in nodes)
        largest = max(nodes, key=lambda node: node.allocatable_gpus, default=None)
        self._largest_node = largest
        nodes_by_place = Counter(map(_place_and_size, nodes))
        # Nodes per GPU count, of each rack and block (plain dicts: a Counter
        # per rack costs more than the counting at 25,000 nodes).
        rack_sizes: dict[tuple[str, str], dict[int, int]] = {}
        block_sizes: dict[str, dict[int, int]] = {}
        for (block, rack, size), count in nodes_by_place.items():
            sizes = rack_sizes.setdefault((block, rack), {})
            sizes[size] = sizes.get(size, 0) + count
            sizes = block_sizes.setdefault(block, {})
            sizes[size] = sizes.get(size, 0) + count
        self._pool_sizes = Counter(map(_size, nodes))
        # Racks and blocks of the same shape hold the same slots: each shape
        # is counted once, as (GPUs per node, nodes) pairs.
        self._rack_shapes = {_shape(sizes) for sizes in rack_sizes.values()}
        self._block_shapes = {_shape(sizes) for sizes in block_sizes.values()}
        self._slots_cache: dict[int, tuple[int, int, int]] = {}

    def why_never_fits(self, job: PendingJob) -> str | None:
        """A human-readable reason if `job` can never fit the empty pool."""
        if self._largest_node is None:
            return f"pool {self.pool!r} has no nodes"
        gpus = job.gpus_per_worker
        largest = self._largest_node
        if gpus > largest.allocatable_gpus:
            return (
                f"needs {gpus} GPUs per worker, but the largest node of pool "
                f"{self.pool!r} has {largest.allocatable_gpus} ({largest.gpu_product})"
            )
        total, per_block, per_rack = self._slots(gpus)
        if total < job.workers:
            return (
                f"needs {job.workers} workers x {gpus} GPUs, but pool {self.pool!r} holds "
                f"at most {total} such workers ({self._total_gpus} GPUs on "
                f"{self._node_count} nodes)"
            )
        level = job.topology.required_level
        largest_domain = {"block": per_block, "rack": per_rack, None: total}[level]
        if largest_domain < job.workers:
            return (
                f"requires one {level} for {job.workers} workers x {gpus} GPUs, but the "
                f"largest {level} of pool {self.pool!r} holds at most {largest_domain}"
            )
        return None

    def _slots(self, worker_gpus: int) -> tuple[int, int, int]:
        """(pool, largest block, largest rack) slots for workers of this size."""
        cached = self._slots_cache.get(worker_gpus)
        if cached is not None:
            return cached
        slots = (
            _slots(self._pool_sizes.items(), worker_gpus),
            max((_slots(shape, worker_gpus) for shape in self._block_shapes), default=0),
            max((_slots(shape, worker_gpus) for shape in self._rack_shapes), default=0),
        )
        self._slots_cache[worker_gpus] = slots
        return slots


Shape = tuple[tuple[int, int], ...]


_place_and_size = attrgetter("block", "rack", "allocatable_gpus")
_size = attrgetter("allocatable_gpus")


def _shape(sizes: dict[int, int]) -> Shape:
    return tuple(sorted(sizes.items()))


def _slots(shape: Iterable[tuple[int, int]], worker_gpus: int) -> int:
    return sum(count * (size // worker_gpus) for size, count in shape)
