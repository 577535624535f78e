"""The operator's in-memory state, one object for the whole process.

`gpucluster run` creates it and hands it to Kopf as the operator's memo
(`memo.state`); per-object memos are shallow copies of the operator's, so
every handler, index filter and timer shares this one object. Nothing in the
handlers keeps state in module globals: a second operator in the same
process, or a test, starts from a clean OperatorState.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
from typing import Any

from gpucluster.planning.lifecycle import Assumed


@dataclasses.dataclass
class OperatorState:
    # `gpucluster run -n GLOB ...`: TrainingJobs are served only in matching
    # namespaces (empty: all). TrainingClusters and Nodes are cluster-scoped.
    served_namespaces: tuple[str, ...] = ()
    # Job decisions applied but not yet seen in the job index (its watch lags
    # the writes by a moment): the next cycle trusts these instead. Kueue
    # calls them assumed workloads.
    assumed_jobs: dict[str, Assumed] = dataclasses.field(default_factory=dict)
    # One lock per TrainingCluster serialises its admission cycle with the
    # judging of its jobs' spec edits: one writer of a job's phase at a time.
    job_locks: dict[str, asyncio.Lock] = dataclasses.field(default_factory=dict)
    # Per TrainingCluster: the fingerprint of its last plan's inputs, and when.
    last_plans: dict[str, tuple[int | None, float]] = dataclasses.field(default_factory=dict)

    def serves(self, namespace: str | None) -> bool:
        return not self.served_namespaces or any(
            fnmatch.fnmatchcase(namespace or "", glob) for glob in self.served_namespaces)

    def job_lock(self, cluster: str) -> asyncio.Lock:
        return self.job_locks.setdefault(cluster, asyncio.Lock())


def state_of(memo: Any) -> OperatorState:
    state: OperatorState = memo.state
    return state
