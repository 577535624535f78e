"""GPU faults end to end: the fleet agent turns an injected fault into the
GPUHealthy condition; the operator quarantines, restarts the gang elsewhere,
drains and replaces (fatal) or gives back (transient), within the budget."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from .harness import AgentProcess, Kubectl, OperatorProcess, wait_for
from .test_trainingcluster import condition, events_of, nodes_of, training_cluster, wait_ready
from .test_trainingjob import phase_is, training_job, wait_phase

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:5]}"


def pool_with_budget(nodes: int, max_unavailable: int | str) -> dict[str, Any]:
    return {"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": nodes,
            "topology": {"nodesPerRack": 2, "racksPerBlock": 2},
            "remediation": {"maxUnavailable": max_unavailable}}


def gpu_condition(node: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in node["status"].get("conditions", []) if c["type"] == "GPUHealthy"), {})


def quarantined(node: dict[str, Any]) -> bool:
    return any(t["key"] == "nvidia.com/gpu-error" for t in node["spec"].get("taints") or []) \
        and bool(node["spec"].get("unschedulable"))


def inject(kubectl: Kubectl, node: str, fault: str | None) -> None:
    kubectl.run("annotate", "node", node, "--overwrite",
                f"gpucluster.dev/inject-fault={fault}" if fault else "gpucluster.dev/inject-fault-")


def test_fatal_xid_quarantines_restarts_the_gang_and_replaces_the_node(
        kubectl: Kubectl, running_operator: OperatorProcess, fleet_agent: AgentProcess) -> None:
    name = unique("heal")
    kubectl.apply(training_cluster(name, pool_with_budget(4, 1)))
    wait_ready(kubectl, name, 4)
    wait_for(lambda: all(gpu_condition(n).get("status") == "True" for n in nodes_of(kubectl, name)),
             what="the agent's GPUHealthy=True on every node")
    job = unique("train")
    kubectl.apply(training_job(job, name, workers=2))
    running = wait_phase(kubectl, job, "Running")
    victim = running["status"]["nodes"][0]
    old_uid = kubectl.get("node", victim)["metadata"]["uid"]

    inject(kubectl, victim, "gpu=3,xid=79")
    node = wait_for(lambda: kubectl.get("node", victim) if quarantined(kubectl.get("node", victim)) else None,
                    timeout=30, what=f"{victim} quarantined")
    assert gpu_condition(node)["status"] == "False"
    assert "79" in gpu_condition(node)["message"] and "GPU 3" in gpu_condition(node)["message"]

    again = wait_for(lambda: phase_is(kubectl, job, "Running")
                     if kubectl.get("tj", "-n", "default", job)["status"].get("attempt") == 1 else None,
                     timeout=60, what="the gang restarted off the faulty node")
    assert victim not in again["status"]["nodes"]

    def replaced() -> bool:
        node = next((n for n in nodes_of(kubectl, name) if n["metadata"]["name"] == victim), None)
        return node is not None and node["metadata"]["uid"] != old_uid and not quarantined(node)
    wait_for(replaced, timeout=60, what=f"{victim} replaced by a new node")
    wait_ready(kubectl, name, 4)
    reasons = {e["reason"] for e in events_of(kubectl, name)}
    assert {"NodeQuarantined", "NodeReplaced"} <= reasons
    kubectl.run("delete", "tj", "-n", "default", job)
    kubectl.delete_cluster(name)


def test_transient_fault_recovers_without_replacement(
        kubectl: Kubectl, running_operator: OperatorProcess, fleet_agent: AgentProcess) -> None:
    name = unique("warm")
    kubectl.apply(training_cluster(name, pool_with_budget(2, 1)))
    wait_ready(kubectl, name, 2)
    node_name = nodes_of(kubectl, name)[0]["metadata"]["name"]
    uid = kubectl.get("node", node_name)["metadata"]["uid"]
    inject(kubectl, node_name, "gpu=0,fault=overtemp")
    wait_for(lambda: quarantined(kubectl.get("node", node_name)), timeout=30, what="transient quarantine")
    inject(kubectl, node_name, None)
    wait_for(lambda: not quarantined(kubectl.get("node", node_name))
             and gpu_condition(kubectl.get("node", node_name)).get("status") == "True",
             timeout=30, what="released after the fault cleared")
    assert kubectl.get("node", node_name)["metadata"]["uid"] == uid, "a transient fault never replaces"
    assert "NodeRecovered" in {e["reason"] for e in events_of(kubectl, name)}
    kubectl.delete_cluster(name)


def test_a_storm_never_takes_more_than_the_budget_out(
        kubectl: Kubectl, running_operator: OperatorProcess, fleet_agent: AgentProcess) -> None:
    name = unique("storm")
    kubectl.apply(training_cluster(name, pool_with_budget(6, 1)
                                   | {"remediation": {"maxUnavailable": 1, "replace": False}}))
    wait_ready(kubectl, name, 6)
    stricken = sorted(n["metadata"]["name"] for n in nodes_of(kubectl, name))[:3]
    for node in stricken:
        inject(kubectl, node, "gpu=1,xid=48")
    degraded = wait_for(lambda: condition(kubectl.get("tc", name), "Degraded")
                        if condition(kubectl.get("tc", name), "Degraded").get("reason")
                        == "RemediationBudgetExhausted" else None, timeout=30, what="Degraded for budget")
    assert "maxUnavailable=1" in degraded["message"]
    # Watch for a while: the budget is never exceeded.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        out = [n["metadata"]["name"] for n in nodes_of(kubectl, name) if quarantined(n)]
        assert len(out) <= 1, f"more than the budget out: {out}"
        time.sleep(0.5)
    assert len([n for n in nodes_of(kubectl, name) if quarantined(n)]) == 1
    warnings = [e for e in events_of(kubectl, name) if e["reason"] == "RemediationBudgetExhausted"]
    assert warnings and warnings[0]["type"] == "Warning"
    tc = kubectl.get("tc", name)
    assert len(tc["status"]["remediation"]["h100"]["waiting"]) == 2
    kubectl.delete_cluster(name)
