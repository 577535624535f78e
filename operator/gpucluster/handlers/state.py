"""The operator's in-memory state, one object for the whole process.

Created at startup and handed to every handler through Kopf's memo (per-object
memos are shallow copies of the operator's, so they all share this object).
Nothing in the handlers keeps state in module globals: a test or a second
operator in the same process starts from a clean OperatorState.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import kopf

from gpucluster.planning.jobs import JobView
from gpucluster.planning.remediation import UnseenWrites


@dataclasses.dataclass
class PoolRemediation:
    """What one pool's remediation keeps between its passes."""

    unseen: UnseenWrites = dataclasses.field(default_factory=UnseenWrites)
    # Nodes whose drain has been announced: the drain is retried every pass,
    # its Event is posted once.
    draining: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class ClusterRemediation:
    """The remediation daemon of one TrainingCluster: the pools node events
    asked a pass for since its last one, and each pool's memory. It lives as
    long as the daemon, so a replica that peering paused never plans on the
    memory of the time it last led."""

    wanted: set[str] = dataclasses.field(default_factory=set)
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    pools: dict[str, PoolRemediation] = dataclasses.field(default_factory=dict)

    def want(self, pool: str) -> None:
        self.wanted.add(pool)
        self.wake.set()

    def take_wanted(self) -> set[str]:
        wanted, self.wanted = self.wanted, set()
        self.wake.clear()
        return wanted


@dataclasses.dataclass
class OperatorState:
    # Decisions applied but not yet seen in the job index (its watch lags the
    # writes by a moment): the next cycle trusts these instead. Kueue calls
    # them assumed workloads.
    assumed_jobs: dict[str, JobView] = dataclasses.field(default_factory=dict)
    # One lock per TrainingCluster: its create, update and resume handlers and
    # its resync timer run one reconcile at a time.
    reconcile_locks: dict[str, asyncio.Lock] = dataclasses.field(default_factory=dict)
    # The remediation daemons running in this replica, by TrainingCluster.
    remediation: dict[str, ClusterRemediation] = dataclasses.field(default_factory=dict)

    def reconcile_lock(self, cluster: str) -> asyncio.Lock:
        return self.reconcile_locks.setdefault(cluster, asyncio.Lock())


@kopf.on.startup()
def create_state(memo: kopf.Memo, **_: Any) -> None:
    memo.state = OperatorState()


def state_of(memo: Any) -> OperatorState:
    state: OperatorState = memo.state
    return state
