"""Provisioning benchmark: time from `kubectl apply` of a TrainingCluster to
all of its N nodes Ready, against the raw rate at which a plain client makes
the same Node objects Ready on the same API server, in the same run.

    python bench/provision.py --nodes 1000 [--nodes 5000 ...] [--provider karpenter]

Both sides end at the same line (every node Ready, as KWOK reports it), use
the same Node manifests and the same client concurrency, so the ratio is the
operator's own overhead. A local control plane is started for the run (or
GPUCLUSTER_KUBECONFIG names a running one). KWOK is set up as for
bench/colossus.py at the largest count (`--kwok-shards`, `--lease-seconds`),
so `--nodes 25000` gives the raw rate over the whole 0 to 25,000 that
colossus only samples at its two ends (about an hour: 25,000 raw creates and
their deletes, then the operator's).

`--provider karpenter` adds a karpenter pool beside the kwok one: the
operator writes one NodePool and Karpenter's own KWOK provider (built by
hack/build-karpenter.sh) launches the NodeClaims and creates the nodes, so
its column is Karpenter's pace plus the operator's labelling of each node.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
from common import (
    BenchCluster,
    add_simulator_arguments,
    bench_cluster,
    simulator_args,
    simulator_settings,
    simulator_summary,
    watch_nodes,
)
from gpucluster import devkarpenter, names
from gpucluster.api.gpus import GPUProduct
from gpucluster.kube.client import CONCURRENCY
from gpucluster.kube.nodes import PoolNodeTemplate
from gpucluster.planning.pools import PoolProvider, PoolShape, plan_pool
from tqdm import tqdm

NODES_PER_RACK, RACKS_PER_BLOCK = 4, 8
NODE_CLASS = "bench"


class ReadyCounter:
    """Signals once `target` nodes of the selector are Ready, and shows on
    stderr how many are as it goes: Ready / desired, rate, estimate."""

    def __init__(self, bench: BenchCluster, selector: str, target: int, what: str) -> None:
        self.target = target
        self.ready: set[str] = set()
        self.done = threading.Event()
        self.bar = tqdm(total=target, desc=f"{what}: nodes Ready", unit="node", mininterval=1, leave=False)
        watch_nodes(bench.core, selector, self._see)

    def _see(self, kind: str, node: dict[str, Any]) -> bool:
        name = node["metadata"]["name"]
        if kind != "DELETED" and any(c["type"] == "Ready" and c["status"] == "True"
                                     for c in node.get("status", {}).get("conditions", [])):
            self.ready.add(name)
        else:
            self.ready.discard(name)
        self.bar.update(len(self.ready) - self.bar.n)
        if len(self.ready) >= self.target:
            self.done.set()
        return self.done.is_set()

    def wait(self, timeout: float) -> bool:
        try:
            return self.done.wait(timeout)
        finally:
            self.bar.close()


def manifests(cluster: str, count: int) -> list[dict[str, Any]]:
    shape = PoolShape(cluster=cluster, name="h100", provider=PoolProvider.KWOK, desired_nodes=count,
                      gpus_per_node=8, nodes_per_rack=NODES_PER_RACK, racks_per_block=RACKS_PER_BLOCK)
    template = PoolNodeTemplate(shape=shape, gpu=GPUProduct.H100_80GB_HBM3)
    return [template.kwok_node(n) for n in plan_pool(shape, []).create]


def raw_create(bench: BenchCluster, count: int, timeout: float, cluster: str = "") -> float:
    """A plain client creating the same nodes with the same concurrency,
    labelled as TrainingCluster `cluster`'s (default: a fresh name); the
    seconds until all were Ready. The nodes are deleted after, also when
    they were not all Ready in time."""
    cluster = cluster or f"raw{int(time.time()) % 100000}"
    bodies = manifests(cluster, count)
    counter = ReadyCounter(bench, f"{names.LABEL_CLUSTER}={cluster}", count, "raw")
    start = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda b: bench.core.create_node(b, _preload_content=False), bodies))
    ready = counter.wait(timeout)
    elapsed = time.monotonic() - start
    delete_nodes(bench, [b["metadata"]["name"] for b in bodies])
    if not ready:
        raise SystemExit(f"raw: only {len(counter.ready)}/{count} Ready after {timeout} s")
    return elapsed


def delete_nodes(bench: BenchCluster, node_names: list[str], attempts: int = 10) -> None:
    """Deletes the nodes by name, concurrently. Not one deletecollection: on
    an API server holding 25,000 nodes that lists them all from etcd for a
    label selector, outlasts its request timeout, and the server drops the
    connection; a delete by name costs the same at any size. A failed delete
    (the server too busy to answer) is tried again."""
    def delete(name: str) -> None:
        for attempt in range(attempts):
            try:
                bench.core.delete_node(name, _preload_content=False)
                return
            except kubernetes.client.ApiException as err:
                if err.status == 404:
                    return
                if err.status not in (429, 500, 503, 504) or attempt == attempts - 1:
                    raise
            except urllib3.exceptions.HTTPError:
                if attempt == attempts - 1:
                    raise
            time.sleep(2.0)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(delete, node_names))


def operator_create(bench: BenchCluster, count: int, timeout: float, provider: str) -> float:
    cluster = f"{provider[:4]}{int(time.time()) % 100000}"
    counter = ReadyCounter(bench, f"{names.LABEL_CLUSTER}={cluster}", count, provider)
    pool: dict[str, Any] = {"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": count, "provider": provider,
                            "topology": {"nodesPerRack": NODES_PER_RACK, "racksPerBlock": RACKS_PER_BLOCK}}
    if provider == PoolProvider.KARPENTER:
        pool["nodeClassRef"] = {"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": NODE_CLASS}
    manifest = {"apiVersion": names.API_VERSION, "kind": "TrainingCluster", "metadata": {"name": cluster},
                "spec": {"pools": [pool]}}
    start = time.monotonic()
    bench.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    if not counter.wait(timeout):
        raise SystemExit(f"{provider}: only {len(counter.ready)}/{count} Ready after {timeout} s")
    elapsed = time.monotonic() - start
    bench.kubectl("delete", "tc", cluster, "--timeout=600s")
    return elapsed


def wait_gone(bench: BenchCluster, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not bench.core.list_node(label_selector=names.LABEL_CLUSTER, limit=1).items:
            return
        time.sleep(1)


def start_karpenter(bench: BenchCluster, state_dir: Path) -> None:
    """Karpenter's KWOK provider on the bench cluster, and its node class."""
    bin_dir = devkarpenter.build()
    devkarpenter.up(state_dir, bench.kubeconfig, bin_dir)
    bench.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "karpenter.kwok.sh/v1alpha1", "kind": "KWOKNodeClass", "metadata": {"name": NODE_CLASS}}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, action="append", help="node counts to run (repeatable)")
    parser.add_argument("--provider", action="append", choices=[PoolProvider.KWOK, PoolProvider.KARPENTER],
                        help="providers to run beside the raw rate (repeatable; default kwok; karpenter "
                             "runs kwok too, for comparison)")
    parser.add_argument("--timeout", type=float, default=1800)
    add_simulator_arguments(parser)
    args = parser.parse_args()
    counts = args.nodes or [1000]
    providers = [PoolProvider.KWOK] + [p for p in args.provider or [] if p != PoolProvider.KWOK]
    logs = Path(tempfile.mkdtemp(prefix="gpucluster-bench-"))
    lease_seconds, kwok_shards = simulator_settings(args, max(counts))
    print(simulator_summary(lease_seconds, kwok_shards, max(counts)), file=sys.stderr, flush=True)
    with bench_cluster("bench", simulator_args(lease_seconds), kwok_shards) as bench:
        if PoolProvider.KARPENTER in providers:
            start_karpenter(bench, logs)
        operator = bench.gpucluster("run", "--metrics-port", "0", "--liveness-port", "0",
                                    log=logs / "operator.log")
        try:
            time.sleep(3)
            header = f"{'nodes':>7} {'raw s':>8} {'raw nodes/s':>12}"
            for provider in providers:
                header += f" {provider + ' s':>12} {provider + ' nodes/s':>18} {'ratio':>6}"
            print(header, flush=True)
            for count in counts:
                raw = raw_create(bench, count, args.timeout)
                row = f"{count:>7} {raw:>8.1f} {count / raw:>12.0f}"
                for provider in providers:
                    ours = operator_create(bench, count, args.timeout, provider)
                    wait_gone(bench)
                    row += f" {ours:>12.1f} {count / ours:>18.0f} {raw / ours:>6.2f}"
                print(row, flush=True)
        finally:
            operator.terminate()
            operator.wait(30)
            devkarpenter.down(logs)
    print(f"(operator and Karpenter logs: {logs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
