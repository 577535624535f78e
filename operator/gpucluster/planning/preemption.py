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

from collections.abc import Iterable

from gpucluster.planning.admission_snapshot import PendingJob, RunningGang
from gpucluster.planning.capacity import CapacityIndex, ReleasedSlots

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
    release = ReleasedSlots(index, index.view(head.gpus_per_worker))
    workers, level = head.workers, head.topology.required_level
    for gang in gangs:
        if gang.evicting:
            release.add(gang)
    if release.fits(workers, level):
        return ()
    candidates = sorted(
        (gang for gang in gangs if not gang.evicting and gang.priority < head.priority),
        key=lambda gang: (gpu_hours_lost(gang, now), gang.priority, gang.key),
    )
    victims: list[RunningGang] = []
    for gang in candidates:
        release.add(gang)
        victims.append(gang)
        if release.fits(workers, level):
            break
    else:
        return None
    for gang in reversed(victims[:-1]):
        release.remove(gang)
        if release.fits(workers, level):
            victims.remove(gang)
        else:
            release.add(gang)
    return tuple(victims)
