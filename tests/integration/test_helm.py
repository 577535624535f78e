"""The Helm chart on a real API server: `helm install` into the session
cluster, the chart's ServiceAccount allowed exactly what the operator does
(asked of the API server's authorizer by impersonation), and the operator
run as that ServiceAccount reconciling a TrainingCluster and a TrainingJob.

The release installs with operator.replicas=0: its pods could only run on
KWOK nodes, where nothing runs, and a real operator Deployment would fight
the test's own operator. The test runs `gpucluster run` itself, with the
ServiceAccount's token, as the Deployment's pods would. The agent DaemonSet
gets a node selector no node has, so it creates no pods on the KWOK GPU
nodes other tests use."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpucluster import devcluster

from ..packaging.operator_api import AGENT, MUST_NOT, Permission, operator_permissions
from .harness import REPO_ROOT, Kubectl, OperatorProcess, wait_for

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:5]
RELEASE = f"gc-{RUN}"
NAMESPACE = f"gpucluster-helm-{RUN}"
PEERING = f"gpucluster-{RUN}"
CHART = REPO_ROOT / "helm" / "gpucluster"
OPERATOR_SA = f"{RELEASE}-gpucluster-operator"
AGENT_SA = f"{RELEASE}-gpucluster-agent"
TEST_VALUES = {
    "operator": {"replicas": 0, "peering": PEERING},
    "agent": {"nodeSelector": {"gpucluster.dev/helm-test": "no-such-node"}},
}


class Helm:
    def __init__(self, bin_dir: str, kubeconfig: str) -> None:
        self.binary = str(Path(bin_dir) / "helm")
        self.kubeconfig = kubeconfig

    def run(self, *args: str) -> str:
        result = subprocess.run([self.binary, f"--kubeconfig={self.kubeconfig}", *args],
                                capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
        return result.stdout


@pytest.fixture(scope="module")
def helm(cluster: devcluster.ClusterState, kubeconfig: str) -> Helm:
    return Helm(cluster.bin_dir, kubeconfig)


@pytest.fixture(scope="module")
def release(helm: Helm, kubectl: Kubectl, crds: None, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[str]:
    values = tmp_path_factory.mktemp("helm") / "values.yaml"
    values.write_text(yaml.safe_dump(TEST_VALUES))
    helm.run("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace",
             f"--values={values}", "--wait", "--timeout=90s")
    try:
        yield RELEASE
    finally:
        helm.run("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout=60s")
        kubectl.run("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def test_install_creates_the_charts_objects(release: str, helm: Helm, kubectl: Kubectl) -> None:
    deployment = kubectl.get("deployment", "-n", NAMESPACE, f"{RELEASE}-gpucluster-operator")
    assert deployment["spec"]["replicas"] == 0
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == OPERATOR_SA
    agent = kubectl.get("daemonset", "-n", NAMESPACE, f"{RELEASE}-gpucluster-agent")
    assert agent["status"]["desiredNumberScheduled"] == 0
    # The API server accepted the peering CRD from the chart's crds/ and the
    # peering object the replicas share.
    kubectl.run("wait", "--for=condition=Established", "--timeout=30s", "crd/clusterkopfpeerings.kopf.dev")
    assert kubectl.get("clusterkopfpeering", PEERING)["metadata"]["name"] == PEERING
    dashboards = kubectl.get("configmap", "-n", NAMESPACE, "-l", "grafana_dashboard=1")["items"]
    assert [c["metadata"]["name"] for c in dashboards] == [f"{RELEASE}-gpucluster-dashboard"]
    json.loads(dashboards[0]["data"]["gpucluster-dashboard.json"])
    services = kubectl.get("services", "-n", NAMESPACE)["items"]
    assert {s["metadata"]["labels"]["app.kubernetes.io/name"] for s in services} == {
        "gpucluster-operator", "gpucluster-agent"}
    # The session cluster serves no monitoring.coreos.com/v1: the chart left
    # those kinds out (an install with them would have failed).
    if "monitoring.coreos.com" not in kubectl.run("api-versions").stdout:
        manifest = helm.run("get", "manifest", RELEASE, "--namespace", NAMESPACE)
        assert "kind: ServiceMonitor" not in manifest and "kind: PrometheusRule" not in manifest


def minimal_crd(plural: str, kind: str) -> dict[str, Any]:
    """Just enough of a prometheus-operator CRD for the API server to serve
    monitoring.coreos.com/v1 (its schema is not what is tested here)."""
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                     "names": {"plural": plural, "kind": kind},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


def test_monitoring_objects_once_the_prometheus_operator_api_is_served(release: str, helm: Helm,
                                                                       kubectl: Kubectl) -> None:
    crds = [minimal_crd("servicemonitors", "ServiceMonitor"), minimal_crd("prometheusrules", "PrometheusRule")]
    for crd in crds:
        kubectl.apply(crd)
    try:
        kubectl.run("wait", "--for=condition=Established", "--timeout=30s",
                    *(f"crd/{c['metadata']['name']}" for c in crds))
        # Helm reads the API server's discovery at each upgrade: now the
        # chart's Capabilities check lets the monitoring objects through.
        helm.run("upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, "--reuse-values", "--wait")
        monitors = kubectl.get("servicemonitors.monitoring.coreos.com", "-n", NAMESPACE)["items"]
        assert sorted(m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for m in monitors) == [
            "gpucluster-agent", "gpucluster-operator"]
        rule = kubectl.get("prometheusrules.monitoring.coreos.com", "-n", NAMESPACE, f"{RELEASE}-gpucluster")
        assert rule["spec"] == yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "rules.yaml").read_text())
    finally:
        helm.run("upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, "--reuse-values", "--wait",
                 "--set=metrics.serviceMonitor.enabled=false", "--set=prometheusRule.enabled=false")
        kubectl.run("delete", "--wait=false", *(f"crd/{c['metadata']['name']}" for c in crds), check=False)


def can_i(kubectl: Kubectl, service_account: str, verb: str, group: str, resource: str) -> bool:
    """What RBAC answers for the ServiceAccount, by a SubjectAccessReview:
    unlike `kubectl auth can-i`, it needs no discovery, so it also answers
    for groups not served here (karpenter.sh without Karpenter installed)."""
    kind, _, subresource = resource.partition("/")
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
        "user": f"system:serviceaccount:{NAMESPACE}:{service_account}",
        "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}", "system:authenticated"],
        "resourceAttributes": {"verb": verb, "group": group, "resource": kind, "subresource": subresource}}}
    answer = kubectl.run("create", "-f", "-", "-o", "json", input=json.dumps(review))
    return bool(json.loads(answer.stdout)["status"].get("allowed"))


def test_service_accounts_are_allowed_what_they_do_and_nothing_dangerous(release: str, kubectl: Kubectl,
                                                                         ) -> None:
    needed = operator_permissions(peering=True)
    refused = sorted(str(p) for p in needed if not can_i(kubectl, OPERATOR_SA, p.verb, p.group, p.resource))
    assert refused == [], "the operator does these, its ServiceAccount may not"
    allowed = [f"{verb} {resource}" for verb, resource, group in MUST_NOT
               if can_i(kubectl, OPERATOR_SA, verb, group, resource)]
    assert allowed == [], "the operator's ServiceAccount may do what it must not"

    assert [str(p) for p in AGENT if not can_i(kubectl, AGENT_SA, p.verb, p.group, p.resource)] == []
    agent_must_not = [Permission("", "nodes", "list"), Permission("", "nodes", "patch"),
                      Permission("", "nodes", "delete"),
                      Permission("", "pods", "create"), Permission("", "secrets", "get")]
    assert [str(p) for p in agent_must_not if can_i(kubectl, AGENT_SA, p.verb, p.group, p.resource)] == []


def service_account_kubeconfig(kubectl: Kubectl, path: Path) -> str:
    """A kubeconfig that authenticates as the operator's ServiceAccount, with
    a token the API server issues for it, as a pod of the Deployment gets."""
    token = kubectl.run("create", "token", OPERATOR_SA, "-n", NAMESPACE, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(kubectl.kubeconfig).read_text())
    cluster = admin["clusters"][0]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": OPERATOR_SA, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": OPERATOR_SA}}],
        "current-context": "operator",
    }))
    path.chmod(0o600)
    return str(path)


@pytest.fixture()
def replicas_as_service_account(release: str, kubectl: Kubectl, operator: OperatorProcess,
                                tmp_path: Path) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """Two `gpucluster run --peering` replicas with the ServiceAccount's token,
    as the chart's Deployment runs them, started a moment apart; the only
    operators running meanwhile (the session's is stopped and started again)."""
    kubeconfig = service_account_kubeconfig(kubectl, tmp_path / "operator-sa.kubeconfig")
    session_was_running = operator.proc is not None and operator.proc.poll() is None
    operator.stop()
    older = OperatorProcess(kubeconfig, tmp_path / "older", extra_args=("--peering", PEERING))
    newer = OperatorProcess(kubeconfig, tmp_path / "newer", extra_args=("--peering", PEERING))
    for proc in (older, newer):
        proc.log_dir.mkdir()
    try:
        older.start()
        # Mandatory peering: nothing happens until the operator has found the
        # chart's peering object and written its keep-alive there.
        # Generous: a Python process's start, which a loaded machine slows.
        wait_for(lambda: len(kubectl.get("clusterkopfpeering", PEERING).get("status") or {}) == 1, timeout=120,
                 what=f"the first replica's keep-alive in ClusterKopfPeering {PEERING}; log: {older.log_path}")
        newer.start()
        yield older, newer
    finally:
        newer.stop()
        older.stop()
        if session_was_running:
            operator.start()


def condition(obj: dict[str, Any], kind: str) -> str | None:
    return next((c["status"] for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind), None)


def test_two_replicas_as_the_service_account_one_active(
        replicas_as_service_account: tuple[OperatorProcess, OperatorProcess], kubectl: Kubectl) -> None:
    older, newer = replicas_as_service_account
    # The older replica leads (runner's default priority is minus the start
    # time); the newer one starts paused and stays so beside it, rather than
    # both freezing, as Kopf does on a tie.
    wait_for(lambda: len(kubectl.get("clusterkopfpeering", PEERING).get("status") or {}) == 2, timeout=120,
             what=f"the newer replica's keep-alive; log: {newer.log_path}")
    name = f"helm-{RUN}"
    kubectl.apply({"apiVersion": "gpucluster.dev/v1alpha1", "kind": "TrainingCluster", "metadata": {"name": name},
                   "spec": {"pools": [{"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": 2,
                                       "topology": {"nodesPerRack": 2, "racksPerBlock": 1}}]}})
    try:
        wait_for(lambda: condition(kubectl.get("tc", name), "Ready") == "True", timeout=60,
                 what=f"{name} Ready; operator log: {older.log_path}")
        job = f"{name}-job"
        kubectl.apply({"apiVersion": "gpucluster.dev/v1alpha1", "kind": "TrainingJob",
                       "metadata": {"name": job, "namespace": "default"},
                       "spec": {"cluster": name, "pool": "h100", "workers": 2, "gpusPerWorker": 8,
                                "template": {"spec": {"containers": [{"name": "trainer", "image": "pytorch"}]}}}})
        wait_for(lambda: (kubectl.get("tj", "-n", "default", job).get("status") or {}).get("phase") == "Running",
                 timeout=45, what=f"{job} Running; operator log: {older.log_path}")
    finally:
        kubectl.run("delete", "tj", "-n", "default", f"{name}-job", "--timeout=60s", check=False)
        kubectl.run("delete", "tc", name, "--timeout=50s", check=False)
    assert kubectl.get("nodes", "-l", f"gpucluster.dev/cluster={name}")["items"] == []
    assert "Pausing" not in older.log_path.read_text()
    # The standby did not touch the cluster.
    assert name not in newer.log_path.read_text() and "Resuming" not in newer.log_path.read_text()
    for replica in (older, newer):
        log = replica.log_path.read_text()
        assert "conflicting operators" not in log, replica.log_path
        # Every request was allowed: the client's exceptions say Forbidden,
        # and Kopf says "Not enough permissions" when it falls back.
        for refusal in ("Forbidden", "Not enough permissions"):
            assert refusal not in log, f"{refusal} in {replica.log_path}"
