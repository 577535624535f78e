"""Which judgements of a TrainingJob wait for its cluster's admission cycle.

The cycle holds the cluster's lock while it writes its decisions; at 25,000
nodes those writes take seconds, and a first judgement that waited behind
them made submissions crawl. A job no cycle can see yet is judged at once;
an edit of a job a cycle may be deciding waits for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import kopf
import pytest
from gpucluster.handlers import jobs as handlers
from gpucluster.handlers.indexes import PodIndex, index_pod
from gpucluster.handlers.state import OperatorState
from gpucluster.planning.jobs import JobView, Phase
from gpucluster.planning.lifecycle import Assumed

SPEC = {"cluster": "c", "workers": 2, "gpusPerWorker": 8}
META = {"generation": 1, "creationTimestamp": "2026-11-30T00:00:00Z"}


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[Mapping[str, Any]]:
    """The status writes of the handler; the pool check and the API calls
    are the only parts replaced."""
    statuses: list[Mapping[str, Any]] = []

    async def judge(spec: Any) -> tuple[str, int]:
        return "h100", 0

    async def patch_status(namespace: str, name: str, status: Mapping[str, Any]) -> None:
        statuses.append(status)

    async def read_job(namespace: str, name: str) -> Any:
        return {"metadata": {"name": name, "namespace": namespace, "generation": 1}, "status": {}}

    monkeypatch.setattr(handlers, "_judge", judge)
    monkeypatch.setattr(handlers.kube_jobs, "patch_status", patch_status)
    monkeypatch.setattr(handlers.kube_jobs, "read_job", read_job)
    monkeypatch.setattr(kopf, "info", lambda *args, **kwargs: None)
    monkeypatch.setattr(kopf, "warn", lambda *args, **kwargs: None)
    return statuses


def submitted(state: OperatorState, status: Mapping[str, Any], reason: str = "create", uid: str = "u1") -> Any:
    return handlers.job_submitted(name="job", namespace="ns", uid=uid, spec=SPEC, status=status, meta=META,
                                  reason=reason, memo=types.SimpleNamespace(state=state))


def run_while_cycle_holds_the_lock(state: OperatorState, status: Mapping[str, Any]) -> bool:
    """Whether the judgement finished while the cluster's cycle held the
    lock; it must finish once the lock is free in any case."""

    async def main() -> bool:
        lock = state.job_lock("c")
        await lock.acquire()
        judgement = asyncio.ensure_future(submitted(state, status))
        await asyncio.sleep(0.05)
        done_while_held = judgement.done()
        lock.release()
        await asyncio.wait_for(judgement, 1)
        return done_while_held

    return asyncio.run(main())


def test_a_new_job_is_queued_while_a_cycle_holds_the_lock(written: list[Mapping[str, Any]]) -> None:
    state = OperatorState()
    assert run_while_cycle_holds_the_lock(state, {})
    assert written[0]["phase"] == "Queued" and written[0]["pool"] == "h100"
    assert state.assumed_jobs["ns/job"].view.phase == Phase.QUEUED


def test_an_edit_of_a_judged_job_waits_for_the_cycle(written: list[Mapping[str, Any]]) -> None:
    state = OperatorState()
    queued = {"phase": "Queued", "pool": "h100", "priority": 0, "attempt": 0}
    assert not run_while_cycle_holds_the_lock(state, queued)


def test_a_body_older_than_the_first_judgement_waits_for_the_cycle(written: list[Mapping[str, Any]]) -> None:
    """The event's body has no phase yet, but this process judged the job and
    a cycle may have admitted it since: the edit is judged under the lock,
    from that decision."""
    state = OperatorState()
    assert run_while_cycle_holds_the_lock(state, {})
    admitted = state.assumed_jobs["ns/job"].view
    state.assumed_jobs["ns/job"] = Assumed(dataclasses.replace(admitted, phase=Phase.ADMITTED, nodes=("n0", "n1")),
                                           0.0)
    written.clear()
    assert not run_while_cycle_holds_the_lock(state, {})
    assert all(status.get("phase") != "Queued" for status in written), "the admitted gang was queued again"


def test_a_job_made_again_under_the_same_name_is_judged_afresh(written: list[Mapping[str, Any]]) -> None:
    """A decision about the deleted job of that name (kept until the index
    shows it gone) is not the new job's."""
    state = OperatorState()
    asyncio.run(submitted(state, {}))
    running = dataclasses.replace(state.assumed_jobs["ns/job"].view, phase=Phase.RUNNING, nodes=("n0", "n1"))
    state.assumed_jobs["ns/job"] = Assumed(running, 0.0)
    written.clear()

    async def main() -> None:
        lock = state.job_lock("c")
        await lock.acquire()  # a cycle of the cluster at work: the new job does not wait for it
        await asyncio.wait_for(submitted(state, {}, uid="u2"), 1)
        lock.release()

    asyncio.run(main())
    assert written[0]["phase"] == "Queued" and written[0]["attempt"] == 0
    assert state.assumed_jobs["ns/job"].view.uid == "u2"


def test_a_resumed_job_with_a_phase_is_left_alone(written: list[Mapping[str, Any]]) -> None:
    state = OperatorState()
    asyncio.run(submitted(state, {"phase": "Running", "pool": "h100"}, reason="resume"))
    assert written == []


def worker_pod(job: str, attempt: int, rank: int) -> dict[str, Any]:
    return {"metadata": {"name": f"{job}-{attempt}-{rank}", "namespace": "ns",
                         "labels": {"gpucluster.dev/job": job, "gpucluster.dev/attempt": str(attempt),
                                    "gpucluster.dev/rank": str(rank)}},
            "spec": {"nodeName": f"n{rank}"}, "status": {"phase": "Running"}}


def test_a_gang_is_deleted_by_name_every_attempt_known_and_the_current_one_by_rank() -> None:
    """The index may not hold pods created a moment ago: the current
    attempt's are named from its ranks too."""
    pods = PodIndex()
    pods._replace([(f"ns/{p['metadata']['name']}", index_pod(p))
                   for p in (worker_pod("job", 0, 0), worker_pod("job", 1, 1), worker_pod("other", 1, 0))])
    view = JobView(key="ns/job", namespace="ns", name="job", cluster="c", pool="h100", priority=0,
                   arrival=0.0, workers=2, gpus_per_worker=8, phase=Phase.RUNNING, attempt=1)
    assert handlers._gang_pods(pods, view) == {"job-0-0", "job-1-0", "job-1-1"}
