"""A real Prometheus for integration tests, scraping the session's operator
and, where the test provides one, the node agent's fleet.

Prometheus comes from Debian's `prometheus` package (CI's .ci/run installs
it). Each server gets a free port on 127.0.0.1, a storage folder of its own
and a generated configuration that scrapes every second and evaluates
deploy/prometheus/rules.yaml every second, so a test sees a new figure, and an
alert go pending or fire, within a few seconds.

Use from a test module:

    from .prometheus import agent_metrics_fixture, prometheus_fixture  # noqa: F401

    @pytest.fixture(scope="module")
    def fleet_node_selector() -> str:        # which KWOK nodes the agent plays
        return "gpucluster.dev/cluster=mine"

    def test_x(prometheus: PrometheusServer) -> None:
        prometheus.query('up{job="gpucluster-operator"}')
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from .harness import REPO_ROOT, OperatorProcess, free_port, stop_process, wait_for

RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yaml"
# The job names the alert rules and the dashboard select on. The chart's
# ServiceMonitors give the same names (jobLabel: app.kubernetes.io/name).
OPERATOR_JOB = "gpucluster-operator"
AGENT_JOB = "gpucluster-agent"
SCRAPE_INTERVAL = "1s"


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusError(AssertionError):
    """Prometheus answered a query with an error (a bad expression, say)."""


class PrometheusServer:
    """One Prometheus process and a small client for its HTTP API."""

    def __init__(self, binary: str, work_dir: Path, jobs: Mapping[str, Sequence[str]],
                 rule_files: Sequence[Path] = ()) -> None:
        self.binary = binary
        self.work_dir = work_dir
        self.jobs = {name: list(targets) for name, targets in jobs.items()}
        self.rule_files = list(rule_files)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "prometheus.log"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                       "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [{"job_name": name, "static_configs": [{"targets": targets}]}
                               for name, targets in self.jobs.items()],
        }

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.port = free_port()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config}",
                 f"--storage.tsdb.path={self.work_dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, timeout=30, what=f"Prometheus ready; log: {self.log_path}")
        except AssertionError:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"Prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self) -> None:
        stop_process(self.proc)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # --- the HTTP API --------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data`, raises PrometheusError with
        Prometheus's own message when it reports an error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as err:
            # 400 and 422 carry Prometheus's explanation in a JSON body.
            body = json.load(err)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's samples: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self.api("query", query=promql)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def values_by(self, promql: str, label: str) -> dict[str, float]:
        """{label value: sample value} of an instant vector query."""
        return {sample["metric"].get(label, ""): float(sample["value"][1])
                for sample in self.query(promql)}

    def metric_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def rule_groups(self) -> list[dict[str, Any]]:
        return list(self.api("rules")["groups"])

    def wait_until_scraped(self, job: str, timeout: float = 30) -> None:
        def healthy() -> bool:
            states = [t["health"] for t in self.targets() if t["labels"].get("job") == job]
            return bool(states) and all(s == "up" for s in states)
        wait_for(healthy, timeout=timeout, what=f"Prometheus scraping job {job}")


def start_agent_fleet(kubeconfig: str, node_selector: str, metrics_port: int, log_path: Path,
                      ) -> subprocess.Popen[bytes]:
    """`gpucluster agent --fleet`: plays the node agent of every KWOK GPU node
    the selector picks (fake GPUs of each node's product label) and serves
    their dcgm-exporter metrics on one port."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gpucluster.cli", "agent", "--fleet", "--kubeconfig", kubeconfig,
             "--node-selector", node_selector, "--metrics-port", str(metrics_port),
             "--interval", "1", "--writers", "2"],
            stdout=log, stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module", name="agent_metrics")
def agent_metrics_fixture(kubeconfig: str, fleet_node_selector: str,
                          tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fleet agent for the nodes `fleet_node_selector` picks (a fixture
    the test module defines); yields its metrics address for Prometheus."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("agent-fleet") / "agent.log"
    proc = start_agent_fleet(kubeconfig, fleet_node_selector, port, log_path)
    time.sleep(0.5)
    if proc.poll() is not None:
        raise AssertionError(f"the fleet agent exited with {proc.returncode}: {log_path.read_text()}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


@pytest.fixture(scope="module", name="prometheus")
def prometheus_fixture(operator: OperatorProcess, agent_metrics: str,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Prometheus scraping the session's operator and the fleet agent every
    second, with the project's alert rules loaded; stopped at the end."""
    binary = prometheus_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed; .ci/run installs Debian's `prometheus`")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    # A test that killed the operator may have left it down; the port it
    # serves metrics on is chosen at each start, so read it afterwards.
    if operator.proc is None or operator.proc.poll() is not None:
        operator.start()
    server = PrometheusServer(
        binary, tmp_path_factory.mktemp("prometheus"),
        jobs={OPERATOR_JOB: [f"127.0.0.1:{operator.metrics_port}"], AGENT_JOB: [agent_metrics]},
        rule_files=[RULES])
    server.start()
    try:
        server.wait_until_scraped(OPERATOR_JOB)
        server.wait_until_scraped(AGENT_JOB)
        yield server
    finally:
        server.stop()
