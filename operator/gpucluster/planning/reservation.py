"""Where a blocked head of the queue will start once running gangs end: the
nodes it reserves while it waits for them (no victim can be evicted for it).

The rules, each a tie-break of the ones before it:
1. The fewest running gangs must end. Without run-time estimates, the more
   independent gangs the head waits for, the later the last of them ends.
   Gangs already evicting are ending anyway and cost nothing.
2. Of the domains the head may use (the pool, or each rack or block when
   that level is required), the one whose ending gangs free the most slots
   for the head there: the fewest nodes idle now are held back.
3. The head's nodes are those the ending gangs free, plus only as many
   nodes with room now as it still needs: those in the blocks, then racks,
   where the gangs free the most slots (the head stays close together), the
   tightest fill first, then name. Every other node stays outside the
   reservation, free for backfill.
4. On those nodes, the placement rules of placement.py.

Which gangs, per domain: ranked by the slots their end alone adds to the
domain for the head's worker size, most first, then the earliest admitted (of
gangs freeing as much, one backfilled since or admitted this cycle comes
last, so the reservation does not wander onto it from one cycle to the
next), then key; added one at a time until the head fits, then every one but
the last dropped again, last added first, if the head still fits without it.
Where no node holds GPUs of two of these gangs, the slots they free add up,
and the k gangs freeing the most free the most any k gangs can: the count
found is then the fewest possible. Where gangs share nodes it is a greedy
choice, not always the fewest, but still the fewest whenever one gang would
do.

Cost per head: a few passes over the gangs' nodes (a gang spanning domains
split into its part in each), a sort of the gangs of each domain, a sort of
the nodes with room now when the head needs some, and an index built over
the head's nodes only: linear in nodes plus gangs, up to a logarithm.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from gpucluster.planning.admission_snapshot import PendingJob, RunningGang, TopologyLevel
from gpucluster.planning.capacity import CapacityIndex, Domain, IndexedNode, ReleasedSlots
from gpucluster.planning.placement import Placement, place


def place_after_fewest_ends(
    index: CapacityIndex, head: PendingJob, gangs: Iterable[RunningGang]
) -> tuple[Placement, float | None] | None:
    """Where `head` starts once the fewest of `gangs` (and those evicting)
    have ended, and by when at the latest: the run-time limit of the last
    gang it waits for (None when one has no limit, or when it waits only
    for gangs already evicting, which end within their pods' grace). None
    if no ends let it in (its nodes are cordoned or excluded). `index` is
    the pool's free capacity with the head's excluded nodes masked; it is
    not changed."""
    gangs = list(gangs)
    released = ReleasedSlots(index, index.view(head.gpus_per_worker))
    evicting = [gang for gang in gangs if gang.evicting]
    for gang in evicting:
        released.add(gang)
    level = head.topology.required_level
    best: tuple[tuple[int, int, int], Domain, tuple[RunningGang, ...]] | None = None
    for domain, candidates in _gangs_by_domain(index, level, gangs).items():
        found = _fewest_ends(released, domain, head.workers, candidates)
        if found is None:
            continue
        ending, slots_freed = found
        rank = (len(ending), -slots_freed, domain[1])
        if best is None or rank < best[0]:
            best = (rank, domain, ending)
    if best is None:
        return None
    _, domain, ending = best
    gpus_back: Counter[str] = Counter()
    for gang in (*evicting, *ending):
        gpus_back.update(gang.gpus_by_node)
    nodes = _nodes_for(index, head, domain, gpus_back)
    after = CapacityIndex(
        (node.snapshot for node in nodes),
        {node.name: node.used - gpus_back[node.name] for node in nodes},
    )
    placement = place(after, head)
    if placement is None:
        raise RuntimeError(f"the gangs {head.key} waits for do not make it fit")
    return placement, _last_limit(ending)


def _last_limit(gangs: Sequence[RunningGang]) -> float | None:
    """When the last of `gangs` ends at the latest; None if one has no limit
    or there are none (only evicting gangs are waited for)."""
    limits = [gang.ends_by for gang in gangs if gang.ends_by is not None]
    return max(limits) if gangs and len(limits) == len(gangs) else None


def _nodes_for(
    index: CapacityIndex, head: PendingJob, domain: Domain, gpus_back: Mapping[str, int]
) -> list[IndexedNode]:
    """The nodes of `domain` the ending gangs free, and enough with room now
    to hold the rest of the head (rule 3); never a masked node."""
    level, worker_gpus = domain[0], head.gpus_per_worker
    chosen: list[IndexedNode] = []
    slots = 0
    slots_near: Counter[Domain] = Counter()
    for name, gpus in gpus_back.items():
        node = index.node(name)
        if not gpus or node is None or node.masks or node.domain(level) != domain:
            continue
        node_slots = index.capacity_if_released(node, gpus) // worker_gpus
        chosen.append(node)
        slots += node_slots
        slots_near[node.domain("block")] += node_slots
        slots_near[node.domain("rack")] += node_slots
    if slots >= head.workers:
        return chosen
    # Nodes with room for a worker now.
    with_room = [
        node
        for node in index.nodes_with_room(worker_gpus)
        if not gpus_back.get(node.name) and node.domain(level) == domain
    ]
    with_room.sort(
        key=lambda node: (
            -slots_near[node.domain("block")],
            -slots_near[node.domain("rack")],
            index.capacity_if_released(node, 0),
            node.position,
        )
    )
    for node in with_room:
        if slots >= head.workers:
            break
        chosen.append(node)
        slots += index.capacity_if_released(node, 0) // worker_gpus
    return chosen


def _gangs_by_domain(
    index: CapacityIndex, level: TopologyLevel | None, gangs: Iterable[RunningGang]
) -> dict[Domain, list[RunningGang]]:
    """Per domain, the part in it of each gang to wait for (not evicting):
    what its end frees there."""
    by_domain: dict[Domain, list[RunningGang]] = defaultdict(list)
    for gang in gangs:
        if gang.evicting:
            continue
        nodes = [index.node(name) for name in gang.gpus_by_node]
        domains = {node.domain(level) for node in nodes if node is not None}
        if len(domains) == 1 and None not in nodes:
            by_domain[domains.pop()].append(gang)  # the usual case: the gang is its part
            continue
        parts: dict[Domain, dict[str, int]] = defaultdict(dict)
        for (name, gpus), node in zip(gang.gpus_by_node.items(), nodes, strict=True):
            if node is not None:
                parts[node.domain(level)][name] = gpus
        for domain, gpus_by_node in parts.items():
            by_domain[domain].append(replace(gang, gpus_by_node=gpus_by_node))
    return by_domain


def _fewest_ends(
    released: ReleasedSlots, domain: Domain, workers: int, candidates: Sequence[RunningGang]
) -> tuple[tuple[RunningGang, ...], int] | None:
    """The gangs whose end lets `workers` fit `domain`, with the slots they
    free there, or None if even all of them do not; `released` is left as
    it was found."""
    slots_before = released.slots(domain)
    ranked = sorted(
        candidates, key=lambda gang: (-released.gain(gang), gang.admitted_at, gang.key)
    )
    ending: list[RunningGang] = []
    for gang in ranked:
        if released.slots(domain) >= workers:
            break
        released.add(gang)
        ending.append(gang)
    fits = released.slots(domain) >= workers
    if fits:
        for gang in reversed(ending[:-1]):
            released.remove(gang)
            if released.slots(domain) >= workers:
                ending.remove(gang)
            else:
                released.add(gang)
    slots_freed = released.slots(domain) - slots_before
    for gang in ending:
        released.remove(gang)
    return (tuple(ending), slots_freed) if fits else None
