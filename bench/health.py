"""GPU-health benchmark: time from an injected GPU fault to the node
quarantined (cordoned and tainted nvidia.com/gpu-error), p50 and p99, and the
CPU the fleet agent spends per node, on N fake nodes.

    python bench/health.py --nodes 1000 [--nodes 5000] [--faults 100]

The path measured is the whole product path: annotation -> fleet agent
(fake backend) -> GPUHealthy=False on the Node -> operator's node event ->
remediation plan -> cordon + taint. A local control plane is started for the
run (or GPUCLUSTER_KUBECONFIG names a running one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import kubernetes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from gpucluster import devcluster, names  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class NodeWatch:
    """One raw watch over the cluster's nodes: when each became quarantined,
    and how many are Ready with GPUHealthy=True."""

    def __init__(self, core: kubernetes.client.CoreV1Api, selector: str) -> None:
        self.core, self.selector = core, selector
        self.quarantined_at: dict[str, float] = {}
        self.healthy: set[str] = set()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        version = "0"
        while True:
            stream = self.core.list_node(watch=True, label_selector=self.selector, resource_version=version,
                                         allow_watch_bookmarks=True, timeout_seconds=600, _preload_content=False)
            buffer = b""
            for chunk in stream.stream(1 << 16):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    event = json.loads(line)
                    self._see(event)
                    version = event["object"]["metadata"].get("resourceVersion", version)

    def _see(self, event: dict[str, Any]) -> None:
        if event["type"] == "BOOKMARK":
            return
        node = event["object"]
        name = node["metadata"]["name"]
        taints = node["spec"].get("taints") or []
        if any(t["key"] == names.TAINT_GPU_ERROR for t in taints) and name not in self.quarantined_at:
            self.quarantined_at[name] = time.time()
        conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        if conditions.get("Ready") == "True" and conditions.get(names.CONDITION_GPU_HEALTHY) == "True":
            self.healthy.add(name)
        else:
            self.healthy.discard(name)


def wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def run(count: int, faults: int, kubeconfig: str, core: kubernetes.client.CoreV1Api, kubectl: Any,
        log_dir: Path) -> str:
    cluster = f"health{count}"
    env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONPATH": str(REPO / "operator")}
    with open(log_dir / f"operator-{count}.log", "wb") as operator_log, \
            open(log_dir / f"agent-{count}.log", "wb") as agent_log:
        operator = subprocess.Popen([sys.executable, "-m", "gpucluster.cli", "run", "--metrics-port", "0",
                                     "--liveness-port", "0"], env=env, stdout=operator_log, stderr=subprocess.STDOUT)
        agent = subprocess.Popen([sys.executable, "-m", "gpucluster.cli", "agent", "--backend", "fake", "--fleet",
                                  "--node-selector", f"{names.LABEL_CLUSTER}={cluster}", "--metrics-port", "0"],
                                 env=env, stdout=agent_log, stderr=subprocess.STDOUT)
    try:
        watch = NodeWatch(core, f"{names.LABEL_CLUSTER}={cluster}")
        kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": names.API_VERSION, "kind": "TrainingCluster", "metadata": {"name": cluster},
            "spec": {"pools": [{"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": count,
                                "remediation": {"maxUnavailable": "100%", "replace": False}}]}}))
        wait(lambda: len(watch.healthy) >= count, 1800, f"{count} nodes Ready and GPUHealthy")
        time.sleep(5)
        cpu_before, wall_before = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(30)
        steady = (cpu_seconds(agent.pid) - cpu_before) / (time.monotonic() - wall_before)

        targets = sorted(watch.healthy)[:: max(1, count // faults)][:faults]
        injected: dict[str, float] = {}
        for index, node in enumerate(targets):
            injected[node] = time.time()
            core.patch_node(node, {"metadata": {"annotations": {
                "gpucluster.dev/inject-fault": f"gpu={index % 8},xid=79"}}}, _preload_content=False)
            time.sleep(0.1)
        wait(lambda: all(n in watch.quarantined_at for n in targets), 300, "every faulty node quarantined")
        latencies = [watch.quarantined_at[n] - injected[n] for n in targets]
        kubectl("delete", "tc", cluster, "--timeout=900s")
    finally:
        operator.terminate()
        agent.terminate()
        operator.wait(30)
        agent.wait(30)
    return (f"{count:>6} {len(latencies):>7} {statistics.median(latencies):>8.2f} "
            f"{percentile(latencies, 0.99):>8.2f} {max(latencies):>8.2f} "
            f"{steady * 100:>12.1f} {steady / count * 1e6:>14.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, action="append")
    parser.add_argument("--faults", type=int, default=100, help="faults injected per run (0.1 s apart)")
    args = parser.parse_args()
    external = os.environ.get("GPUCLUSTER_KUBECONFIG")
    state_dir = REPO / ".local-cluster" / "bench-health"
    if not external:
        devcluster.down(state_dir)
        state = devcluster.up(state_dir)
    kubeconfig = external or state.kubeconfig
    kubectl_bin = str(devcluster.bin_dir() / "kubectl")

    def kubectl(*argv: str, input: str | None = None) -> str:
        return subprocess.run([kubectl_bin, f"--kubeconfig={kubeconfig}", *argv], input=input, text=True,
                              capture_output=True, check=True).stdout

    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))
    kubectl("apply", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "crd", "--all")
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "gpucluster-bench-health"
    log_dir.mkdir(exist_ok=True)
    try:
        print(f"{'nodes':>6} {'faults':>7} {'p50 s':>8} {'p99 s':>8} {'max s':>8} "
              f"{'agent %core':>12} {'agent µs/node/s':>14}", flush=True)
        for count in args.nodes or [1000]:
            print(run(count, args.faults, kubeconfig, core, kubectl, log_dir), flush=True)
    finally:
        if not external:
            devcluster.down(state_dir)
    print(f"(logs: {log_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
