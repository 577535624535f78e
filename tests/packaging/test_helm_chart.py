"""helm/gpucluster, without a cluster: helm lint, helm template with the
default values and with every component switched (ci/*-values.yaml), the
schema, least-privilege RBAC derived from the code, and the copies of CRDs,
rules and dashboard kept identical to the repository's. (Installed on a real
API server in tests/integration/test_helm.py.)"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from .operator_api import (
    AGENT,
    DEVICE_PLUGIN_WATCHING_FAULTS,
    operator_permissions,
    permissions_of,
)
from .tools import REPO_ROOT, helm, run

CHART = REPO_ROOT / "helm" / "gpucluster"
NONDEFAULT = CHART / "ci" / "nondefault-values.yaml"
PROMETHEUS_OPERATOR = "monitoring.coreos.com/v1"


@cache
def _render(values_files: tuple[Path, ...], sets: tuple[str, ...], api_versions: tuple[str, ...],
            ) -> tuple[dict[str, Any], ...]:
    args = [helm(), "template", "gpucluster", str(CHART), "--namespace", "gpucluster-system"]
    args += [f"--values={f}" for f in values_files] + [f"--set={s}" for s in sets]
    args += [f"--api-versions={v}" for v in api_versions]
    return tuple(doc for doc in yaml.safe_load_all(run(*args).stdout) if doc)


def render(*values_files: Path, sets: tuple[str, ...] = (), api_versions: tuple[str, ...] = (),
           ) -> list[dict[str, Any]]:
    return list(_render(values_files, sets, api_versions))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def test_helm_lint_strict() -> None:
    run(helm(), "lint", "--strict", str(CHART))
    run(helm(), "lint", "--strict", str(CHART), f"--values={NONDEFAULT}")


def test_default_install_has_operator_agent_rbac_and_dashboard() -> None:
    docs = render()
    assert kinds(docs) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "DaemonSet",
                           "Service", "ConfigMap", "ClusterKopfPeering"}
    # No prometheus-operator API on the cluster: no ServiceMonitor or
    # PrometheusRule, or the install would fail on the unknown kinds.
    assert not kinds(docs) & {"ServiceMonitor", "PrometheusRule"}
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "DaemonSet"] == ["gpucluster-agent"]


def test_operator_deployment_two_replicas_one_active_locked_down() -> None:
    deployment = one(render(), "Deployment", "gpucluster-operator")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    operator = container(deployment)
    assert operator["image"] == "ghcr.io/gpucluster/gpucluster:0.1.0"
    assert operator["args"] == ["run", "--log-format=json", "--metrics-port=8080", "--liveness-port=8081",
                                "--peering=gpucluster"]
    assert {e["name"]: e.get("valueFrom") for e in operator["env"]}["POD_ID"] == {
        "fieldRef": {"fieldPath": "metadata.name"}}
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert ports == {"metrics": 8080, "healthz": 8081}
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert operator["securityContext"]["readOnlyRootFilesystem"] is True
    assert operator["securityContext"]["allowPrivilegeEscalation"] is False
    assert operator["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["serviceAccountName"] == "gpucluster-operator"
    assert one(render(), "ClusterKopfPeering")["metadata"]["name"] == "gpucluster"


def test_agent_runs_nvml_on_gpu_nodes_only_and_survives_quarantine() -> None:
    daemonset = one(render(), "DaemonSet", "gpucluster-agent")
    pod = daemonset["spec"]["template"]["spec"]
    agent = container(daemonset)
    assert agent["args"][:2] == ["agent", "--backend=nvml"]
    assert "--in-cluster" in agent["args"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {t["key"] for t in pod["tolerations"]} >= {"nvidia.com/gpu", "nvidia.com/gpu-error"}
    assert {e["name"] for e in agent["env"]} >= {"NODE_NAME", "NVIDIA_VISIBLE_DEVICES"}
    assert {p["name"]: p["containerPort"] for p in agent["ports"]} == {"metrics": 9400}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True


def test_operator_role_is_exactly_what_the_operator_does() -> None:
    role = one(render(), "ClusterRole", "gpucluster-operator")
    granted, needed = permissions_of(role), operator_permissions()
    assert sorted(map(str, needed - granted)) == [], "the operator does these; the ClusterRole must allow them"
    assert sorted(map(str, granted - needed)) == [], "the ClusterRole allows more than the operator does"
    assert not any("*" in (p.group, p.resource, p.verb) for p in granted)
    assert not any(p.resource.startswith("secrets") for p in granted)
    binding = one(render(), "ClusterRoleBinding", "gpucluster-operator")
    assert binding["roleRef"]["name"] == "gpucluster-operator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gpucluster-operator",
                                    "namespace": "gpucluster-system"}]


def test_agent_and_device_plugin_roles() -> None:
    assert permissions_of(one(render(), "ClusterRole", "gpucluster-agent")) == AGENT
    docs = render(NONDEFAULT)
    assert permissions_of(one(docs, "ClusterRole", "gpucluster-gpc-device-plugin")) == DEVICE_PLUGIN_WATCHING_FAULTS
    # Without fault watching the device plugin talks to no API server at all.
    quiet = render(sets=("devicePlugin.enabled=true",))
    assert not [d for d in quiet if d["kind"] == "ClusterRole" and "device-plugin" in d["metadata"]["name"]]
    assert one(quiet, "DaemonSet", "gpucluster-device-plugin")["spec"]["template"]["spec"][
        "automountServiceAccountToken"] is False


def test_every_component_switched() -> None:
    docs = render(NONDEFAULT, api_versions=(PROMETHEUS_OPERATOR,))
    deployment = one(docs, "Deployment", "gpucluster-gpc-operator")
    assert deployment["spec"]["replicas"] == 1
    operator = container(deployment)
    assert operator["image"] == "registry.example.com/ml-platform/gpucluster:0.2.0-rc.1"
    assert operator["args"] == ["run", "--log-format=plain", "--metrics-port=9090", "--liveness-port=9091",
                                "--namespace=team-a", "--namespace=team-b"]
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
    # No peering name: a standalone operator, no peering object, no peering RBAC.
    assert "ClusterKopfPeering" not in kinds(docs)
    role = permissions_of(one(docs, "ClusterRole", "gpucluster-gpc-operator"))
    assert role == operator_permissions(peering=False)

    agent = container(one(docs, "DaemonSet", "gpucluster-gpc-agent"))
    assert agent["args"] == ["agent", "--backend=fake", "--profile=h200-141gb", "--metrics-port=9500",
                             "--interval=2", "--in-cluster"]
    assert "NVIDIA_VISIBLE_DEVICES" not in {e["name"] for e in agent["env"]}
    assert one(docs, "DaemonSet", "gpucluster-gpc-agent")["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"

    plugin = one(docs, "DaemonSet", "gpucluster-gpc-device-plugin")
    assert container(plugin)["args"] == ["device-plugin", "--backend=fake", "--profile=h200-141gb", "--gpus=4",
                                         "--plugin-dir=/var/lib/kubelet/device-plugins", "--watch-faults",
                                         "--in-cluster"]
    assert plugin["spec"]["template"]["spec"]["volumes"] == [
        {"name": "device-plugins", "hostPath": {"path": "/var/lib/kubelet/device-plugins", "type": "Directory"}}]

    dashboard = one(docs, "ConfigMap", "gpucluster-gpc-dashboard")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["team"] == "ml-platform"
    for sa in (d for d in docs if d["kind"] == "ServiceAccount"):
        assert sa["metadata"]["annotations"] == {"example.com/owner": "ml-platform"}


def test_serving_some_namespaces_keeps_the_cluster_wide_peering() -> None:
    # `gpucluster run -n` filters TrainingJobs in its handlers and runs Kopf
    # cluster-wide (Kopf serves no cluster-scoped resource in namespaced
    # mode), so the peering and the RBAC stay cluster-wide too.
    docs = render(sets=("operator.watchNamespaces={team-a,team-b}",))
    assert container(one(docs, "Deployment", "gpucluster-operator"))["args"][-2:] == [
        "--namespace=team-a", "--namespace=team-b"]
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "gpucluster"
    assert permissions_of(one(docs, "ClusterRole", "gpucluster-operator")) == operator_permissions()


def test_monitoring_objects_where_the_prometheus_operator_is() -> None:
    docs = render(NONDEFAULT, api_versions=(PROMETHEUS_OPERATOR,))
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2
    jobs = set()
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
        selected = [s for s in services.values()
                    if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        assert len(selected) == 1, monitor["metadata"]["name"]
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
        assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
        jobs.add(selected[0]["metadata"]["labels"]["app.kubernetes.io/name"])
    # The job names the alert rules and the dashboard select on.
    assert jobs == {"gpucluster-operator", "gpucluster-agent"}
    rule = one(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "rules.yaml").read_text())
    # Both switched off, nothing even with the API present.
    off = render(sets=("metrics.serviceMonitor.enabled=false", "prometheusRule.enabled=false"),
                 api_versions=(PROMETHEUS_OPERATOR,))
    assert not kinds(off) & {"ServiceMonitor", "PrometheusRule"}


def test_dashboard_configmap_carries_the_dashboard_for_grafanas_sidecar() -> None:
    configmap = one(render(), "ConfigMap", "gpucluster-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"]["gpucluster-dashboard.json"] == (
        REPO_ROOT / "deploy" / "grafana" / "gpucluster-dashboard.json").read_text()


@pytest.mark.parametrize(("setting", "complaint"), [
    ("operator.replica=3", "additional properties 'replica' not allowed"),
    ("operator.replicas=-1", "minimum"),
    ("agent.backend=cuda", "agent/backend"),
    ("devicePlugin.gpus=9", "maximum"),
    ("metrics.serviceMonitor.interval=often", "interval"),
])
def test_schema_rejects_typos_and_impossible_values(setting: str, complaint: str) -> None:
    result = run(helm(), "template", "x", str(CHART), f"--set={setting}", check=False)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_kind_values_render() -> None:
    docs = render(CHART / "ci" / "kind-values.yaml")
    assert container(one(docs, "DaemonSet", "gpucluster-device-plugin"))["image"] == "gpucluster:e2e"
    assert container(one(docs, "Deployment", "gpucluster-operator"))["imagePullPolicy"] == "Never"


def test_chart_crds_are_the_repository_crds() -> None:
    # Byte for byte: crds/ is generated from the API models, the chart's copy
    # must follow it (cp crds/*.yaml helm/gpucluster/crds/).
    ours = {p.name: p.read_bytes() for p in (REPO_ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert ours
    stale = sorted(name for name in ours if chart.get(name) != ours[name])
    assert stale == [], "helm/gpucluster/crds/ differs from crds/: cp crds/*.yaml helm/gpucluster/crds/"
    assert set(chart) - set(ours) == {"kopf.dev_peerings.yaml"}
    kopf = [d["metadata"]["name"] for d in yaml.safe_load_all(chart["kopf.dev_peerings.yaml"])]
    assert kopf == ["clusterkopfpeerings.kopf.dev"]


def test_chart_files_are_the_deploy_files() -> None:
    for chart_file, source in [("prometheus-rules.yaml", "deploy/prometheus/rules.yaml"),
                               ("gpucluster-dashboard.json", "deploy/grafana/gpucluster-dashboard.json")]:
        assert (CHART / "files" / chart_file).read_bytes() == (REPO_ROOT / source).read_bytes(), (
            f"cp {source} helm/gpucluster/files/{chart_file}")
