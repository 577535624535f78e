"""GPU capacity of one pool, indexed by topology (block, rack, node).

Placement asks, once per job and every cycle, questions such as "the tightest
rack that holds 12 workers of 4 GPUs" or "the largest blocks for 8-GPU
workers", at up to 25,000 nodes; a scan of the nodes per question would cost
milliseconds each. Every worker of a gang has the same size, so a set of
nodes holds W workers of g GPUs exactly when the sum over the nodes of
floor(capacity / g) -- the *slots* for that worker size -- is at least W.
The index keeps, per worker size asked for, the slots of every rack and block
in sorted lists (the tightest fit is one bisection away, the largest the end
of the list), per rack the nodes sorted by capacity, and pool-wide the nodes
with room, by free GPUs. Taking, releasing or masking GPUs on nodes updates
those lists in place.

Cost. Building the index: one sort of the nodes and one pass over them. A
worker size's view, on first use: one pass over the racks and a sort of the
racks and of the blocks. Taking, releasing or masking GPUs on a set of nodes:
a few bisections and memmoves per node, and per worker size viewed, per rack
and block touched (not per node), never a scan of the pool. Reconciling it
with the next cycle's nodes and GPUs held (`reconcile`): the same, for the
nodes that changed since, so the index of a pool outlives its cycle.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from operator import attrgetter

from gpucluster.planning.admission_snapshot import NodeSnapshot, RunningGang, TopologyLevel

SortKey = tuple[int, int, int]
# A rack or a block by its position in the index, or the whole pool (None, 0).
Domain = tuple[TopologyLevel | None, int]
POOL: Domain = (None, 0)


_topology_order = attrgetter("block", "rack", "name")
_position = attrgetter("position")


class IndexedNode:
    """A node in the index; `masks` > 0 hides its capacity (unschedulable,
    excluded for the job being placed, or reserved for a blocked head).
    `free` is the capacity the index holds it at."""

    __slots__ = ("free", "masks", "position", "rack", "snapshot", "used")

    def __init__(self, snapshot: NodeSnapshot, position: int, rack: Rack, used: int) -> None:
        self.snapshot = snapshot
        self.position = position
        self.rack = rack
        self.used = used
        self.masks = 0 if snapshot.schedulable else 1
        self.free = 0 if self.masks else max(0, snapshot.allocatable_gpus - used)

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
            if count
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
        rack_keys = [
            (slots, rack.preference, rack.position)
            for slots, rack in zip(self.rack_slots, racks, strict=True)
        ]
        self.racks_by_block: list[list[SortKey]] = []
        self.block_slots: list[int] = []
        for block in blocks:
            keys = sorted(rack_keys[rack.position] for rack in block.racks)
            self.racks_by_block.append(keys)
            self.block_slots.append(sum(key[0] for key in keys))
        self.racks: list[SortKey] = sorted(rack_keys)
        self.blocks: list[SortKey] = sorted(
            (self.block_slots[block.position], block.preference, block.position)
            for block in blocks
        )
        self.total = sum(self.block_slots)

    def move_rack(self, rack: Rack, old_preference: int, slot_change: int) -> None:
        """Re-sort `rack` after some of its nodes changed (its block's slots
        follow in `move_block`)."""
        position = rack.position
        old_key = (self.rack_slots[position], old_preference, position)
        self.rack_slots[position] += slot_change
        new_key = (self.rack_slots[position], rack.preference, position)
        _replace(self.racks_by_block[rack.block.position], old_key, new_key)
        _replace(self.racks, old_key, new_key)

    def move_block(self, block: Block, old_preference: int, slot_change: int) -> None:
        position = block.position
        old_key = (self.block_slots[position], old_preference, position)
        self.block_slots[position] += slot_change
        _replace(self.blocks, old_key, (self.block_slots[position], block.preference, position))
        self.total += slot_change


class CapacityIndex:
    """Free capacity of a set of nodes (one pool's nodes).

    `used` is GPUs already held per node name; it may exceed a node's
    allocatable (a GPU failed under a running gang), which leaves it no
    free capacity rather than a negative one. An unschedulable node is
    masked from the start: it offers nothing, and it stays in the index so
    that `reconcile` can bring it back without building a new one.
    """

    def __init__(self, nodes: Iterable[NodeSnapshot], used: Mapping[str, int]) -> None:
        ordered = sorted(nodes, key=_topology_order)
        max_capacity = max((node.allocatable_gpus for node in ordered), default=0)
        self.max_capacity = max_capacity
        self.nodes: list[IndexedNode] = []
        # Pool-wide, the positions of the nodes with each free capacity, in
        # name order: the tightest single node for a small gang. Nodes with
        # no room are left out; no gang asks for them, and most of a busy
        # pool's nodes have none.
        self._positions_by_free: list[list[int]] = [[] for _ in range(max_capacity + 1)]
        self.racks: list[Rack] = []
        self.blocks: list[Block] = []
        self._by_name: dict[str, IndexedNode] = {}
        self._views: dict[int, WorkerSizeView] = {}
        # The nodes whose GPUs held or masks changed since the last build or
        # reconcile (the cycle's takes, releases and masks): `reconcile`
        # undoes them.
        self._touched: set[IndexedNode] = set()
        block: Block | None = None
        rack: Rack | None = None
        for snapshot in ordered:
            if block is None or block.label != snapshot.block:
                block = Block(snapshot.block, len(self.blocks))
                self.blocks.append(block)
                rack = None
            if rack is None or rack.label != snapshot.rack:
                rack = Rack(block, snapshot.rack, len(self.racks), max_capacity)
                block.racks.append(rack)
                self.racks.append(rack)
            position = len(self.nodes)
            node = IndexedNode(snapshot, position, rack, used.get(snapshot.name, 0))
            self.nodes.append(node)
            self._by_name[snapshot.name] = node
            free = node.free
            rack.node_keys.append((free, free, position))
            rack.nodes_by_capacity[free] += 1
            rack.preference += free
            if free:
                self._positions_by_free[free].append(position)
        for rack in self.racks:
            rack.node_keys.sort()
            rack.block.preference += rack.preference

    def node(self, name: str) -> IndexedNode | None:
        return self._by_name.get(name)

    def tightest_capacity(self, gpus: int) -> int | None:
        """The fewest free GPUs, at least `gpus`, that some node has."""
        for capacity in range(gpus, len(self._positions_by_free)):
            if self._positions_by_free[capacity]:
                return capacity
        return None

    def first_with_capacity(self, capacity: int) -> IndexedNode:
        """The first node, in name order, with exactly `capacity` free GPUs
        (some node has them: see `tightest_capacity`)."""
        return self.nodes[self._positions_by_free[capacity][0]]

    def nodes_with_room(self, gpus: int) -> Iterator[IndexedNode]:
        """The nodes with at least `gpus` free GPUs, fewest free first, then
        in name order."""
        for positions in self._positions_by_free[max(1, gpus):]:
            for position in positions:
                yield self.nodes[position]

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
        self._change(
            (node, gpus, 0)
            for node, gpus in ((self._by_name.get(name), gpus) for name, gpus in gpus_by_node.items())
            if node is not None
        )

    def release(self, gpus_by_node: Mapping[str, int]) -> None:
        self.take({name: -gpus for name, gpus in gpus_by_node.items()})

    def mask(self, names: Iterable[str]) -> None:
        self._change((node, 0, 1) for node in map(self._by_name.get, names) if node is not None)

    def unmask(self, names: Iterable[str]) -> None:
        self._change((node, 0, -1) for node in map(self._by_name.get, names) if node is not None)

    def reconcile(
        self, changed: Sequence[NodeSnapshot], used: Mapping[str, int], used_changed: Iterable[str]
    ) -> bool:
        """Make this index what a new one over its nodes would be, with
        `changed` in place of their earlier snapshots and `used` GPUs held
        per node, where `used_changed` names every node whose GPUs held may
        differ from those of the last build or reconcile (others' names are
        passed over): every take, release and mask since then is undone.
        False, with nothing changed, when a changed node is not one of its
        nodes at the same rack and block, or has more GPUs than the index
        was built for: then build a new one."""
        by_name = self._by_name
        for snapshot in changed:
            node = by_name.get(snapshot.name)
            if node is None or (snapshot.block, snapshot.rack) != (node.snapshot.block, node.snapshot.rack) \
                    or snapshot.allocatable_gpus > self.max_capacity:
                return False
        stale = set(self._touched)
        for snapshot in changed:
            node = by_name[snapshot.name]
            node.snapshot = snapshot
            stale.add(node)
        stale.update(node for node in map(by_name.get, used_changed) if node is not None)
        self._change(
            (node, used.get(node.name, 0) - node.used, (0 if node.snapshot.schedulable else 1) - node.masks)
            for node in sorted(stale, key=_position)
        )
        self._touched.clear()
        return True

    def _change(self, changes: Iterable[tuple[IndexedNode, int, int]]) -> None:
        """Apply (node, used change, mask change) for several nodes, then
        re-sort each rack and block they touched once, not once per node:
        a gang on 64 nodes of 16 racks moves 16 racks per worker size."""
        # Per rack touched: its preference before, and each node's
        # (old, new) capacity.
        touched: dict[Rack, tuple[int, list[tuple[int, int]]]] = {}
        touched_nodes = self._touched
        for node, used_change, mask_change in changes:
            touched_nodes.add(node)
            old = node.free
            node.used += used_change
            node.masks += mask_change
            new = 0 if node.masks else max(0, node.snapshot.allocatable_gpus - node.used)
            if new == old:
                continue
            node.free = new
            rack = node.rack
            if rack not in touched:
                touched[rack] = (rack.preference, [])
            touched[rack][1].append((old, new))
            position = node.position
            _replace(rack.node_keys, (old, old, position), (new, new, position))
            if old:
                positions = self._positions_by_free[old]
                del positions[bisect_left(positions, position)]
            if new:
                insort(self._positions_by_free[new], position)
            rack.nodes_by_capacity[old] -= 1
            rack.nodes_by_capacity[new] += 1
            rack.preference += new - old
        if not touched:
            return
        old_block_preferences: dict[Block, int] = {}
        for rack, (old_rack_preference, _) in touched.items():
            block = rack.block
            old_block_preferences.setdefault(block, block.preference)
            block.preference += rack.preference - old_rack_preference
        for view in self._views.values():
            gpus = view.worker_gpus
            block_changes = dict.fromkeys(old_block_preferences, 0)
            for rack, (old_rack_preference, capacities) in touched.items():
                slot_change = sum(new // gpus - old // gpus for old, new in capacities)
                view.move_rack(rack, old_rack_preference, slot_change)
                block_changes[rack.block] += slot_change
            for block, slot_change in block_changes.items():
                view.move_block(block, old_block_preferences[block], slot_change)


def _replace(keys: list[SortKey], old: SortKey, new: SortKey) -> None:
    if old == new:
        return
    del keys[bisect_left(keys, old)]
    insort(keys, new)


class ReleasedSlots:
    """Slots per rack, block and pool for one worker size as they would be
    with some gangs' GPUs released, computed beside the index without
    changing it: trying hundreds of gangs stays cheap. The index must not
    change while this is in use.

    Cost: a gang's nodes are looked up once, on its first use; from then on
    adding, dropping or pricing it is a few integer operations per node
    (masked nodes, which no release makes usable, are left out)."""

    def __init__(self, index: CapacityIndex, view: WorkerSizeView) -> None:
        self._index = index
        self._view = view
        self._released: dict[int, int] = {}
        self._rack_gain: dict[int, int] = defaultdict(int)
        self._block_gain: dict[int, int] = defaultdict(int)
        self._total_gain = 0
        # id(gang) -> the gang (kept so its id stays its own) and its usable
        # nodes as (position, rack, block, GPUs free now (negative when
        # more are held than allocatable), GPUs it holds there).
        self._gang_nodes: dict[int, tuple[RunningGang, list[tuple[int, int, int, int, int]]]] = {}

    def _nodes(self, gang: RunningGang) -> list[tuple[int, int, int, int, int]]:
        cached = self._gang_nodes.get(id(gang))
        if cached is not None:
            return cached[1]
        nodes = []
        for name, gpus in gang.gpus_by_node.items():
            node = self._index.node(name)
            if node is not None and not node.masks:
                rack = node.rack
                nodes.append((node.position, rack.position, rack.block.position,
                              node.snapshot.allocatable_gpus - node.used, gpus))
        self._gang_nodes[id(gang)] = (gang, nodes)
        return nodes

    def add(self, gang: RunningGang, sign: int = 1) -> None:
        worker_gpus = self._view.worker_gpus
        released = self._released
        for position, rack, block, headroom, gpus in self._nodes(gang):
            before = released.get(position, 0)
            after = before + sign * gpus
            released[position] = after
            gain = max(0, headroom + after) // worker_gpus - max(0, headroom + before) // worker_gpus
            if gain:
                self._rack_gain[rack] += gain
                self._block_gain[block] += gain
                self._total_gain += gain

    def remove(self, gang: RunningGang) -> None:
        self.add(gang, sign=-1)

    def gain(self, gang: RunningGang) -> int:
        """The slots the pool would gain if `gang` were released too."""
        worker_gpus = self._view.worker_gpus
        released = self._released
        gain = 0
        for position, _, _, headroom, gpus in self._nodes(gang):
            before = headroom + released.get(position, 0)
            gain += max(0, before + gpus) // worker_gpus - max(0, before) // worker_gpus
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

