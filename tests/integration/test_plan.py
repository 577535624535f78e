"""`gpucluster plan` against the API server: each kind of change planned,
then applied, and the apply compared with the plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .harness import REPO_ROOT, Kubectl, OperatorProcess, wait_for
from .test_trainingcluster import nodes_of, training_cluster, unique, wait_ready
from .test_trainingjob import training_job, wait_phase

pytestmark = pytest.mark.integration


def plan(kubeconfig: str, tmp_path: Path, manifest: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
    path = tmp_path / f"{manifest['metadata']['name']}.json"
    path.write_text(json.dumps(manifest))
    env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONPATH": str(REPO_ROOT / "operator")}
    done = subprocess.run([sys.executable, "-m", "gpucluster.cli", "plan", "-f", str(path), "-o", "json"],
                          capture_output=True, text=True, env=env, timeout=300)
    return done.returncode, json.loads(done.stdout) if done.stdout else {}, done.stderr


def pool(nodes: int, **extra: Any) -> dict[str, Any]:
    return {"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": nodes,
            "topology": {"nodesPerRack": 2, "racksPerBlock": 2}, **extra}


def names_of(kubectl: Kubectl, cluster: str) -> set[str]:
    return {n["metadata"]["name"] for n in nodes_of(kubectl, cluster)}


def test_plan_then_apply_agree_for_each_kind_of_change(kubectl: Kubectl, kubeconfig: str, tmp_path: Path,
                                                       running_operator: OperatorProcess) -> None:
    name = unique("plan")
    manifest = training_cluster(name, pool(3))
    code, new, _ = plan(kubeconfig, tmp_path, manifest)
    assert code == 1 and not new["exists"]
    planned = set(new["pools"][0]["create"])
    assert len(planned) == 3
    kubectl.apply(manifest)
    wait_ready(kubectl, name, 3)
    assert names_of(kubectl, name) == planned, "the nodes created are the ones planned"
    try:
        code, same, _ = plan(kubeconfig, tmp_path, manifest)
        assert code == 0 and same["pools"][0]["create"] == [] and same["pools"][0]["delete"] == []

        grown = training_cluster(name, pool(5))
        code, up, _ = plan(kubeconfig, tmp_path, grown)
        assert code == 1 and up["pools"][0]["nodesAfter"] == 5
        before = names_of(kubectl, name)
        kubectl.apply(grown)
        wait_ready(kubectl, name, 5)
        assert names_of(kubectl, name) - before == set(up["pools"][0]["create"])

        job = unique("gang")
        kubectl.apply(training_job(job, name, workers=2))
        running = wait_phase(kubectl, job, "Running")
        busy = set(running["status"]["nodes"])
        shrunk = training_cluster(name, pool(2))
        code, down, _ = plan(kubeconfig, tmp_path, shrunk)
        change = down["pools"][0]
        assert code == 1 and change["nodesAfter"] == 2
        assert set(change["delete"]).isdisjoint(busy), "empty nodes go before busy ones"
        assert len(change["delete"]) == 3 and change["drain"] == [] and change["evicted"] == {}
        before = names_of(kubectl, name)
        kubectl.apply(shrunk)
        wait_for(lambda: names_of(kubectl, name) == before - set(change["delete"]), timeout=60,
                 what="the planned nodes deleted")
        assert busy <= names_of(kubectl, name)

        smaller = training_cluster(name, pool(1))
        code, drain, _ = plan(kubeconfig, tmp_path, smaller)
        assert code == 1 and len(drain["pools"][0]["drain"]) == 1
        assert list(drain["pools"][0]["evicted"]) == [f"default/{job}"]
        assert drain["pools"][0]["budget"]["drainedByChange"] == 1
        assert f"default/{job}" in drain["unschedulable"], "2 workers can never fit 1 node"
        assert "spec.workers=2" in drain["unschedulable"][f"default/{job}"]

        other = training_cluster(name, pool(2), {"name": "h200", "gpu": "H200-141GB", "nodes": 1})
        code, added, _ = plan(kubeconfig, tmp_path, other)
        assert code == 1 and [p["name"] for p in added["pools"]] == ["h100", "h200"]
        assert len(added["pools"][1]["create"]) == 1 and added["pools"][0]["create"] == []

        code, bad, err = plan(kubeconfig, tmp_path, training_cluster(
            name, pool(2, remediation={"maxUnavailable": "150%"})))
        assert code == 2 and bad == {}
        assert "spec.pools[0].remediation.maxUnavailable" in err and "150%" in err
    finally:
        kubectl.run("delete", "tj", "--all", "-n", "default", "--wait=true", "--timeout=60s")
        kubectl.delete_cluster(name)


def test_plan_of_jobs(kubectl: Kubectl, kubeconfig: str, tmp_path: Path,
                      running_operator: OperatorProcess) -> None:
    name = unique("planj")
    kubectl.apply(training_cluster(name, pool(4)))
    wait_ready(kubectl, name, 4)
    try:
        fits = training_job(unique("fits"), name, workers=2)
        code, now, _ = plan(kubeconfig, tmp_path, fits)
        assert code == 1 and now["phase"] == "Queued" and len(now["admittedNow"]) == 2
        kubectl.apply(fits)
        admitted = wait_phase(kubectl, fits["metadata"]["name"], "Admitted", "Running")
        assert sorted(set(admitted["status"]["nodes"])) == now["admittedNow"], "admitted where planned"

        waits = training_job(unique("waits"), name, workers=3)
        code, later, _ = plan(kubeconfig, tmp_path, waits)
        assert code == 1 and later["queuePosition"] == 1 and "admittedNow" not in later

        code, huge, _ = plan(kubeconfig, tmp_path, training_job(unique("huge"), name, workers=5))
        assert code == 1 and huge["phase"] == "Failed" and huge["reason"] == "LargerThanPool"

        edited = {**fits, "spec": {**fits["spec"], "priorityClassName": "no-such-class"}}
        code, ends, _ = plan(kubeconfig, tmp_path, edited)
        assert code == 1 and ends["endsRunningGang"] and ends["reason"] == "UnknownPriorityClass"

        moved = {**fits, "spec": {**fits["spec"], "pool": "h200"}}
        code, _, err = plan(kubeconfig, tmp_path, moved)
        assert code == 2 and "immutable while the job is Admitted or Running" in err
    finally:
        kubectl.run("delete", "tj", "--all", "-n", "default", "--wait=true", "--timeout=60s")
        kubectl.delete_cluster(name)
