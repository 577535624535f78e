"""bench/colossus.py's pure parts: the simulator's settings for a run's size
and the summary of a py-spy profile."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import kubernetes
import pytest
import urllib3

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import colossus  # noqa: E402
import common  # noqa: E402


def settings(*argv: str, nodes: int) -> tuple[int, int]:
    parser = argparse.ArgumentParser()
    common.add_simulator_arguments(parser)
    return common.simulator_settings(parser.parse_args(list(argv)), nodes)


@pytest.mark.parametrize(("nodes", "expected"), [
    (1000, (40, 1)), (2000, (40, 1)), (2001, (0, 1)), (5001, (0, 2)), (25000, (0, 5)), (100000, (0, 8)),
])
def test_kwok_defaults_follow_the_run_size(nodes: int, expected: tuple[int, int]) -> None:
    assert settings(nodes=nodes) == expected


def test_given_kwok_settings_win_over_the_defaults() -> None:
    assert settings("--lease-seconds", "0", "--kwok-shards", "3", nodes=1000) == (0, 3)
    assert settings("--lease-seconds", "40", nodes=25000) == (40, 5)


def test_profile_summary_counts_own_time_and_time_under_each_package(tmp_path: Path) -> None:
    raw = tmp_path / "profile.raw"
    raw.write_text(
        "main (gpucluster/cli.py:10);process (kopf/_core/reactor/processing.py:5);"
        "loads (json/__init__.py:346) 30\n"
        "main (gpucluster/cli.py:10);cycle (gpucluster/planning/lifecycle.py:20) 50\n"
        "main (gpucluster/cli.py:10);cycle (gpucluster/planning/lifecycle.py:21) 10\n"
        "main (gpucluster/cli.py:10);EpollSelector.select (selectors.py:468) 10\n")
    lines = colossus.profile_summary(raw, "phase 1")
    assert "100 samples" in lines[0] and "phase 1" in lines[0]
    assert "   60.0 %  under planning (decisions)" in lines
    assert "   30.0 %  under Kopf's machinery" in lines
    assert "   30.0 %  under JSON" in lines
    # Lines of one function are one function.
    assert "   60.0 %  own   cycle (gpucluster/planning/lifecycle.py)" in lines
    assert "   10.0 %  own   EpollSelector.select (selectors.py)" in lines


def test_an_empty_profile_says_so(tmp_path: Path) -> None:
    raw = tmp_path / "profile.raw"
    raw.write_text("")
    assert colossus.profile_summary(raw, "phase 1") == [f"py-spy: no samples in {raw}"]


def cycle_histogram(counts: dict[str, float]) -> dict[str, float]:
    return {f'gpucluster_admission_decision_seconds_bucket{{cluster="c",le="{le}"}}': n
            for le, n in counts.items()}


def test_a_quantile_inside_the_buckets_is_interpolated() -> None:
    buckets = cycle_histogram({"0.5": 50, "1.0": 100, "+Inf": 100})
    assert colossus.quantile_ms(buckets, 0.5) == "500"
    assert colossus.quantile_ms(buckets, 0.75) == "750"


def test_a_quantile_above_the_last_bound_is_shown_as_a_bound_not_inf() -> None:
    buckets = cycle_histogram({"0.5": 50, "1.0": 90, "+Inf": 100})
    assert colossus.quantile_ms(buckets, 0.99) == "> 1000"


def test_a_watch_ends_once_nothing_listens_on_the_servers_port() -> None:
    """The end of a run: the control plane stopped, so the watch thread ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))
    thread = common.watch_raw(core.list_node, "", lambda kind, obj: False)
    thread.join(timeout=60)
    assert not thread.is_alive()


def test_a_dropped_connection_is_not_taken_for_a_server_gone() -> None:
    """A busy server that drops a connection may answer the next one."""
    dropped = urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError())
    assert not common._server_gone(dropped)
    assert not common._server_gone(urllib3.exceptions.MaxRetryError(None, "/api/v1/nodes", dropped))  # type: ignore[arg-type]


def test_admissions_settle_after_quiet_and_two_cycles_that_admitted_nothing() -> None:
    cycles = [10.0]
    quiet = colossus.QuietAdmissions(lambda: cycles[0])
    assert not quiet.settled([], 1000.0)
    assert not quiet.settled([100.0], 101.0)
    assert not quiet.settled([100.0], 500.0), "quiet for minutes, but no cycle has decided since"
    cycles[0] = 11.0
    assert not quiet.settled([100.0], 501.0)
    cycles[0] = 12.0
    assert quiet.settled([100.0], 502.0)
    assert not quiet.settled([100.0, 503.0], 600.0), "a new admission starts the count again"
