"""bench/compare.py's smoke run: a handful of jobs on 16 KWOK nodes through
every system (gpucluster, Kueue, kube-scheduler alone), each on a fresh
control plane. Needs the Kueue build cached (hack/build-kueue.sh, part of
`make binaries`), root and unshare (Kueue runs in a mount namespace)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import REPO_ROOT

pytestmark = pytest.mark.integration

sys.path.insert(0, str(REPO_ROOT / "bench"))
import kueue  # noqa: E402


def _missing() -> str:
    if not kueue.build(compile_if_missing=False).cached:
        return "Kueue is not built (hack/build-kueue.sh; `make binaries` runs it)"
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "Kueue runs in a mount namespace of its own: needs root and unshare"
    return ""


@pytest.mark.timeout(1200)
def test_every_system_runs_the_same_stream(tmp_path: Path) -> None:
    if missing := _missing():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}, and CI=true: `make test` builds Kueue before the tests")
        pytest.skip(missing)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "compare.py"), "--nodes", "16", "--jobs", "6",
         # Seed 5's six jobs include gangs that require one rack and one block.
         "--seed", "5", "--median-runtime", "5", "--stall-seconds", "60", "--max-minutes", "5", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1100)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {row["system"]: row for row in results["rows"]}
    assert set(rows) == {"gpucluster", "kueue", "kube-scheduler"}
    assert rows["gpucluster"]["required_topology_jobs"] == 3
    assert all(row["node_not_ready_events"] == 0 for row in rows.values()), "a node seemed to fail"
    for gang_system in ("gpucluster", "kueue"):
        row = rows[gang_system]
        assert row["completed"] == 6, row
        assert row["required_topology_violations"] == 0, row
    pinned = subprocess.run(["bash", "-c", f"source {REPO_ROOT / 'hack' / 'lib.sh'} && echo $KUEUE_VERSION"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert rows["kueue"]["versions"]["kueue"] == pinned
    assert (tmp_path / "gpus.png").stat().st_size > 0
    assert "jobs done" in result.stdout
    # The stream replays: the same jobs, read back from the file it saved.
    assert len(json.loads((tmp_path / "stream.json").read_text())["jobs"]) == 6
