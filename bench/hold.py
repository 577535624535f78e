"""Hold benchmark: can the local cluster keep N KWOK nodes Ready, with the
Node traffic of real kubelets, on this machine?

    python bench/hold.py --nodes 25000 [--hold 300] [--every 20] [--timeout 1800]
                         [--kwok-shards K] [--lease-seconds S]

Creates N GPU nodes (bench/provision.py's manifests, by a plain client) and,
from the first create until all have been Ready for --hold seconds (or
--timeout), prints every --every seconds: nodes created and Ready, how many
ever went from Ready to not, Lease renewals/s and Node status writes/s (the
API server's request counters), status posts/s as a node watch sees them,
and the CPU (cores) of KWOK, the API server, etcd and the controller
manager, beside the machine's load (KWOK's: all its controllers). A last
line sums up the hold. A local control plane is started for the run (or
GPUCLUSTER_KUBECONFIG names a running one).
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import BenchCluster, bench_cluster, cpu_seconds, simulator_args, watch_nodes
from gpucluster import devcluster, names
from gpucluster.kube.client import CONCURRENCY
from prometheus_client.parser import text_string_to_metric_families
from provision import manifests

COMPONENTS = ("kwok", "kube-apiserver", "etcd", "kube-controller-manager")
# (resource, subresource, verb) of the API server's request counter: what
# kubelets (here KWOK) write to stay Ready.
LEASE_RENEWALS = ("leases", "", "PUT")
STATUS_WRITES = ("nodes", "status", "PATCH")


class NodeTally:
    """Nodes Ready now, nodes that ever left Ready, and status posts (a new
    lastHeartbeatTime on a Ready node), from one raw node watch."""

    def __init__(self, bench: BenchCluster, selector: str) -> None:
        self.lock = threading.Lock()
        self.created = 0
        self.ready: set[str] = set()
        self.heartbeats: dict[str, str] = {}
        self.flapped: set[str] = set()
        self.posts = 0
        watch_nodes(bench.core, selector, self._see)

    def _see(self, kind: str, node: dict[str, Any]) -> bool:
        name = node["metadata"]["name"]
        condition = next((c for c in node.get("status", {}).get("conditions") or [] if c["type"] == "Ready"), {})
        with self.lock:
            if kind != "DELETED" and condition.get("status") == "True":
                beat = condition.get("lastHeartbeatTime", "")
                if name in self.heartbeats and self.heartbeats[name] != beat:
                    self.posts += 1
                self.heartbeats[name] = beat
                self.ready.add(name)
            else:
                if name in self.ready:
                    self.flapped.add(name)
                self.ready.discard(name)
                self.heartbeats.pop(name, None)
        return False


def api_requests(state_dir: Path, server: str) -> dict[tuple[str, str, str], float]:
    """The API server's apiserver_request_total, summed over codes and scopes."""
    pki = state_dir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    with urllib.request.urlopen(f"{server}/metrics", context=ctx, timeout=60) as resp:
        text = resp.read().decode()
    totals: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            if sample.name == "apiserver_request_total":
                key = (sample.labels.get("resource", ""), sample.labels.get("subresource", ""),
                       sample.labels.get("verb", ""))
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


@dataclass
class Sample:
    at: float
    requests: dict[tuple[str, str, str], float]
    cpu: dict[str, float]
    posts: int


HEADER = (f"{'s':>5} {'created':>7} {'Ready':>7} {'flapped':>7} {'leases/s':>9} {'status/s':>9} {'posts/s':>8}  "
          + " ".join(f"{name.removeprefix('kube-'):>18}" for name in COMPONENTS) + f" {'load1':>6}")


def report(before: Sample, after: Sample, tally: NodeTally, since: float) -> str:
    elapsed = after.at - before.at

    def per_second(key: tuple[str, str, str]) -> float:
        return (after.requests.get(key, 0.0) - before.requests.get(key, 0.0)) / elapsed

    with tally.lock:
        counts = f"{tally.created:>7} {len(tally.ready):>7} {len(tally.flapped):>7}"
    cores = " ".join(f"{(after.cpu[n] - before.cpu[n]) / elapsed:>18.2f}" for n in COMPONENTS)
    return (f"{after.at - since:>5.0f} {counts} {per_second(LEASE_RENEWALS):>9.0f} "
            f"{per_second(STATUS_WRITES):>9.1f} {(after.posts - before.posts) / elapsed:>8.1f}  {cores} "
            f"{os.getloadavg()[0]:>6.1f}")


def run(bench: BenchCluster, count: int, hold: float, every: float, timeout: float) -> bool:
    """Creates the nodes and reports until all held Ready for `hold` s, or
    `timeout` s passed; says whether they held."""
    state = devcluster.ClusterState.load(bench.state_dir)
    if state is None:
        raise SystemExit(f"no cluster state in {bench.state_dir}: its processes' CPU can't be read")
    pids = {name: [pid for component, pid in state.pids.items() if devcluster.binary_of(component) == name]
            for name in COMPONENTS}
    cluster = f"hold{int(time.time()) % 100000}"
    tally = NodeTally(bench, f"{names.LABEL_CLUSTER}={cluster}")

    def sample() -> Sample:
        with tally.lock:
            posts = tally.posts
        return Sample(time.monotonic(), api_requests(bench.state_dir, state.server),
                      {n: sum(cpu_seconds(p) for p in ps) for n, ps in pids.items()}, posts)

    def create(body: dict[str, Any]) -> None:
        bench.core.create_node(body, _preload_content=False)
        with tally.lock:
            tally.created += 1

    print(HEADER, flush=True)
    first = last = sample()
    pool = ThreadPoolExecutor(CONCURRENCY)
    all_ready: Sample | None = None
    try:
        pool.map(create, manifests(cluster, count))
        while last.at - first.at < timeout and not (all_ready and last.at - all_ready.at >= hold):
            time.sleep(every)
            now = sample()
            print(report(last, now, tally, first.at), flush=True)
            with tally.lock:
                if all_ready is None and len(tally.ready) == count:
                    all_ready = now
            last = now
    finally:
        # Creates still queued when it gives up (or is interrupted) are dropped.
        pool.shutdown(wait=False, cancel_futures=True)
    with tally.lock:
        held = all_ready is not None and not tally.flapped and len(tally.ready) == count
    if all_ready is not None:
        print(f"all {count} Ready {all_ready.at - first.at:.0f} s after the first create; over the "
              f"{last.at - all_ready.at:.0f} s after:")
        print(report(all_ready, last, tally, first.at))
    print(f"{'held' if held else 'did not hold'}: {count} nodes (CPU in cores; machine: {os.cpu_count()} CPUs)")
    return held


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=300, help="seconds to watch once all are Ready")
    parser.add_argument("--every", type=float, default=20, help="seconds between report lines")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds from the first create to give up")
    parser.add_argument("--kwok-shards", type=devcluster.kwok_shard_count, default=1,
                        help="KWOK controllers sharing the nodes")
    parser.add_argument("--lease-seconds", type=int, default=40,
                        help="KWOK's node Lease duration, renewed every quarter of it (0: no Leases)")
    args = parser.parse_args()
    with bench_cluster("hold", simulator_args(args.lease_seconds), args.kwok_shards) as bench:
        held = run(bench, args.nodes, args.hold, args.every, args.timeout)
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
