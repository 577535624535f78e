"""The operator's in-memory state, one object for the whole process.

Created at startup and handed to every handler through Kopf's memo (per-object
memos are shallow copies of the operator's, so they all share this object).
Nothing in the handlers keeps state in module globals: a test or a second
operator in the same process starts from a clean OperatorState.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import kopf

from gpucluster.planning.jobs import JobView


@dataclasses.dataclass
class OperatorState:
    # Decisions applied but not yet seen in the job index (its watch lags the
    # writes by a moment): the next cycle trusts these instead. Kueue calls
    # them assumed workloads.
    assumed_jobs: dict[str, JobView] = dataclasses.field(default_factory=dict)


@kopf.on.startup()
def create_state(memo: kopf.Memo, **_: Any) -> None:
    memo.state = OperatorState()


def state_of(memo: Any) -> OperatorState:
    state: OperatorState = memo.state
    return state
