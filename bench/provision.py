"""Provisioning benchmark: time from `kubectl apply` of a TrainingCluster to
all of its N nodes Ready, against the raw rate at which a plain client makes
the same Node objects Ready on the same API server, in the same run.

    python bench/provision.py --nodes 1000 [--nodes 5000 ...]

Both sides end at the same line (every node Ready, as KWOK reports it), use
the same Node manifests and the same client concurrency, so the ratio is the
operator's own overhead. A local control plane is started for the run (or
GPUCLUSTER_KUBECONFIG names a running one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))

from gpucluster import devcluster, names  # noqa: E402
from gpucluster.api.gpus import GPUProduct  # noqa: E402
from gpucluster.kube.client import CONCURRENCY  # noqa: E402
from gpucluster.kube.nodes import PoolNodeTemplate  # noqa: E402
from gpucluster.planning.pools import PoolProvider, PoolShape, plan_pool  # noqa: E402

NODES_PER_RACK, RACKS_PER_BLOCK = 4, 8


class ReadyWatcher:
    """Counts nodes of a label selector that are Ready, from one watch stream
    (raw JSON: the client's model decoding would be the bottleneck)."""

    def __init__(self, core: kubernetes.client.CoreV1Api, selector: str, target: int) -> None:
        self.core, self.selector, self.target = core, selector, target
        self.ready: set[str] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        resource_version = "0"
        while not self.done.is_set():
            stream = self.core.list_node(watch=True, label_selector=self.selector,
                                         resource_version=resource_version,
                                         allow_watch_bookmarks=True, timeout_seconds=300,
                                         _preload_content=False)
            buffer = b""
            for chunk in stream.stream(1 << 16):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    event = json.loads(line)
                    obj = event["object"]
                    resource_version = obj["metadata"].get("resourceVersion", resource_version)
                    if event["type"] == "BOOKMARK":
                        continue
                    name = obj["metadata"]["name"]
                    ready = any(c["type"] == "Ready" and c["status"] == "True"
                                for c in obj.get("status", {}).get("conditions", []))
                    if ready and event["type"] != "DELETED":
                        self.ready.add(name)
                    else:
                        self.ready.discard(name)
                    if len(self.ready) >= self.target:
                        self.done.set()
                        stream.close()
                        return

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)


def manifests(cluster: str, count: int) -> list[dict[str, Any]]:
    shape = PoolShape(cluster=cluster, name="h100", provider=PoolProvider.KWOK, desired_nodes=count,
                      gpus_per_node=8, nodes_per_rack=NODES_PER_RACK, racks_per_block=RACKS_PER_BLOCK)
    template = PoolNodeTemplate(shape=shape, gpu=GPUProduct.H100_80GB_HBM3)
    return [template.kwok_node(n) for n in plan_pool(shape, []).create]


def raw_create(core: kubernetes.client.CoreV1Api, count: int, timeout: float) -> float:
    """A plain client creating the same nodes with the same concurrency."""
    cluster = f"raw{int(time.time()) % 100000}"
    bodies = manifests(cluster, count)
    watcher = ReadyWatcher(core, f"{names.LABEL_CLUSTER}={cluster}", count)
    start = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda b: core.create_node(b, _preload_content=False), bodies))
    if not watcher.wait(timeout):
        raise SystemExit(f"raw: only {len(watcher.ready)}/{count} Ready after {timeout} s")
    elapsed = time.monotonic() - start
    core.delete_collection_node(label_selector=f"{names.LABEL_CLUSTER}={cluster}")
    return elapsed


def operator_create(core: kubernetes.client.CoreV1Api, kubectl: Callable[..., str], count: int,
                    timeout: float) -> float:
    cluster = f"op{int(time.time()) % 100000}"
    watcher = ReadyWatcher(core, f"{names.LABEL_CLUSTER}={cluster}", count)
    manifest = {"apiVersion": names.API_VERSION, "kind": "TrainingCluster", "metadata": {"name": cluster},
                "spec": {"pools": [{"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": count,
                                    "topology": {"nodesPerRack": NODES_PER_RACK,
                                                 "racksPerBlock": RACKS_PER_BLOCK}}]}}
    start = time.monotonic()
    kubectl("apply", "-f", "-", input=json.dumps(manifest))
    if not watcher.wait(timeout):
        raise SystemExit(f"operator: only {len(watcher.ready)}/{count} Ready after {timeout} s")
    elapsed = time.monotonic() - start
    kubectl("delete", "tc", cluster, "--timeout=600s")
    return elapsed


def wait_gone(core: kubernetes.client.CoreV1Api, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not core.list_node(label_selector=names.LABEL_CLUSTER, limit=1).items:
            return
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, action="append", help="node counts to run (repeatable)")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    counts = args.nodes or [1000]

    external = os.environ.get("GPUCLUSTER_KUBECONFIG")
    state_dir = REPO / ".local-cluster" / "bench"
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
    configuration.connection_pool_maxsize = CONCURRENCY * 2
    core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))
    kubectl("apply", "-f", str(REPO / "crds"))
    kubectl("wait", "--for=condition=Established", "crd", "--all")

    with tempfile.NamedTemporaryFile(prefix="gpucluster-bench-operator-", suffix=".log", delete=False) as log:
        operator = subprocess.Popen([sys.executable, "-m", "gpucluster.cli", "run", "--metrics-port", "0",
                                     "--liveness-port", "0"], stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "KUBECONFIG": kubeconfig,
                                         "PYTHONPATH": str(REPO / "operator")})
    try:
        time.sleep(3)
        print(f"{'nodes':>7} {'raw s':>8} {'raw nodes/s':>12} {'operator s':>11} "
              f"{'operator nodes/s':>17} {'ratio':>6}")
        for count in counts:
            raw = raw_create(core, count, args.timeout)
            wait_gone(core)
            ours = operator_create(core, kubectl, count, args.timeout)
            wait_gone(core)
            print(f"{count:>7} {raw:>8.1f} {count / raw:>12.0f} {ours:>11.1f} {count / ours:>17.0f} "
                  f"{raw / ours:>6.2f}", flush=True)
    finally:
        operator.terminate()
        operator.wait(30)
        if not external:
            devcluster.down(state_dir)
    print(f"(operator log: {log.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
