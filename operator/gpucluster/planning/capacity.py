"""GPU capacity of one pool, indexed by topology (block, rack, node).

Placement asks, once per job and every cycle, questions such as "the tightest
rack that holds 12 workers of 4 GPUs" or "the largest blocks for 8-GPU
workers", at up to 25,000 nodes; a scan of the nodes per question would cost
milliseconds each. Every worker of a gang has the same size, so a set of
nodes holds W workers of g GPUs exactly when the sum over the nodes of
floor(capacity / g) -- the *slots* for that worker size -- is at least W.
The index keeps, per worker size asked for, the slots of every rack and block
in sorted lists (the tightest fit is one bisection away, the largest the end
of the list) and, per rack and pool-wide, the nodes sorted by capacity. Taking, releasing
or masking GPUs on a node updates those lists in place: a few bisections and
memmoves, never a scan of the pool.

Every sorted entry is a `SortKey` (amount, preference, position): amount is
slots for racks and blocks and GPUs for nodes (slots of a node are monotone
in its GPUs, so one list serves every worker size); lower preference wins
among equal amounts; position (name order) makes every choice deterministic.

Capacity is what a node can take now: allocatable minus what running gangs
and this cycle's admissions hold. Preference is the free GPUs themselves:
among equal slots a gang goes where it fills the free space most tightly, so
large holes stay whole for large gangs.

`ReleasedSlots` answers the same questions for a set of gangs about to end
without building an index: how many slots a rack, block or pool would have
once they are gone, as gangs are added and dropped one at a time.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import defaultdict
from collections.abc import Iterable, Mapping

from gpucluster.planning.admission_snapshot import NodeSnapshot, RunningGang, TopologyLevel

SortKey = tuple[int, int, int]
# A rack or a block by its position in the index, or the whole pool (None, 0).
Domain = tuple[TopologyLevel | None, int]
POOL: Domain = (None, 0)


class IndexedNode:
    """A node in the index; `masks` > 0 hides its capacity (excluded for the
    job being placed, or reserved for a blocked head)."""

    __slots__ = ("masks", "position", "rack", "snapshot", "used")

    def __init__(self, snapshot: NodeSnapshot, position: int, rack: Rack, used: int) -> None:
        self.snapshot = snapshot
        self.position = position
        self.rack = rack
        self.used = used
        self.masks = 0

    @property
    def name(self) -> str:
        return self.snapshot.name

    def domain(self, level: TopologyLevel | None) -> Domain:
        """The rack or block of this node, or the pool if `level` is None."""
        if level is None:
            return POOL
        return (level, self.rack.position if level == "rack" else self.rack.block.position)


class Rack:
    __slots__ = ("block", "label", "node_keys", "nodes_by_capacity", "position", "preference")

    def __init__(self, block: Block, label: str, position: int, max_capacity: int) -> None:
        self.block = block
        self.label = label
        self.position = position
        self.node_keys: list[SortKey] = []
        # How many nodes offer each capacity: slots of the rack for any worker
        # size follow from it without visiting the nodes.
        self.nodes_by_capacity = [0] * (max_capacity + 1)
        self.preference = 0

    def slots(self, worker_gpus: int) -> int:
        return sum(
            count * (capacity // worker_gpus)
            for capacity, count in enumerate(self.nodes_by_capacity)
        )


class Block:
    __slots__ = ("label", "position", "preference", "racks")

    def __init__(self, label: str, position: int) -> None:
        self.label = label
        self.position = position
        self.racks: list[Rack] = []
        self.preference = 0


class WorkerSizeView:
    """Slots of every rack and block for workers of `worker_gpus` GPUs."""

    __slots__ = ("block_slots", "blocks", "rack_slots", "racks", "racks_by_block", "total",
                 "worker_gpus")

    def __init__(self, worker_gpus: int, racks: list[Rack], blocks: list[Block]) -> None:
        self.worker_gpus = worker_gpus
        self.rack_slots = [rack.slots(worker_gpus) for rack in racks]
        self.block_slots = [
            sum(self.rack_slots[rack.position] for rack in block.racks) for block in blocks
        ]
        self.racks_by_block: list[list[SortKey]] = [
            sorted(self._rack_key(rack) for rack in block.racks) for block in blocks
        ]
        self.racks: list[SortKey] = sorted(self._rack_key(rack) for rack in racks)
        self.blocks: list[SortKey] = sorted(
            (self.block_slots[block.position], block.preference, block.position)
            for block in blocks
        )
        self.total = sum(self.block_slots)

    def _rack_key(self, rack: Rack) -> SortKey:
        return (self.rack_slots[rack.position], rack.preference, rack.position)

    def move(
        self, rack: Rack, old_rack_preference: int, old_block_preference: int, slot_change: int
    ) -> None:
        """Re-sort `rack` and its block after one of their nodes changed."""
        block = rack.block
        old_rack_key = (self.rack_slots[rack.position], old_rack_preference, rack.position)
        self.rack_slots[rack.position] += slot_change
        new_rack_key = self._rack_key(rack)
        _replace(self.racks_by_block[block.position], old_rack_key, new_rack_key)
        _replace(self.racks, old_rack_key, new_rack_key)
        old_block_key = (self.block_slots[block.position], old_block_preference, block.position)
        self.block_slots[block.position] += slot_change
        new_block_key = (self.block_slots[block.position], block.preference, block.position)
        _replace(self.blocks, old_block_key, new_block_key)
        self.total += slot_change


class CapacityIndex:
    """Free capacity of a set of nodes (one pool's schedulable nodes).

    `used` is GPUs already held per node name; it may exceed a node's
    allocatable (a GPU failed under a running gang), which leaves it no
    free capacity rather than a negative one.
    """

    def __init__(self, nodes: Iterable[NodeSnapshot], used: Mapping[str, int]) -> None:
        ordered = sorted(nodes, key=lambda node: (node.block, node.rack, node.name))
        max_capacity = max((node.allocatable_gpus for node in ordered), default=0)
        self.nodes: list[IndexedNode] = []
        # Every node's key, pool-wide: the tightest single node for a small gang.
        self.node_keys: list[SortKey] = []
        self.racks: list[Rack] = []
        self.blocks: list[Block] = []
        self._by_name: dict[str, IndexedNode] = {}
        self._views: dict[int, WorkerSizeView] = {}
        for snapshot in ordered:
            if not self.blocks or self.blocks[-1].label != snapshot.block:
                self.blocks.append(Block(snapshot.block, len(self.blocks)))
            block = self.blocks[-1]
            if not block.racks or block.racks[-1].label != snapshot.rack:
                rack = Rack(block, snapshot.rack, len(self.racks), max_capacity)
                block.racks.append(rack)
                self.racks.append(rack)
            rack = block.racks[-1]
            node = IndexedNode(snapshot, len(self.nodes), rack, used.get(snapshot.name, 0))
            self.nodes.append(node)
            self._by_name[snapshot.name] = node
            capacity, preference = self._measure(node)
            rack.node_keys.append((capacity, preference, node.position))
            self.node_keys.append((capacity, preference, node.position))
            rack.nodes_by_capacity[capacity] += 1
            rack.preference += preference
            block.preference += preference
        for rack in self.racks:
            rack.node_keys.sort()
        self.node_keys.sort()

    def domain_nodes(self, domain: Domain) -> list[IndexedNode]:
        """The nodes of a rack, of a block or of the pool, in topology order."""
        level, position = domain
        if level is None:
            return self.nodes
        racks = [self.racks[position]] if level == "rack" else self.blocks[position].racks
        return [self.nodes[key[2]] for rack in racks for key in rack.node_keys]

    def node(self, name: str) -> IndexedNode | None:
        return self._by_name.get(name)

    def view(self, worker_gpus: int) -> WorkerSizeView:
        """Slots per rack and block for this worker size, built on first use
        (from the per-rack capacity counts) and kept current from then on."""
        view = self._views.get(worker_gpus)
        if view is None:
            view = WorkerSizeView(worker_gpus, self.racks, self.blocks)
            self._views[worker_gpus] = view
        return view

    def capacity_if_released(self, node: IndexedNode, released: int) -> int:
        """Free capacity `node` would have with `released` more GPUs given back."""
        if node.masks:
            return 0
        return max(0, node.snapshot.allocatable_gpus - (node.used - released))

    def take(self, gpus_by_node: Mapping[str, int]) -> None:
        for name, gpus in gpus_by_node.items():
            node = self._by_name.get(name)
            if node is not None:
                self._change(node, used_change=gpus)

    def release(self, gpus_by_node: Mapping[str, int]) -> None:
        self.take({name: -gpus for name, gpus in gpus_by_node.items()})

    def mask(self, names: Iterable[str]) -> None:
        for name in names:
            node = self._by_name.get(name)
            if node is not None:
                self._change(node, mask_change=1)

    def unmask(self, names: Iterable[str]) -> None:
        for name in names:
            node = self._by_name.get(name)
            if node is not None:
                self._change(node, mask_change=-1)

    def _measure(self, node: IndexedNode) -> tuple[int, int]:
        """(capacity, preference) of a node: its free GPUs, twice."""
        free = 0 if node.masks else max(0, node.snapshot.allocatable_gpus - node.used)
        return free, free

    def _change(self, node: IndexedNode, used_change: int = 0, mask_change: int = 0) -> None:
        old_capacity, old_preference = self._measure(node)
        node.used += used_change
        node.masks += mask_change
        new_capacity, new_preference = self._measure(node)
        if (old_capacity, old_preference) == (new_capacity, new_preference):
            return
        rack = node.rack
        block = rack.block
        old_key = (old_capacity, old_preference, node.position)
        new_key = (new_capacity, new_preference, node.position)
        _replace(rack.node_keys, old_key, new_key)
        _replace(self.node_keys, old_key, new_key)
        rack.nodes_by_capacity[old_capacity] -= 1
        rack.nodes_by_capacity[new_capacity] += 1
        old_rack_preference = rack.preference
        old_block_preference = block.preference
        rack.preference += new_preference - old_preference
        block.preference += new_preference - old_preference
        for view in self._views.values():
            gpus = view.worker_gpus
            slot_change = new_capacity // gpus - old_capacity // gpus
            view.move(rack, old_rack_preference, old_block_preference, slot_change)


def _replace(keys: list[SortKey], old: SortKey, new: SortKey) -> None:
    if old == new:
        return
    del keys[bisect_left(keys, old)]
    insort(keys, new)


class ReleasedSlots:
    """Slots per rack, block and pool for one worker size as they would be
    with some gangs' GPUs released, computed beside the index without
    changing it: trying hundreds of gangs stays cheap."""

    def __init__(self, index: CapacityIndex, view: WorkerSizeView) -> None:
        self._index = index
        self._view = view
        self._released: dict[int, int] = defaultdict(int)
        self._rack_gain: dict[int, int] = defaultdict(int)
        self._block_gain: dict[int, int] = defaultdict(int)
        self._total_gain = 0

    def add(self, gang: RunningGang, sign: int = 1) -> None:
        worker_gpus = self._view.worker_gpus
        for name, gpus in gang.gpus_by_node.items():
            node = self._index.node(name)
            if node is None:
                continue
            before = self._index.capacity_if_released(node, self._released[node.position])
            self._released[node.position] += sign * gpus
            after = self._index.capacity_if_released(node, self._released[node.position])
            gain = after // worker_gpus - before // worker_gpus
            if gain:
                self._rack_gain[node.rack.position] += gain
                self._block_gain[node.rack.block.position] += gain
                self._total_gain += gain

    def remove(self, gang: RunningGang) -> None:
        self.add(gang, sign=-1)

    def gain(self, gang: RunningGang) -> int:
        """The slots the pool would gain if `gang` were released too."""
        worker_gpus = self._view.worker_gpus
        gain = 0
        for name, gpus in gang.gpus_by_node.items():
            node = self._index.node(name)
            if node is None:
                continue
            released = self._released.get(node.position, 0)
            before = self._index.capacity_if_released(node, released)
            after = self._index.capacity_if_released(node, released + gpus)
            gain += after // worker_gpus - before // worker_gpus
        return gain

    def slots(self, domain: Domain) -> int:
        level, position = domain
        if level is None:
            return self._view.total + self._total_gain
        if level == "rack":
            return self._view.rack_slots[position] + self._rack_gain.get(position, 0)
        return self._view.block_slots[position] + self._block_gain.get(position, 0)

    def fits(self, workers: int, level: TopologyLevel | None) -> bool:
        """Whether `workers` fit one domain of `level` (the pool if None)."""
        if level is None:
            return self.slots(POOL) >= workers
        if level == "rack":
            largest_now, slots, gains = self._view.racks, self._view.rack_slots, self._rack_gain
        else:
            largest_now, slots, gains = self._view.blocks, self._view.block_slots, self._block_gain
        if largest_now and largest_now[-1][0] >= workers:
            return True  # a domain no released GPU touches holds them already
        return any(slots[position] + gain >= workers for position, gain in gains.items())

