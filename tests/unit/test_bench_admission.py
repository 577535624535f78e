"""bench/admission.py's utilisation part: its first-fit baselines, and the
whole part in --quick mode through `gpucluster simulate`'s engine."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from gpucluster.planning.scheduling import NodeSnapshot, PendingJob, RunningGang, TopologyRequest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import admission  # noqa: E402

# Two blocks of two racks of one 8-GPU node; n0 is half full.
NODES = [NodeSnapshot(f"n{i}", "h100", "H100", 8, block=f"b{i // 2}", rack=f"r{i % 2}") for i in range(4)]
RUNNING = [RunningGang("running", 0, "h100", {"n0": 4}, admitted_at=0.0)]
QUEUE = [
    PendingJob("big", 0, 1.0, 4, 8, "h100"),  # never fits beside `running`
    PendingJob("pair", 0, 2.0, 2, 4, "h100"),
    PendingJob("block", 0, 3.0, 2, 8, "h100", TopologyRequest("block", "required")),
]


@pytest.mark.parametrize(("policy", "admitted"), [
    (admission.first_fit_policy(skip_blocked=False), {}),
    (admission.first_fit_policy(skip_blocked=True), {"pair": ("n0", "n1"), "block": ("n2", "n3")}),
    (admission.first_fit_policy(skip_blocked=True, keep_levels=True),
     {"pair": ("n0", "n1"), "block": ("n2", "n3")}),
])
def test_first_fit_baselines(policy: admission.Planner, admitted: dict[str, tuple[str, ...]]) -> None:
    assert dict(policy(NODES, RUNNING, QUEUE, 0.0).admissions) == admitted


def test_first_fit_ignores_required_levels_unless_held_to_them() -> None:
    """n0 and n2 have room for one worker each: skipping first-fit puts a
    pair that requires one block on both; held to levels, it waits."""
    pair = PendingJob("pair", 0, 1.0, 2, 4, "h100", TopologyRequest("block", "required"))
    half = [RunningGang("running", 0, "h100", {"n0": 4, "n1": 8, "n2": 4, "n3": 8}, admitted_at=0.0)]
    assert dict(admission.first_fit_policy(True)(NODES, half, [pair], 0.0).admissions) == {"pair": ("n0", "n2")}
    assert dict(admission.first_fit_policy(True, keep_levels=True)(NODES, half, [pair], 0.0).admissions) == {}


def test_quick_utilisation_part_prints_its_tables(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["admission.py", "--quick", "--skip-latency"])
    admission.main()
    out = capsys.readouterr().out
    rows = re.findall(r"^    (.{21}) utilisation +(\d+\.\d\d)%   started +\d+   median wait +[\d.]+ h   "
                      r">=128-GPU jobs: median wait +(?:[\d.]+ h|-), +\d+ never started   64x8 jobs: "
                      r"longest wait +>?[\d.]+ h   required level broken (\d+)   free while jobs waited: "
                      r"held for heads (\d+\.\d\d)%, whole nodes (\d+\.\d\d)%, parts of nodes (\d+\.\d\d)%$",
                      out, re.MULTILINE)
    names = ["planner", "planner (no limits)", "planner (no required)", "first-fit (blocking)",
             "first-fit (skipping)", "first-fit (skip, lvl)"]
    assert [row[0].strip() for row in rows] == names * 2, out
    keeping_levels = {"planner", "planner (no limits)", "planner (no required)", "first-fit (skip, lvl)"}
    assert all(row[2] == "0" for row in rows if row[0].strip() in keeping_levels)
    # Only the planner holds GPUs for a head; what is free while jobs wait
    # is part of what no gang held.
    assert all(float(row[3]) == 0 for row in rows if row[0].strip().startswith("first-fit"))
    assert all(float(row[3]) + float(row[4]) + float(row[5]) < 100 - float(row[1]) for row in rows)
    assert out.count("utilisation ratio planner / first-fit (blocking)") == 2


def test_means_pair_each_trace_with_the_planner(capsys: pytest.CaptureFixture[str]) -> None:
    """Three traces: the planner 0.2 points ahead of the baseline in two and
    0.1 behind in one; the ratio is of the means, the difference paired."""
    runs = [{"planner": 0.902, "baseline": 0.900}, {"planner": 0.951, "baseline": 0.949},
            {"planner": 0.800, "baseline": 0.801}]
    admission.print_means(0.9, runs)
    out = capsys.readouterr().out
    assert "planner / baseline 1.0011x" in out, out
    # mean +0.1; differences 0.2, 0.2, -0.1: stdev 0.1732, over sqrt(3)
    assert "planner - baseline: +0.100 points per trace (standard error 0.100), ahead in 2 of 3" in out, out
