"""gpucluster simulate: small traces with exact outcomes, through the
production lifecycle and planner."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from gpucluster.api.cluster import TrainingClusterSpec
from gpucluster.cli import main
from gpucluster.planning.scheduling import AdmissionPlan, NodeSnapshot, PendingJob, RunningGang, queue_order
from gpucluster.sim.engine import Failures, Simulation
from gpucluster.sim.trace import TraceError, TraceJob, generate, parse_line, read_trace, write_trace

CLUSTER = TrainingClusterSpec.model_validate({"pools": [
    {"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": 4, "topology": {"nodesPerRack": 2, "racksPerBlock": 2},
     "remediation": {"maxUnavailable": 1}}]})
HOUR = 3600.0


def job(name: str, arrival: float, workers: int, runtime: float = HOUR, **extra: object) -> TraceJob:
    return TraceJob(id=name, arrival=arrival, workers=workers, gpus_per_worker=8, runtime=runtime,
                    **extra)  # type: ignore[arg-type]


def by_id(report: object) -> dict[str, object]:
    return {r.trace.id: r for r in report.jobs}  # type: ignore[attr-defined]


def test_one_gang_runs_its_run_time() -> None:
    report = Simulation(CLUSTER, [job("a", 0, 2)]).run()
    a = by_id(report)["a"]
    assert (a.first_admitted, a.finished, a.phase) == (0.0, HOUR, "Succeeded")  # type: ignore[attr-defined]
    assert (report.completed, report.makespan, report.total_gpus) == (1, HOUR, 32)
    assert report.utilisation == pytest.approx(16 / 32)


def test_a_gang_that_needs_the_whole_pool_waits_for_it() -> None:
    report = Simulation(CLUSTER, [job("a", 0, 3), job("b", 60, 4)]).run()
    jobs = by_id(report)
    assert jobs["b"].first_admitted == HOUR and jobs["b"].finished == 2 * HOUR  # type: ignore[attr-defined]
    assert report.waits_by_size()[32] == [HOUR - 60]


def test_backfill_runs_small_jobs_beside_a_waiting_head() -> None:
    """a holds 3 nodes; b needs 3 and must wait for a whichever it takes, so
    it reserves a's nodes and c runs at once on the idle one."""
    report = Simulation(CLUSTER, [job("a", 0, 3, 2 * HOUR), job("b", 60, 3), job("c", 120, 1, 600)]).run()
    jobs = by_id(report)
    assert jobs["c"].first_admitted == 120  # type: ignore[attr-defined]
    assert jobs["b"].first_admitted == 2 * HOUR  # type: ignore[attr-defined]


def test_priority_preempts_a_lower_gang() -> None:
    report = Simulation(CLUSTER, [job("low", 0, 4, 10 * HOUR), job("high", 600, 2, HOUR, priority=100)]).run()
    jobs = by_id(report)
    assert report.preemptions == 1
    assert jobs["high"].first_admitted is not None and jobs["high"].first_admitted <= 720  # type: ignore[attr-defined]
    assert jobs["low"].phase == "Succeeded"  # type: ignore[attr-defined]


def test_a_blip_inside_the_grace_restarts_nothing_a_longer_one_restarts_once() -> None:
    blip = Simulation(CLUSTER, [job("a", 0, 4)], cycle_s=10)
    blip.inject_fault(600, blip.node_names[1], fatal=False, duration=20)
    assert blip.run().restarts == 0
    down = Simulation(CLUSTER, [job("a", 0, 3)], cycle_s=10, failures=Failures(checkpoint_s=300))
    down.inject_fault(1000, down.node_names[0], fatal=False, duration=600)
    report = down.run()
    assert (report.restarts, report.restarts_by_reason) == (1, {"NodeFailed": 1})
    a = by_id(report)["a"]
    assert down.node_names[0] in a.placements[0] and down.node_names[0] not in a.placements[1]  # type: ignore[attr-defined]
    # Down at 1000, restarted at the first cycle past the 60 s grace: work
    # since the checkpoint at 900 s is lost (160 s x 24 GPUs).
    assert report.gpu_hours_lost == pytest.approx(160 * 24 / HOUR)


def test_a_fatal_fault_restarts_at_once_and_the_node_comes_back_after_repair() -> None:
    sim = Simulation(CLUSTER, [job("a", 0, 2), job("b", 0, 2, 3 * HOUR)], cycle_s=10,
                     failures=Failures(repair_s=HOUR))
    sim.inject_fault(100, sim.node_names[0], fatal=True)
    report = sim.run()
    assert report.restarts == 1 and report.fatal_faults == 1
    in_service = [s.gpus_in_service for s in report.samples]
    assert min(in_service) == 24 and in_service[-1] == 32


def test_required_topology_is_kept() -> None:
    trace = [job(f"r{i}", i * 60, 2, HOUR, topology_level="rack", topology_mode="required") for i in range(4)]
    report = Simulation(CLUSTER, trace).run()
    assert report.completed == 4 and report.topology_required == report.topology_kept == 4


def test_a_job_larger_than_its_pool_is_rejected_with_the_reason() -> None:
    report = Simulation(CLUSTER, [job("huge", 0, 5)]).run()
    assert by_id(report)["huge"].rejected == "LargerThanPool"  # type: ignore[attr-defined]


def test_trace_round_trip_and_errors(tmp_path: Path) -> None:
    jobs = list(generate(50, seed=3, gpus=["H100-80GB-HBM3"]))
    write_trace(tmp_path / "t.jsonl", jobs)
    assert read_trace(tmp_path / "t.jsonl") == sorted(jobs, key=lambda j: (j.arrival, j.id))
    assert list(generate(50, seed=3, gpus=["H100-80GB-HBM3"])) == jobs, "seeded"
    for text, message in [("{", "not JSON"), ('{"workers": 1}', "'gpusPerWorker' is required"),
                          ('{"workers": 1, "gpusPerWorker": 9, "arrival": 0, "runtime": 1}', "gpusPerWorker 1 to 8"),
                          ('{"workers": "2", "gpusPerWorker": 8, "arrival": 0, "runtime": 1}', "must be int"),
                          ('{"workers": 1, "gpusPerWorker": 8, "arrival": 0, "runtime": 1, '
                           '"topology": {"level": "row"}}', "topology.level")]:
        with pytest.raises(TraceError, match=message):
            parse_line(text, 7)


def test_cli_reports_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "tc.yaml"
    manifest.write_text(json.dumps({"apiVersion": "gpucluster.dev/v1alpha1", "kind": "TrainingCluster",
                                    "metadata": {"name": "c"}, "spec": CLUSTER.model_dump(exclude_none=True)}))
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [job("a", 0, 2), job("b", 0, 2)])
    assert main(["simulate", "-f", str(manifest), "--trace", str(trace), "-o", "json", "--quiet",
                 "--png", str(tmp_path / "s.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["jobs"], result["completed"], result["makespan_hours"]) == (2, 2, 1.0)
    assert (tmp_path / "s.png").stat().st_size > 10_000
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: TrainingCluster\nspec: {pools: [{name: h100, gpu: A100, nodes: 1}]}\n")
    with pytest.raises(SystemExit, match=r"spec\.pools\.0\.gpu"):
        main(["simulate", "-f", str(bad), "--trace", str(trace), "--quiet"])


def one_job_a_cycle(nodes: list[NodeSnapshot], running: list[RunningGang], pending: list[PendingJob],
                    now: float) -> AdmissionPlan:
    """A baseline: at most the first job in queue order, one worker per node,
    on the first nodes by name with room."""
    free = {n.name: n.allocatable_gpus for n in nodes if n.schedulable}
    for gang in running:
        for name, gpus in gang.gpus_by_node.items():
            free[name] -= gpus
    admissions = {}
    for first in queue_order(pending)[:1]:
        names = [name for name in sorted(free) if free[name] >= first.gpus_per_worker][:first.workers]
        if len(names) == first.workers:
            admissions[first.key] = tuple(names)
    return AdmissionPlan(admissions=admissions, preemptions=(), unschedulable={}, queue_positions={},
                         reservations={}, starts_by={})


def test_a_baseline_planner_stands_in_for_the_planner_on_the_same_clock() -> None:
    trace = [job("a", 0, 2), job("b", 0, 1), job("c", 0, 2)]
    planner = by_id(Simulation(CLUSTER, trace).run())
    assert [planner[k].first_admitted for k in "abc"] == [0.0, 0.0, HOUR]  # type: ignore[attr-defined]
    report = Simulation(CLUSTER, trace, planner=one_job_a_cycle).run()
    baseline = by_id(report)
    assert [baseline[k].first_admitted for k in "abc"] == [0.0, 60.0, HOUR]  # type: ignore[attr-defined]
    assert [baseline[k].runs for k in "abc"] == [[(0.0, HOUR)], [(60.0, HOUR + 60)],  # type: ignore[attr-defined]
                                                 [(HOUR, 2 * HOUR)]]
    assert report.completed == 3 and report.end == 2 * HOUR


def test_limits_let_a_short_job_backfill_onto_a_waiting_heads_nodes() -> None:
    """a holds 3 nodes for 2 h at most (its limit); b needs all 4, so it
    reserves the idle one too. c, limited to 1 h, ends before b can start:
    it runs there at once. Without c's limit nothing proves that, and c
    waits for b."""
    a = job("a", 0, 3, 2 * HOUR, deadline_s=int(2 * HOUR))
    b = job("b", 60, 4)
    c = job("c", 120, 1, 1800, deadline_s=int(HOUR))
    limited = by_id(Simulation(CLUSTER, [a, b, c]).run())
    assert [limited[k].first_admitted for k in "abc"] == [0.0, 2 * HOUR, 120.0]  # type: ignore[attr-defined]
    unlimited = by_id(Simulation(CLUSTER, [a, b, dataclasses.replace(c, deadline_s=None)]).run())
    assert [unlimited[k].first_admitted for k in "bc"] == [2 * HOUR, 3 * HOUR]  # type: ignore[attr-defined]


def test_a_job_past_its_limit_fails_at_the_next_cycle() -> None:
    """Admitted at 0 with a limit of 1 h: at the cycle of 3600 s it has run
    exactly its limit, at the next it is past it."""
    report = Simulation(CLUSTER, [job("a", 0, 2, 2 * HOUR, deadline_s=int(HOUR))]).run()
    a = by_id(report)["a"]
    assert (a.phase, a.failed_reason, a.rejected, a.finished) == (  # type: ignore[attr-defined]
        "Failed", "DeadlineExceeded", "", HOUR + 60)
    assert a.runs == [(0.0, HOUR + 60)]  # type: ignore[attr-defined]


def test_a_run_stops_at_its_horizon_and_measures_a_window() -> None:
    """Cycles every 60 s until 5400 s: a ends at 5370 s, between the last
    cycle and the horizon; b still runs; c (all 4 nodes) still waits; d
    arrives after the last cycle."""
    trace = [job("a", 0, 2, 5370), job("b", 0, 1, 2 * HOUR), job("c", 100, 4), job("d", 5390, 1)]
    report = Simulation(CLUSTER, trace).run(until=5400)
    jobs = by_id(report)
    assert (report.end, report.makespan, report.started, report.completed) == (5400, 5400, 2, 0)
    assert [report.wait(jobs[k]) for k in "abcd"] == [  # type: ignore[arg-type]
        (0.0, False), (0.0, False), (5300.0, True), (10.0, True)]
    assert report.utilisation == report.utilisation_between(0, 5400) == pytest.approx(
        (16 * 5370 + 8 * 5400) / (32 * 5400))
    assert report.utilisation_between(HOUR, 5400) == pytest.approx((16 * 1770 + 8 * 1800) / (32 * 1800))
    assert report.utilisation_between(5370, 5400) == pytest.approx(8 / 32)
    assert report.samples[-1].at == 5400
    whole = by_id(Simulation(CLUSTER, trace).run())
    assert [whole[k].finished for k in "abcd"] == [5400, 2 * HOUR, 3 * HOUR, 4 * HOUR]  # type: ignore[attr-defined]


def test_limits_in_traces(tmp_path: Path) -> None:
    assert parse_line('{"workers": 1, "gpusPerWorker": 8, "arrival": 0, "runtime": 60, '
                      '"activeDeadlineSeconds": 3600}', 1).deadline_s == 3600
    for text, message in [('{"workers": 1, "gpusPerWorker": 8, "arrival": 0, "runtime": 1, '
                           '"activeDeadlineSeconds": 0}', "activeDeadlineSeconds must be >= 1"),
                          ('{"workers": 1, "gpusPerWorker": 8, "arrival": 0, "runtime": 1, '
                           '"activeDeadlineSeconds": "1h"}', "must be int")]:
        with pytest.raises(TraceError, match=message):
            parse_line(text, 7)
    plain = list(generate(200, seed=5))
    limited = list(generate(200, seed=5, limits=True))
    assert [dataclasses.replace(j, deadline_s=None) for j in limited] == plain, "the same jobs"
    assert all(j.deadline_s is not None and j.deadline_s % 3600 == 0
               and j.runtime <= j.deadline_s < 3 * j.runtime + 3600 for j in limited)
    write_trace(tmp_path / "t.jsonl", limited)
    assert read_trace(tmp_path / "t.jsonl") == sorted(limited, key=lambda j: (j.arrival, j.id))


def test_cli_stops_at_a_horizon_and_measures_from_a_warmup(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "tc.yaml"
    manifest.write_text(json.dumps({"apiVersion": "gpucluster.dev/v1alpha1", "kind": "TrainingCluster",
                                    "metadata": {"name": "c"}, "spec": CLUSTER.model_dump(exclude_none=True)}))
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [job("a", 0, 2, 2 * HOUR), job("b", 0, 4, HOUR, deadline_s=7200)])
    assert main(["simulate", "-f", str(manifest), "--trace", str(trace), "-o", "json", "--quiet",
                 "--until", "1.5", "--warmup", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["jobs"], result["started"], result["completed"], result["makespan_hours"]) == (2, 1, 0, 1.5)
    assert result["utilisation"] == 0.5
    assert main(["simulate", "-f", str(manifest), "--generate", "20", "--limits", "-o", "json", "--quiet",
                 "--save-trace", str(tmp_path / "g.jsonl")]) == 0
    assert all(j.deadline_s is not None for j in read_trace(tmp_path / "g.jsonl"))
