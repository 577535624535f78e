"""Observability end to end: a real Prometheus scrapes the session's operator
and the node agent's fleet (playing this module's KWOK GPU nodes), with the
project's alert rules loaded. The figures Prometheus returns must be the ones
the cluster really has, injected XIDs must fire their alerts, every rule must
evaluate without error, and every query of the Grafana dashboard must run
and, where its metrics are exported, return data."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from .harness import REPO_ROOT, Kubectl, OperatorProcess, finish_pod, wait_for
from .prometheus import (  # noqa: F401  (fixtures, found by pytest under their names)
    RULES,
    PrometheusServer,
    agent_metrics_fixture,
    prometheus_fixture,
)

pytestmark = pytest.mark.integration

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "gpucluster-dashboard.json"
CLUSTER = f"obs-{uuid.uuid4().hex[:5]}"
# Two pools, so per-pool figures cannot be right by accident.
# Remediation may take no node out of service (maxUnavailable: 0): the nodes
# this module gives XIDs stay, and the pool's budget is spent at once.
POOLS = {"h100": {"gpu": "H100-80GB-HBM3", "nodes": 4, "gpusPerNode": 8, "remediation": {"maxUnavailable": 0}},
         "h200": {"gpu": "H200-141GB", "nodes": 2, "gpusPerNode": 4, "remediation": {"maxUnavailable": 0}}}
# What the fake GPUs report, from the real boards' captures.
MODEL_NAMES = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}
FB_TOTAL_MIB = {"NVIDIA H100 80GB HBM3": 81559, "NVIDIA H200": 143771}
INJECT_FAULT = "gpucluster.dev/inject-fault"
FATAL_NODE, FATAL_GPU, FATAL_XID = f"{CLUSTER}-h100-00001", "3", 79
MEMORY_NODE, MEMORY_GPU, MEMORY_XID = f"{CLUSTER}-h200-00000", "1", 94
# Grafana's variables as a person viewing this module's cluster would set them.
DASHBOARD_VARIABLES = {"$cluster": CLUSTER, "$pool": ".*", "$node": f"{CLUSTER}-.*",
                       "$__rate_interval": "5m"}


@pytest.fixture(scope="module")
def fleet_node_selector() -> str:
    return f"gpucluster.dev/cluster={CLUSTER}"


def nodes_of(kubectl: Kubectl) -> list[dict[str, Any]]:
    return list(kubectl.get("nodes", "-l", f"gpucluster.dev/cluster={CLUSTER}")["items"])


def condition_status(node: dict[str, Any], kind: str) -> str | None:
    return next((c["status"] for c in node["status"].get("conditions", []) if c["type"] == kind), None)


def figures_from_nodes(kubectl: Kubectl) -> dict[str, dict[str, float]]:
    """Per pool, what the Node objects say: Ready nodes, healthy nodes (Ready
    and not GPUHealthy=False), and the GPUs of the Ready nodes."""
    figures: dict[str, dict[str, float]] = {p: {"ready": 0, "healthy": 0, "ready_gpus": 0} for p in POOLS}
    for node in nodes_of(kubectl):
        pool = node["metadata"]["labels"]["gpucluster.dev/pool"]
        if condition_status(node, "Ready") != "True":
            continue
        figures[pool]["ready"] += 1
        figures[pool]["ready_gpus"] += int(node["status"]["allocatable"]["nvidia.com/gpu"])
        if condition_status(node, "GPUHealthy") != "False":
            figures[pool]["healthy"] += 1
    return figures


@pytest.fixture(scope="module")
def gpu_cluster(kubectl: Kubectl, operator: OperatorProcess) -> Iterator[str]:
    if operator.proc is None or operator.proc.poll() is not None:
        operator.start()
    kubectl.apply({"apiVersion": "gpucluster.dev/v1alpha1", "kind": "TrainingCluster",
                   "metadata": {"name": CLUSTER},
                   "spec": {"pools": [{"name": name, **shape,
                                       "topology": {"nodesPerRack": 2, "racksPerBlock": 2}}
                                      for name, shape in POOLS.items()]}})
    total = sum(int(p["nodes"]) for p in POOLS.values())

    def ready() -> bool:
        tc = kubectl.get("tc", CLUSTER)
        return (tc.get("status") or {}).get("nodes") == f"{total}/{total}"
    wait_for(ready, timeout=90, what=f"{CLUSTER} with {total} Ready nodes")
    yield CLUSTER
    kubectl.run("delete", "tj", "-n", "default", "-l", f"obs-test={CLUSTER}", "--timeout=60s", check=False)
    kubectl.run("delete", "tc", CLUSTER, "--timeout=50s", check=False)


def test_pool_figures_match_the_cluster(prometheus: PrometheusServer, gpu_cluster: str,
                                        kubectl: Kubectl) -> None:
    # Every figure is read back through PromQL, as a dashboard would, and
    # compared with what the Node objects say and with the spec.
    expected_gpus = {p: float(s["nodes"] * s["gpusPerNode"]) for p, s in POOLS.items()}
    expected_nodes = {p: float(s["nodes"]) for p, s in POOLS.items()}
    ready_gpus = f'max by (pool) (gpucluster_pool_gpus{{cluster="{CLUSTER}", state="ready"}})'
    wait_for(lambda: prometheus.values_by(ready_gpus, "pool") == expected_gpus, timeout=30,
             what=f"ready GPUs per pool == {expected_gpus}")
    from_nodes = figures_from_nodes(kubectl)
    assert {p: f["ready_gpus"] for p, f in from_nodes.items()} == expected_gpus
    for state in ("desired", "ready", "healthy"):
        query = f'max by (pool) (gpucluster_pool_nodes{{cluster="{CLUSTER}", state="{state}"}})'
        assert prometheus.values_by(query, "pool") == expected_nodes, state
    assert prometheus.values_by(
        f'sum(max by (pool) (gpucluster_pool_gpus{{cluster="{CLUSTER}", state="desired"}}))', "") == {
        "": sum(expected_gpus.values())}


def test_every_gpu_reports_dcgm_metrics(prometheus: PrometheusServer, gpu_cluster: str) -> None:
    ours = f'Hostname=~"{CLUSTER}-.*"'
    expected = {MODEL_NAMES[p]: float(s["nodes"] * s["gpusPerNode"]) for p, s in POOLS.items()}
    wait_for(lambda: prometheus.values_by(f"count by (modelName) (DCGM_FI_DEV_GPU_TEMP{{{ours}}})",
                                          "modelName") == expected,
             timeout=30, what=f"one temperature per GPU: {expected}")
    assert prometheus.values_by(f"max by (modelName) (DCGM_FI_DEV_FB_TOTAL{{{ours}}})",
                                "modelName") == {m: float(v) for m, v in FB_TOTAL_MIB.items()}
    assert prometheus.values_by(f"count by (modelName) (count by (modelName, UUID) "
                                f"(DCGM_FI_DEV_POWER_USAGE{{{ours}}}))", "modelName") == expected
    # Two exporters, one truth: the GPUs the agents find healthy are the ones
    # the operator counts healthy in its pools.
    agents = f"sum(gpucluster_gpu_healthy{{{ours}}})"
    operator = f'sum(max by (pool) (gpucluster_pool_gpus{{cluster="{CLUSTER}", state="healthy"}}))'
    total = float(sum(expected.values()))
    wait_for(lambda: prometheus.values_by(agents, "") == {"": total}, timeout=30,
             what="every GPU healthy per the agents")
    assert prometheus.values_by(operator, "") == {"": total}


def firing(prometheus: PrometheusServer, alertname: str, **labels: str) -> list[dict[str, Any]]:
    return [a for a in prometheus.alerts() if a["labels"].get("alertname") == alertname
            and all(a["labels"].get(k) == v for k, v in labels.items()) and a["state"] == "firing"]


@pytest.fixture(scope="module")
def injected_xids(gpu_cluster: str, kubectl: Kubectl) -> Iterator[None]:
    kubectl.run("annotate", "node", FATAL_NODE, "--overwrite",
                f"{INJECT_FAULT}=gpu={FATAL_GPU},xid={FATAL_XID}")
    kubectl.run("annotate", "node", MEMORY_NODE, "--overwrite",
                f"{INJECT_FAULT}=gpu={MEMORY_GPU},xid={MEMORY_XID}")
    yield
    for node in (FATAL_NODE, MEMORY_NODE):
        kubectl.run("annotate", "node", node, "--overwrite", f"{INJECT_FAULT}=gpu=all,fault=reset",
                    check=False)


def test_injected_xids_fire_their_alerts(prometheus: PrometheusServer, injected_xids: None,
                                         kubectl: Kubectl) -> None:
    fatal = wait_for(lambda: firing(prometheus, "GPUFatalXID", Hostname=FATAL_NODE), timeout=30,
                     what=f"GPUFatalXID on {FATAL_NODE}")
    assert [(a["labels"]["gpu"], float(a["value"]), a["labels"]["severity"]) for a in fatal] == [
        (FATAL_GPU, FATAL_XID, "critical")]
    assert a_gpu_uuid(fatal[0]["labels"]["UUID"])
    assert f"XID {FATAL_XID}" in fatal[0]["annotations"]["summary"]

    memory = wait_for(lambda: firing(prometheus, "GPUMemoryXID", Hostname=MEMORY_NODE), timeout=30,
                      what=f"GPUMemoryXID on {MEMORY_NODE}")
    assert [(a["labels"]["gpu"], float(a["value"]), a["labels"]["severity"]) for a in memory] == [
        (MEMORY_GPU, MEMORY_XID, "warning")]
    # Each XID alerts once, under its own class.
    assert not firing(prometheus, "GPUFatalXID", Hostname=MEMORY_NODE)
    assert not firing(prometheus, "GPUMemoryXID", Hostname=FATAL_NODE)

    # The operator sees the GPUHealthy verdicts the agents wrote: its healthy
    # figure drops to what the nodes show, and the pool alerts start their
    # waits (pending, not yet firing): unhealthy nodes, and a remediation
    # budget of no node at all.
    query = f'max by (pool) (gpucluster_pool_nodes{{cluster="{CLUSTER}", state="healthy"}})'

    def healthy_matches_nodes() -> bool:
        from_nodes = {p: f["healthy"] for p, f in figures_from_nodes(kubectl).items()}
        return prometheus.values_by(query, "pool") == from_nodes and from_nodes["h100"] < POOLS["h100"]["nodes"]
    wait_for(healthy_matches_nodes, timeout=30, what="the healthy-node figure to follow the verdicts")
    for alertname in ("GpuclusterPoolNodesUnhealthy", "GpuclusterRemediationBudgetExhausted"):
        pending = wait_for(lambda a=alertname: [x for x in prometheus.alerts()
                                                if x["labels"].get("alertname") == a
                                                and x["labels"].get("cluster") == CLUSTER],
                           timeout=30, what=f"{alertname} pending")
        assert {(a["labels"]["pool"], a["state"]) for a in pending} >= {("h100", "pending")}, alertname


def a_gpu_uuid(value: str) -> bool:
    return bool(re.fullmatch(r"GPU-[0-9a-f-]{36}", value))


def test_every_alert_rule_evaluates_without_error(prometheus: PrometheusServer, gpu_cluster: str) -> None:
    declared = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}

    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in prometheus.rule_groups() for r in g["rules"]]
        done = rules and all(r.get("lastEvaluation", "").startswith("2") and
                             not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules if done else None
    rules = wait_for(evaluated, timeout=30, what="every rule evaluated once")
    assert {r["name"] for r in rules} == declared
    # A rule that errors at run time (many-to-many matching, say) passes
    # promtool and fails only here, against real series.
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


# --- the dashboard ---------------------------------------------------------------------------------


def job_manifest(name: str, workers: int, priority: int) -> dict[str, Any]:
    return {"apiVersion": "gpucluster.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": "default", "labels": {"obs-test": CLUSTER}},
            "spec": {"cluster": CLUSTER, "pool": "h100", "workers": workers, "gpusPerWorker": 8,
                     "priority": priority,
                     "template": {"spec": {"containers": [{"name": "trainer", "image": "pytorch",
                                                           "command": ["torchrun", "train.py"]}]}}}}


def job_phase(kubectl: Kubectl, name: str) -> str:
    return str((kubectl.get("tj", "-n", "default", name).get("status") or {}).get("phase", ""))


def wait_phase(kubectl: Kubectl, name: str, phase: str, timeout: float = 45) -> None:
    try:
        wait_for(lambda: job_phase(kubectl, name) == phase, timeout=timeout, what=f"{name} {phase}")
    except AssertionError as err:
        status = kubectl.get("tj", "-n", "default", name).get("status")
        raise AssertionError(f"{err}\nstatus: {status}") from None


@pytest.fixture(scope="module")
def job_activity(gpu_cluster: str, injected_xids: None, kubectl: Kubectl) -> None:
    """Gives the queue panels something to show: a job that is admitted,
    loses a worker (a gang restart) and is then preempted by a job of higher
    priority, which leaves it queued."""
    low, high = f"{CLUSTER}-low", f"{CLUSTER}-high"
    kubectl.apply(job_manifest(low, workers=2, priority=0))
    wait_phase(kubectl, low, "Running")
    rank0 = kubectl.get("pods", "-n", "default", "-l", f"gpucluster.dev/job={low},gpucluster.dev/rank=0")
    finish_pod(kubectl, "default", rank0["items"][0]["metadata"]["name"], exit_code=1)
    wait_for(lambda: (kubectl.get("tj", "-n", "default", low).get("status") or {}).get("restarts") == 1,
             timeout=45, what=f"{low} restarted as a gang")
    wait_phase(kubectl, low, "Running")
    # Of the four H100 nodes one has a fatal XID and `low` holds two (not the
    # one its failed worker ran on): two more workers fit only by preempting it.
    kubectl.apply(job_manifest(high, workers=2, priority=100))
    wait_phase(kubectl, high, "Running")
    assert job_phase(kubectl, low) in ("Queued", "Restarting")


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of every panel, rows included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in walk(dashboard["panels"])
            for target in panel.get("targets", [])]


def with_variables(expr: str) -> str:
    for name, value in sorted(DASHBOARD_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a dashboard variable the test does not set: {expr}"
    return expr


def metrics_in(expr: str) -> set[str]:
    return {name for name in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)
            if name.startswith(("gpucluster_", "DCGM_FI_")) or name == "up"}


# Metrics this module makes the operator and the agents export; a panel on
# them must show data. (Remediation's metrics, and reconcile errors, appear
# only once remediation runs or a reconcile fails: their panels must parse.)
EXPECTED_PRESENT = {
    "up", "gpucluster_pool_nodes", "gpucluster_pool_gpus", "gpucluster_queue_depth",
    "gpucluster_queue_oldest_wait_seconds", "gpucluster_jobs", "gpucluster_admission_wait_seconds_bucket",
    "gpucluster_admission_decision_seconds_bucket", "gpucluster_admission_job_decision_seconds_bucket",
    "gpucluster_gang_restarts_total",
    "gpucluster_preemptions_total", "gpucluster_reconcile_duration_seconds_bucket",
    "gpucluster_nodes_created_total", "gpucluster_gpu_healthy", "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_XID_ERRORS",
}


def test_every_dashboard_query_runs_and_shows_data(prometheus: PrometheusServer, job_activity: None) -> None:
    targets = dashboard_targets()
    assert targets
    # Counters and histograms need two scrapes after the last event to rate.
    time.sleep(3)
    present = prometheus.metric_names()
    missing = EXPECTED_PRESENT - present
    assert not missing, f"metrics the test produces but Prometheus does not have: {missing}"
    referenced = set().union(*(metrics_in(expr) for _, expr in targets))
    assert referenced >= EXPECTED_PRESENT, f"panels missing for {EXPECTED_PRESENT - referenced}"

    # Metrics with series of this test's cluster (or of no cluster): another
    # module's cluster, on the same operator, may have made the rest.
    present_here = {name for name in present
                    if prometheus.query(f'count({{__name__="{name}", cluster=~"{CLUSTER}|"}})')}
    empty, unexported = [], []
    for title, expr in targets:
        query = with_variables(expr)
        result = prometheus.query(query)  # raises with Prometheus's message on a bad query
        if not metrics_in(expr) <= present_here:
            unexported.append(f"{title}: {sorted(metrics_in(expr) - present_here)}")
        elif not result:
            empty.append(f"{title}: {query}")
    assert empty == [], "panels whose metrics exist but show nothing"
    print("panels on metrics not exported in this test (parsed only):", *unexported, sep="\n  ")
