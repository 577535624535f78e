"""A benchmark stopped with SIGTERM (a CI timeout, `kill`) stops everything it
started: the control plane's processes and the operator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .harness import REPO_ROOT, wait_for

pytestmark = pytest.mark.integration

STATE_DIR = REPO_ROOT / ".local-cluster" / "bench"


def children_of(pid: int) -> set[int]:
    """Every live descendant of `pid`."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    """Exists and is not a zombie (an exited child its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_the_control_plane_and_the_operator_a_benchmark_started() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GPUCLUSTER_KUBECONFIG"}
    bench = subprocess.Popen([sys.executable, str(REPO_ROOT / "bench" / "provision.py"), "--nodes", "1"],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []

    def read() -> None:
        for line in bench.stdout or []:
            output.append(line)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # The table's header is printed once the cluster is up and the operator runs.
        wait_for(lambda: any("raw nodes/s" in line for line in output), timeout=180,
                 what="the benchmark to start; output so far: " + "".join(output[-20:]))
        control_plane = set(json.loads((STATE_DIR / "state.json").read_text())["pids"].values())
        started = children_of(bench.pid)
        assert control_plane <= started and len(started - control_plane) >= 1, "no operator process"

        bench.send_signal(signal.SIGTERM)
        bench.wait(120)
    finally:
        if bench.poll() is None:
            bench.kill()
    reader.join(5)
    left = sorted(pid for pid in started if running(pid))
    assert left == [], f"still running after SIGTERM: {left}; output: {''.join(output[-20:])}"
    assert json.loads((STATE_DIR / "state.json").read_text())["pids"] == {}
