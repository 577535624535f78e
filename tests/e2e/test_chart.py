"""The Helm chart running for real (conftest.py: kind, or the local real
nodes): the operator's replicas, the device plugin and the agent in
containers, their probes, their /metrics from inside the cluster, a GPU pod,
an injected GPU fault, and `kubectl logs` / `exec` through a real kubelet."""

from __future__ import annotations

import json
import re
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ..integration.harness import Kubectl, wait_for
from .conftest import Cluster

pytestmark = pytest.mark.e2e

GPUS_PER_NODE = 8  # the chart's devicePlugin.gpus


def allocatable_gpus(node: dict[str, Any]) -> int:
    return int(node["status"].get("allocatable", {}).get("nvidia.com/gpu", "0"))


def component_pods(e2e: Cluster, component: str) -> list[dict[str, Any]]:
    return list(e2e.kubectl.get("pods", "-n", e2e.namespace, "-l",
                                f"app.kubernetes.io/component={component}")["items"])


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def test_the_operator_replicas_are_ready_and_one_leads(e2e: Cluster) -> None:
    kubectl = e2e.kubectl
    kubectl.run("-n", e2e.namespace, "rollout", "status", "deployment", "-l",
                "app.kubernetes.io/component=operator", "--timeout=300s")
    deployment = kubectl.get("deployment", "-n", e2e.namespace, "-l", "app.kubernetes.io/component=operator")
    replicas = deployment["items"][0]["spec"]["replicas"]
    pods = wait_for(lambda: [p for p in component_pods(e2e, "operator") if ready(p)], timeout=120,
                    what="the operator's pods Ready")
    assert len(pods) == replicas
    peers = wait_for(lambda: len(kubectl.get("clusterkopfpeering", "gpucluster").get("status") or {}) == replicas
                     and kubectl.get("clusterkopfpeering", "gpucluster")["status"], timeout=60,
                     what=f"{replicas} replicas' keep-alives in the peering object")

    # Every replica starts paused; the one of the highest priority resumes,
    # the others stay paused while it lives. The logs come through the real
    # kubelet: the API server dials it.
    def resumed() -> list[str]:
        return [p["metadata"]["name"] for p in pods
                if "Resuming operations after the pause" in kubectl.run("logs", "-n", e2e.namespace,
                                                                        p["metadata"]["name"]).stdout]
    leaders = wait_for(resumed, timeout=60, what="a replica to resume")
    assert leaders == [max(peers, key=lambda name: peers[name]["priority"])], (leaders, peers)


def test_the_chart_pods_pass_their_probes(e2e: Cluster) -> None:
    for component in ("operator", "agent"):
        pods = component_pods(e2e, component)
        assert pods, component
        for pod in pods:
            container = pod["spec"]["containers"][0]
            assert {"livenessProbe", "readinessProbe"} <= container.keys(), (component, container.keys())
            wait_for(lambda p=pod: ready(e2e.kubectl.get("pod", "-n", e2e.namespace, p["metadata"]["name"])),
                     timeout=120, what=f"{pod['metadata']['name']} Ready")
            status = e2e.kubectl.get("pod", "-n", e2e.namespace, pod["metadata"]["name"])["status"]
            # Liveness never failed: nothing restarted.
            assert status["containerStatuses"][0]["restartCount"] == 0, status["containerStatuses"]


def test_the_device_plugin_offers_fake_gpus_on_every_node_it_runs_on(e2e: Cluster) -> None:
    e2e.kubectl.run("-n", e2e.namespace, "rollout", "status", "daemonset", "-l",
                    "app.kubernetes.io/component=device-plugin", "--timeout=300s")
    nodes = {p["spec"]["nodeName"] for p in component_pods(e2e, "device-plugin")}
    assert nodes

    def every_node_offers() -> bool:
        return all(allocatable_gpus(e2e.kubectl.get("node", n)) == GPUS_PER_NODE for n in nodes)
    wait_for(every_node_offers, timeout=120, interval=2, what=f"{GPUS_PER_NODE} nvidia.com/gpu on {sorted(nodes)}")


def test_the_agent_writes_each_gpu_nodes_verdict(e2e: Cluster) -> None:
    e2e.kubectl.run("-n", e2e.namespace, "rollout", "status", "daemonset", "-l",
                    "app.kubernetes.io/component=agent", "--timeout=300s")
    for node in e2e.gpu_nodes():
        name = node["metadata"]["name"]

        def verdict(name: str = name) -> dict[str, Any] | None:
            conditions = e2e.kubectl.get("node", name)["status"].get("conditions", [])
            return next((c for c in conditions if c["type"] == "GPUHealthy"), None)
        condition = wait_for(verdict, timeout=120, interval=2, what=f"GPUHealthy on {name}")
        assert (condition["status"], condition["reason"]) == ("True", "GPUsHealthy")
        annotations = e2e.kubectl.get("node", name)["metadata"]["annotations"]
        assert annotations["gpucluster.dev/healthy-gpus"] == str(GPUS_PER_NODE)


def run_pod(e2e: Cluster, name: str, source: str, **spec: Any) -> str:
    """Runs `python -c source` in the gpucluster image to completion; returns
    its log. `container` adds to the container, the rest to the pod's spec."""
    container = spec.pop("container", {})
    e2e.kubectl.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
        "spec": {"restartPolicy": "Never", "nodeSelector": e2e.node_selector, **spec,
                 "containers": [{"name": "main", "image": e2e.image, "imagePullPolicy": "Never",
                                 "command": ["python", "-c", source], **container}]}})
    try:
        phase = wait_for(lambda: (e2e.kubectl.get("pod", "-n", "default", name).get("status") or {}).get("phase")
                         in ("Succeeded", "Failed") and e2e.kubectl.get("pod", "-n", "default", name)["status"],
                         timeout=180, interval=2, what=f"{name} to finish")
        log = e2e.kubectl.run("logs", "-n", "default", name).stdout
        assert phase["phase"] == "Succeeded", log
        return log
    finally:
        e2e.kubectl.run("delete", "pod", "-n", "default", name, "--wait=false", check=False)


def test_metrics_answer_from_inside_the_cluster(e2e: Cluster) -> None:
    """Through cluster DNS and kube-proxy, as Prometheus in the cluster scrapes them."""
    services = {s["metadata"]["labels"]["app.kubernetes.io/component"]: s["metadata"]["name"]
                for s in e2e.kubectl.get("services", "-n", e2e.namespace)["items"]}
    operator = f"http://{services['operator']}.{e2e.namespace}.svc:8080/metrics"
    # Headless: one address per agent, as a ServiceMonitor's endpoints.
    agents = f"{services['agent']}.{e2e.namespace}.svc"
    source = textwrap.dedent(f"""
        import json, socket, urllib.request
        def get(url):
            with urllib.request.urlopen(url, timeout=20) as reply:
                return reply.read().decode()
        operator = get({operator!r})
        agents = sorted({{a[4][0] for a in socket.getaddrinfo({agents!r}, 9400, socket.AF_INET)}})
        texts = {{ip: get(f"http://{{ip}}:9400/metrics") for ip in agents}}
        print(json.dumps({{"operator": operator, "agents": texts}}))
    """)
    scraped = json.loads(run_pod(e2e, f"scrape-{uuid.uuid4().hex[:5]}", source))
    assert "# TYPE gpucluster_" in scraped["operator"], scraped["operator"][:500]
    assert len(scraped["agents"]) == len(component_pods(e2e, "agent"))
    for ip, text in scraped["agents"].items():
        assert re.search(r'^DCGM_FI_DEV_GPU_TEMP\{.*gpu="7"', text, re.MULTILINE), (ip, text[:500])


def test_kubectl_exec_runs_in_the_agents_container(e2e: Cluster) -> None:
    pod = component_pods(e2e, "agent")[0]["metadata"]["name"]
    out = e2e.kubectl.run("exec", "-n", e2e.namespace, pod, "--", "python", "-c",
                          "import os, gpucluster; print(os.getuid(), gpucluster.__name__)").stdout
    # The Dockerfile's user, the chart's runAsUser.
    assert out.split() == ["10001", "gpucluster"]


@pytest.fixture()
def gpu_node(e2e: Cluster) -> str:
    return str(e2e.gpu_nodes()[0]["metadata"]["name"])


def test_a_pod_asking_for_gpus_runs_with_them(e2e: Cluster, gpu_node: str) -> None:
    log = run_pod(e2e, f"gpu-smoke-{uuid.uuid4().hex[:5]}", "import os; print(os.environ['NVIDIA_VISIBLE_DEVICES'])",
                  nodeSelector={"kubernetes.io/hostname": gpu_node},
                  container={"resources": {"limits": {"nvidia.com/gpu": "2"}}})
    visible = log.strip().split(",")
    # The device plugin's Allocate names the two GPUs it gave, by UUID.
    assert len(visible) == 2 and all(re.fullmatch(r"GPU-[0-9a-f-]{36}", v) for v in visible), visible


@pytest.fixture()
def faulty_gpu(e2e: Cluster, gpu_node: str) -> Iterator[str]:
    e2e.kubectl.run("annotate", "node", gpu_node, "--overwrite", "gpucluster.dev/inject-fault=gpu=3,xid=79")
    yield gpu_node
    e2e.kubectl.run("annotate", "node", gpu_node, "--overwrite", "gpucluster.dev/inject-fault=gpu=all,fault=reset")


def test_an_injected_fault_takes_the_gpu_out_of_allocatable(e2e: Cluster, faulty_gpu: str) -> None:
    kubectl: Kubectl = e2e.kubectl
    wait_for(lambda: allocatable_gpus(kubectl.get("node", faulty_gpu)) == GPUS_PER_NODE - 1, timeout=60,
             interval=2, what="the faulty GPU reported Unhealthy to the kubelet")
    kubectl.run("annotate", "node", faulty_gpu, "--overwrite", "gpucluster.dev/inject-fault=gpu=all,fault=reset")
    wait_for(lambda: allocatable_gpus(kubectl.get("node", faulty_gpu)) == GPUS_PER_NODE, timeout=60, interval=2,
             what="the GPU back after its reset")
