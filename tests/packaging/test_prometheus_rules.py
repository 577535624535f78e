"""deploy/prometheus/rules.yaml: promtool checks and runs its unit tests, and
the rules keep the shape people and Alertmanager routes rely on."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from gpucluster.planning.health import XID_CATALOGUE, XidClass

from .tools import REPO_ROOT, metric_names_in, operator_metric_names, promtool, run

RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yaml"
RULES_TEST = REPO_ROOT / "deploy" / "prometheus" / "rules_test.yaml"


def alerts() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    result = run(promtool(), "check", "rules", str(RULES))
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    # promtool resolves rule_files relative to the test file.
    result = run(promtool(), "test", "rules", str(RULES_TEST))
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_every_alert_says_how_bad_what_and_what_to_do(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in {"critical", "warning"}
    for key in ("summary", "description", "runbook"):
        assert alert["annotations"].get(key, "").strip(), f"{alert['alert']} has no {key}"


def test_every_alert_has_cases_that_fire_and_cases_that_do_not() -> None:
    cases: dict[str, set[bool]] = {}
    for group in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    assert {a["alert"]: {True, False} for a in alerts()} == cases


def test_rules_use_only_metrics_that_exist() -> None:
    known = operator_metric_names()
    unknown = {a["alert"]: metric_names_in(a["expr"]) - known for a in alerts()}
    assert {name: names for name, names in unknown.items() if names} == {}


def xids_of(alertname: str) -> set[int]:
    expr = next(a["expr"] for a in alerts() if a["alert"] == alertname)
    return {int(x) for x in re.findall(r"DCGM_FI_DEV_XID_ERRORS\s*==\s*(\d+)", expr)}


def test_xid_alerts_follow_the_health_verdicts() -> None:
    # The alert's XID sets and remediation's (planning/health.py) are both
    # NVIDIA's catalogue: a fatal XID pages, a memory XID the GPU contained warns.
    assert xids_of("GPUFatalXID") == {48, 64, 74, 79, 95}
    assert xids_of("GPUMemoryXID") == {63, 92, 94}
    assert all(XID_CATALOGUE[x].kind is XidClass.FATAL for x in xids_of("GPUFatalXID"))
    assert all(XID_CATALOGUE[x].kind is XidClass.TRANSIENT for x in xids_of("GPUMemoryXID"))
