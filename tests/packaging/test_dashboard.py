"""deploy/grafana/gpucluster-dashboard.json: valid, complete, and on metrics
that exist. (tests/integration/test_observability.py runs every query
against a real Prometheus.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .tools import REPO_ROOT, metric_names_in, operator_metric_names

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "gpucluster-dashboard.json"


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_every_panel_queries_prometheus_through_the_datasource_variable() -> None:
    board = dashboard()
    assert board["uid"] == "gpucluster-overview"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(board["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(board["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t.get("expr") for t in panel["targets"]), panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"


def test_panels_use_only_metrics_that_exist() -> None:
    known = operator_metric_names()
    unknown = {p["title"]: sorted(metric_names_in(t["expr"]) - known)
               for p in panels(dashboard()["panels"]) for t in p.get("targets", [])}
    assert {title: names for title, names in unknown.items() if names} == {}


def test_the_dashboard_shows_what_operators_of_the_cluster_look_for() -> None:
    used = set().union(*(metric_names_in(t["expr"]) for p in panels(dashboard()["panels"])
                         for t in p.get("targets", [])))
    wanted = {
        "gpucluster_pool_nodes", "gpucluster_pool_gpus",                      # pools, GPUs by state
        "gpucluster_queue_depth", "gpucluster_queue_oldest_wait_seconds",     # the queue
        "gpucluster_admission_wait_seconds_bucket",                           # admission latency
        "gpucluster_gang_restarts_total", "gpucluster_preemptions_total",
        "gpucluster_remediations_total", "gpucluster_remediation_budget_exhausted",
        "gpucluster_reconcile_duration_seconds_bucket", "gpucluster_reconcile_errors_total",
        "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_XID_ERRORS",
    }
    assert wanted - used == set()


def test_pool_figures_are_never_summed_over_operator_replicas() -> None:
    # A replica that lost the Kopf lead keeps its last pool figures: a sum
    # over instances would count them twice. Panels take the max first.
    for panel in panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for gauge in ("gpucluster_pool_nodes", "gpucluster_pool_gpus", "gpucluster_queue_depth"):
                if gauge in expr:
                    assert "max by (cluster" in expr, f"{panel['title']}: {expr}"
