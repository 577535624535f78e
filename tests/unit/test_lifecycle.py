"""planning.lifecycle.step: one table of (job, observation) -> transition."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from gpucluster.planning.health import REASON_GPU_LOST, REASON_OVER_TEMPERATURE
from gpucluster.planning.jobs import JobView, Phase, Problem, WorkerPod
from gpucluster.planning.lifecycle import (
    NOTHING,
    Admit,
    Assumed,
    GangObserved,
    Observation,
    Preempt,
    QueuePosition,
    SpecJudged,
    Transition,
    Unplaceable,
    overlay_assumed,
    step,
)
from gpucluster.planning.pools import ObservedNode

NOW = 1000.0
NODES = {n: ObservedNode(name=n, pool="h100", ordinal=i) for i, n in enumerate(["n0", "n1", "n2", "n3"])}


def job(phase: Phase | None = Phase.RUNNING, **extra: Any) -> JobView:
    base = JobView(key="ns/job", namespace="ns", name="job", cluster="c", pool="h100", priority=0,
                   arrival=0.0, workers=2, gpus_per_worker=8, phase=phase, attempt=1, restarts=0,
                   max_restarts=2, nodes=("n0", "n1"), first_admitted_at=900.0, workers_ready="2/2",
                   reason="AllWorkersRunning")
    return dataclasses.replace(base, **extra)


def pod(rank: int, phase: str = "Running", attempt: int = 1, **extra: Any) -> WorkerPod:
    base = WorkerPod(name=f"job-{attempt}-{rank}", job_key="ns/job", attempt=attempt, rank=rank,
                     node=f"n{rank}", phase=phase, gpus=8)
    return dataclasses.replace(base, **extra)


GONE: dict[str, Any] = {}


def seen(*pods: WorkerPod, **node_changes: dict[str, Any]) -> GangObserved:
    nodes = {name: dataclasses.replace(node, **node_changes.get(name, {})) for name, node in NODES.items()
             if node_changes.get(name) is not GONE}
    return GangObserved(pods or (pod(0), pod(1)), nodes)


def judged(outcome: tuple[str, int] | Problem) -> SpecJudged:
    return SpecJudged(outcome, workers=2, gpus_per_worker=8, generation=2)


UNKNOWN_CLASS = Problem("UnknownPriorityClass", "spec.priorityClassName: PriorityClass 'x' does not exist")
NOT_READY = {"ready": False, "not_ready_since": NOW - 3}
DOWN_LONG = {"ready": False, "not_ready_since": NOW - 61}

# (name, job, observation, (phase written, reason written, pods deleted, pods created, Event reason))
TABLE: list[tuple[str, JobView, Observation, tuple[str | None, str | None, bool, bool, str | None]]] = [
    # submission and edits
    ("new job judged ok is queued", job(None, pool="", nodes=()), judged(("h100", 5)),
     ("Queued", "Queued", False, False, "Queued")),
    ("new job judged bad fails naming the field", job(None, pool="", nodes=()),
     judged(Problem("UnknownPool", "spec.pool: no pool 'x'")), ("Failed", "UnknownPool", False, False, "UnknownPool")),
    ("queued job, edit changes nothing", job(Phase.QUEUED, nodes=()), judged(("h100", 0)),
     (None, None, False, False, None)),
    ("queued job, new priority", job(Phase.QUEUED, nodes=()), judged(("h100", 7)),
     (None, None, False, False, "SpecChanged")),
    ("queued job, edit judged bad", job(Phase.QUEUED, nodes=()), judged(UNKNOWN_CLASS),
     ("Failed", "UnknownPriorityClass", False, False, "UnknownPriorityClass")),
    ("restarting job, edit judged bad ends the old pods too", job(Phase.RESTARTING, nodes=()), judged(UNKNOWN_CLASS),
     ("Failed", "UnknownPriorityClass", True, False, "UnknownPriorityClass")),
    ("running gang, edit judged bad: the gang ends first", job(), judged(UNKNOWN_CLASS),
     ("Failed", "UnknownPriorityClass", True, False, "UnknownPriorityClass")),
    ("running gang, edit moves it to another pool: the gang ends first", job(), judged(("h200", 0)),
     ("Queued", "SpecChanged", True, False, "SpecChanged")),
    ("running gang, new priority: keeps running", job(), judged(("h100", 9)),
     (None, None, False, False, "SpecChanged")),
    ("failed for a curable reason, edit fixes it", job(Phase.FAILED, reason="UnknownPool"), judged(("h100", 0)),
     ("Queued", "Queued", False, False, "Queued")),
    ("failed for good, edit is too late", job(Phase.FAILED, reason="MaxRestartsExceeded"), judged(("h100", 0)),
     (None, None, False, False, None)),
    ("succeeded, edit is too late", job(Phase.SUCCEEDED), judged(UNKNOWN_CLASS), (None, None, False, False, None)),
    # admission
    ("queued job admitted", job(Phase.QUEUED, nodes=()), Admit(("n2", "n3")),
     ("Admitted", "Admitted", False, True, "Admitted")),
    ("restarting job admitted", job(Phase.RESTARTING, nodes=()), Admit(("n2", "n3")),
     ("Admitted", "Admitted", False, True, "Admitted")),
    ("running gang is not admitted twice", job(), Admit(("n2", "n3")), (None, None, False, False, None)),
    ("never fits the whole pool", job(Phase.QUEUED, nodes=()), Unplaceable("needs 9 nodes", True),
     ("Failed", "Unschedulable", False, False, "Unschedulable")),
    ("never fits a pool still growing", job(Phase.QUEUED, nodes=()), Unplaceable("needs 9 nodes", False),
     (None, "WaitingForNodes", False, False, None)),
    ("queue position moves", job(Phase.QUEUED, nodes=()), QueuePosition(3), (None, None, False, False, None)),
    # the gang's life
    ("all workers running", job(Phase.ADMITTED, workers_ready="0/2"), seen(),
     ("Running", "AllWorkersRunning", False, False, "Running")),
    ("all workers exit 0", job(), seen(pod(0, "Succeeded"), pod(1, "Succeeded")),
     ("Succeeded", "AllWorkersSucceeded", False, False, "Succeeded")),
    ("a worker fails", job(), seen(pod(0), pod(1, "Failed", exit_code=1)),
     ("Restarting", "WorkerFailed", True, False, "GangRestart")),
    ("a worker fails, restarts used up", job(restarts=2), seen(pod(0), pod(1, "Failed", exit_code=1)),
     ("Failed", "MaxRestartsExceeded", True, False, "MaxRestartsExceeded")),
    ("a worker's pod is gone", job(), seen(pod(0)), ("Restarting", "WorkerLost", True, False, "GangRestart")),
    ("an old attempt's failed pod is ignored", job(), seen(pod(0), pod(1), pod(1, "Failed", attempt=0)),
     (None, None, False, False, None)),
    ("a node NotReady for 3 s: no restart", job(), seen(n1=NOT_READY),
     (None, "NodeUnready", False, False, "NodeUnready")),
    ("a node NotReady past the grace", job(), seen(n1=DOWN_LONG),
     ("Restarting", "NodeFailed", True, False, "GangRestart")),
    ("a node NotReady with no grace", job(node_failure_grace_s=0), seen(n1=NOT_READY),
     ("Restarting", "NodeFailed", True, False, "GangRestart")),
    ("a node deleted: at once", job(), seen(n1=GONE),
     ("Restarting", "NodeFailed", True, False, "GangRestart")),
    ("a fatal GPU fault: at once", job(),
     seen(n1={"gpu_fault": REASON_GPU_LOST, "gpu_healthy": False, "gpu_fault_since": NOW}),
     ("Restarting", "NodeFailed", True, False, "GangRestart")),
    ("a transient GPU fault within the grace", job(),
     seen(n1={"gpu_fault": REASON_OVER_TEMPERATURE, "gpu_healthy": False, "gpu_fault_since": NOW - 10}),
     (None, "NodeUnready", False, False, "NodeUnready")),
    ("a transient GPU fault past the grace", job(),
     seen(n1={"gpu_fault": REASON_OVER_TEMPERATURE, "gpu_healthy": False, "gpu_fault_since": NOW - 61}),
     ("Restarting", "NodeFailed", True, False, "GangRestart")),
    ("the node is back within the grace", job(reason="NodeUnready", message="node n1 is NotReady; ..."), seen(),
     (None, "AllWorkersRunning", False, False, "NodeRecovered")),
    ("past the deadline", job(deadline_seconds=50), seen(),
     ("Failed", "DeadlineExceeded", True, False, "DeadlineExceeded")),
    ("every rank exited 0, first seen past the deadline", job(deadline_seconds=50),
     seen(pod(0, "Succeeded"), pod(1, "Succeeded")),
     ("Succeeded", "AllWorkersSucceeded", False, False, "Succeeded")),
    ("every rank exited 0, then a node went", job(), seen(pod(0, "Succeeded"), pod(1, "Succeeded"), n1=GONE),
     ("Succeeded", "AllWorkersSucceeded", False, False, "Succeeded")),
    ("past the deadline while waiting to restart", job(Phase.RESTARTING, deadline_seconds=50, nodes=()), seen(),
     ("Failed", "DeadlineExceeded", True, False, "DeadlineExceeded")),
    ("a queued job has no gang to judge", job(Phase.QUEUED, nodes=()), seen(), (None, None, False, False, None)),
    # preemption
    ("a running gang preempted", job(), Preempt("ns/big"), ("Queued", "Preempted", True, False, "Preempted")),
    ("a queued job is not preempted", job(Phase.QUEUED, nodes=()), Preempt("ns/big"),
     (None, None, False, False, None)),
]


@pytest.mark.parametrize(("before", "observation", "expected"), [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])
def test_transition(before: JobView, observation: Observation,
                    expected: tuple[str | None, str | None, bool, bool, str | None]) -> None:
    transition = step(before, observation, NOW)
    got = (transition.status.get("phase"), transition.status.get("reason"), transition.delete_pods,
           bool(transition.create_pods), transition.note.reason if transition.note else None)
    assert got == expected
    if transition.status.get("phase"):
        assert transition.assume is not None and transition.assume.phase == transition.status["phase"]
    if transition.condition is not None:
        assert transition.condition.reason


def test_restart_moves_the_attempt_on_and_avoids_the_failed_node() -> None:
    transition = step(job(), seen(pod(0), pod(1, "Failed", exit_code=137)), NOW)
    assert transition.status["attempt"] == 2 and transition.status["restarts"] == 1
    assert transition.status["excludedNodes"] == ["n1"] and transition.status["nodes"] == []
    assert transition.assume is not None and transition.assume.excluded_nodes == {"n1"}
    assert transition.restart_reason == "WorkerFailed"
    assert "rank 1" in transition.note.message and "exit code 137" in transition.note.message  # type: ignore[union-attr]


def test_grace_message_says_when_the_gang_restarts_and_is_written_once() -> None:
    first = step(job(), seen(n1=NOT_READY), NOW)
    assert "n1 is NotReady" in first.status["message"] and "nodeFailureGraceSeconds" in first.status["message"]
    assert first.assume is not None
    assert step(first.assume, seen(n1=NOT_READY), NOW + 1) == NOTHING


def test_admission_records_the_wait_and_the_first_admission() -> None:
    transition = step(job(Phase.RESTARTING, nodes=(), queued_at=990.0), Admit(("n2", "n3")), NOW)
    assert transition.create_pods == ("n2", "n3") and transition.waited_s == 10.0
    assert transition.status["firstAdmittedAt"] == "1970-01-01T00:15:00Z", "kept from the first admission"


def test_a_spec_edit_that_moves_a_running_gang_requeues_it_in_the_new_pool() -> None:
    transition = step(job(), judged(("h200", 4)), NOW)
    assert (transition.status["pool"], transition.status["priority"], transition.status["attempt"]) == ("h200", 4, 2)
    assert transition.status["observedGeneration"] == 2


def test_overlay_trusts_a_decision_until_the_index_shows_it() -> None:
    indexed = job(Phase.QUEUED, nodes=())
    admitted = dataclasses.replace(indexed, phase=Phase.ADMITTED, nodes=("n2", "n3"))
    views, kept = overlay_assumed([indexed], {indexed.key: Assumed(admitted, NOW)}, NOW + 1)
    assert views == [admitted] and indexed.key in kept
    views, kept = overlay_assumed([admitted], kept, NOW + 2)
    assert views == [admitted] and kept == {}
    views, kept = overlay_assumed([indexed], {indexed.key: Assumed(admitted, NOW)}, NOW + 61)
    assert views == [indexed] and kept == {}, "the index wins after the TTL"
    assert overlay_assumed([], {indexed.key: Assumed(admitted, NOW)}, NOW + 1) == ([], {}), "deleted"


def test_transition_default_is_nothing() -> None:
    assert Transition().empty and not step(job(Phase.SUCCEEDED), seen(), NOW).status


def test_a_plan_whose_inputs_did_not_change_is_skipped() -> None:
    from gpucluster.planning.lifecycle import ClusterFacts, admission_cycle

    facts = ClusterFacts(nodes=NODES, pods={"ns/job": [pod(0), pod(1)]},
                         products={"h100": "H100"}, desired_nodes={"h100": 4})
    waiting = job(Phase.QUEUED, key="ns/big", name="big", workers=3, nodes=(), queue_position=1)
    jobs = [job(), waiting]
    first = admission_cycle(jobs, facts, NOW)
    assert first.plan is not None and first.inputs is not None and first.transitions == ()
    again = admission_cycle(jobs, facts, NOW + 1, unchanged_since=first.inputs)
    assert again.plan is None and again.inputs == first.inputs
    freed = ClusterFacts(nodes=facts.nodes, pods={"ns/job": [pod(0, "Succeeded"), pod(1, "Succeeded")]},
                         products=facts.products, desired_nodes=facts.desired_nodes)
    after = admission_cycle(jobs, freed, NOW + 2, unchanged_since=first.inputs)
    assert after.plan is not None and "ns/big" in after.plan.admissions, "the gang ended: plan again"


def test_a_failed_job_queued_again_starts_a_new_attempt() -> None:
    """Its old pods may still terminate: the new ones must not share their attempt (nor their names)."""
    again = step(job(Phase.FAILED, reason="UnknownPriorityClass"), judged(("h100", 0)), NOW)
    assert again.status["attempt"] == 2 and again.assume is not None and again.assume.attempt == 2
    assert step(job(None, pool="", nodes=(), attempt=0), judged(("h100", 0)), NOW).status["attempt"] == 0


def test_a_head_waiting_on_limited_gangs_shows_its_start_bound_and_lets_short_jobs_backfill() -> None:
    """The running gang's activeDeadlineSeconds ends it by 4500 s: the head
    (4 nodes) starts by then, and a 2-node job limited to 600 s fits before
    it on the head's reserved nodes; the job's bound goes once it is admitted."""
    from gpucluster.planning.lifecycle import ClusterFacts, admission_cycle

    facts = ClusterFacts(nodes=NODES, pods={"ns/job": [pod(0), pod(1)]},
                         products={"h100": "H100"}, desired_nodes={"h100": 4})
    running = job(deadline_seconds=3600)
    head = job(Phase.QUEUED, key="ns/big", name="big", workers=4, nodes=(), first_admitted_at=None, arrival=1.0)
    short = job(Phase.QUEUED, key="ns/short", name="short", workers=2, nodes=(), first_admitted_at=None,
                arrival=2.0, deadline_seconds=600)
    cycle = admission_cycle([running, head, short], facts, NOW)
    assert cycle.plan is not None and cycle.plan.admissions == {"ns/short": ("n2", "n3")}
    status = {view.key: transition.status for view, transition in cycle.transitions}
    assert status["ns/big"] == {"queuePosition": 1, "startsBy": "1970-01-01T01:15:00Z"}
    assert status["ns/short"]["phase"] == "Admitted" and status["ns/short"]["startsBy"] is None
    without_limit = dataclasses.replace(short, deadline_seconds=None)
    cycle = admission_cycle([running, head, without_limit], facts, NOW)
    assert cycle.plan is not None and cycle.plan.admissions == {}, "no limit: not on the reserved nodes"


def test_a_planner_given_to_the_cycle_stands_in_for_plan_admissions() -> None:
    """It gets the cycle's snapshot (the nodes, the running gang, the waiting
    job as a PendingJob) and its plan is applied as the planner's would be."""
    from gpucluster.planning.lifecycle import ClusterFacts, admission_cycle
    from gpucluster.planning.scheduling import AdmissionPlan, NodeSnapshot, PendingJob, RunningGang

    facts = ClusterFacts(nodes=NODES, pods={"ns/job": [pod(0), pod(1)]},
                         products={"h100": "H100"}, desired_nodes={"h100": 4})
    small = job(Phase.QUEUED, key="ns/small", name="small", workers=2, nodes=(), first_admitted_at=None)
    seen: list[tuple[list[str], list[str], list[str], float]] = []

    def last_nodes_first(nodes: list[NodeSnapshot], running: list[RunningGang], pending: list[PendingJob],
                         now: float) -> AdmissionPlan:
        seen.append(([n.name for n in nodes], [g.key for g in running], [j.key for j in pending], now))
        return AdmissionPlan(admissions={"ns/small": ("n3", "n2")}, preemptions=(), unschedulable={},
                             queue_positions={}, reservations={}, starts_by={})

    cycle = admission_cycle([job(), small], facts, NOW, planner=last_nodes_first)
    assert seen == [(["n0", "n1", "n2", "n3"], ["ns/job"], ["ns/small"], NOW)]
    (view, transition), = cycle.transitions
    assert view.key == "ns/small" and transition.create_pods == ("n3", "n2")
    assert admission_cycle([job(), small], facts, NOW).plan.admissions == {  # type: ignore[union-attr]
        "ns/small": ("n2", "n3")}, "without it, the operator's planner"
