"""Choosing which running gangs a blocked head of the queue may evict.

Rule: only whole gangs of strictly lower priority in the head's pool are
candidates (equal or higher priority is never preempted, and a gang already
being evicted is not chosen twice). Candidates are tried in order of the
fewest GPU-hours lost (GPUs x time since admission), then lowest priority,
then key; they are added one at a time until the head would fit, checked by
placement (slots per rack, block and pool after the release, exactly what
`place` needs), not by counting GPUs. Then every victim but the last is
dropped again, most costly first, if the head still fits without it. The
last one added is always needed: without it the head did not fit.

Gangs already evicting count as released from the start, so a head waiting
for its victims to terminate picks no new ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from gpucluster.planning.admission_snapshot import PendingJob, RunningGang
from gpucluster.planning.capacity import CapacityIndex, WorkerSizeView
from gpucluster.planning.placement import slots_fit

SECONDS_PER_HOUR = 3600.0


def gpu_hours_lost(gang: RunningGang, now: float) -> float:
    """The work a gang loses if evicted now (it restarts from its checkpoint,
    which the planner cannot see, so all of its run time is counted)."""
    return gang.gpus * max(0.0, now - gang.admitted_at) / SECONDS_PER_HOUR


def select_victims(
    index: CapacityIndex, head: PendingJob, gangs: Iterable[RunningGang], now: float
) -> tuple[RunningGang, ...] | None:
    """The gangs to evict so that `head` fits on `index` once they and the
    already-evicting gangs are gone: possibly none, or None if no choice of
    victims lets it in. `index` must already mask the head's excluded nodes;
    it is not changed."""
    gangs = list(gangs)
    release = _ReleasedSlots(index, index.view(head.gpus_per_worker))
    for gang in gangs:
        if gang.evicting:
            release.add(gang)
    if release.fits(head):
        return ()
    candidates = sorted(
        (gang for gang in gangs if not gang.evicting and gang.priority < head.priority),
        key=lambda gang: (gpu_hours_lost(gang, now), gang.priority, gang.key),
    )
    victims: list[RunningGang] = []
    for gang in candidates:
        release.add(gang)
        victims.append(gang)
        if release.fits(head):
            break
    else:
        return None
    for gang in reversed(victims[:-1]):
        release.remove(gang)
        if release.fits(head):
            victims.remove(gang)
        else:
            release.add(gang)
    return tuple(victims)


class _ReleasedSlots:
    """Slots per rack, block and pool for one worker size as they would be
    with some gangs' GPUs released, computed beside the index without
    changing it: trying hundreds of candidates stays cheap."""

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

    def fits(self, job: PendingJob) -> bool:
        level = job.topology.required_level
        if level is None:
            return self._view.total + self._total_gain >= job.workers
        if slots_fit(self._view, job.workers, level):
            return True  # a domain no released GPU touches holds it already
        if level == "rack":
            return _any_reaches(self._view.rack_slots, self._rack_gain, job.workers)
        return _any_reaches(self._view.block_slots, self._block_gain, job.workers)


def _any_reaches(slots: Sequence[int], gains: dict[int, int], workers: int) -> bool:
    return any(slots[position] + gain >= workers for position, gain in gains.items())
