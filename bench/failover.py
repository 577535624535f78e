"""Failover benchmark: the time from SIGKILL of the active operator replica to
the first node the standby creates for a pool scaled right after the kill.

    python bench/failover.py [--kills 5] [--peering-lifetime 6]

Two `gpucluster run --peering` replicas share a ClusterKopfPeering; before
each kill the standby is up and paused, and the killed replica is started
again (it stands by for the next kill). A local control plane is started for
the run (or GPUCLUSTER_KUBECONFIG names a running one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import REPO, BenchCluster, bench_cluster, watch_nodes
from gpucluster import names

PEERING = "failover-bench"


class Replica:
    def __init__(self, bench: BenchCluster, name: str, log_dir: Path, lifetime: int) -> None:
        self.bench, self.name, self.log_dir, self.lifetime = bench, name, log_dir, lifetime
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        self.proc = self.bench.gpucluster(
            "run", "--peering", PEERING, "--peering-lifetime", str(self.lifetime), "--metrics-port", "0",
            "--liveness-port", "0", log=self.log, env={"POD_ID": self.name})

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def live_peers(bench: BenchCluster) -> dict[str, int]:
    """The replicas whose keep-alive in the peering object counts, and their priorities."""
    peers = json.loads(bench.kubectl("get", "clusterkopfpeering", PEERING, "-o", "json")).get("status") or {}
    now = datetime.now(UTC)
    return {name: peer["priority"] for name, peer in peers.items()
            if (now - datetime.fromisoformat(peer["lastseen"])).total_seconds() < peer["lifetime"]}


def restarted(bench: BenchCluster, name: str, old_priority: int) -> Any:
    """A check: the replica's keep-alive comes from a new process (a new priority)."""
    return lambda: live_peers(bench).get(name, old_priority) != old_priority


class NodeCounter:
    """Signals when the cluster's node count reaches a target."""

    def __init__(self, bench: BenchCluster, cluster: str) -> None:
        self.nodes: set[str] = set()
        self.target = 0
        self.reached = threading.Event()
        watch_nodes(bench.core, f"{names.LABEL_CLUSTER}={cluster}", self._see)

    def _see(self, kind: str, node: dict[str, Any]) -> bool:
        name = node["metadata"]["name"]
        if kind == "DELETED":
            self.nodes.discard(name)
        else:
            self.nodes.add(name)
        if self.target and len(self.nodes) >= self.target:
            self.reached.set()
        return False

    def expect(self, target: int) -> None:
        self.reached.clear()
        self.target = target
        if len(self.nodes) >= target:
            self.reached.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--peering-lifetime", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="gpucluster-failover-"))
    cluster = f"failover{int(time.time()) % 100000}"
    with bench_cluster("failover") as bench:
        bench.kubectl("apply", "-f", str(REPO / "helm" / "gpucluster" / "crds" / "kopf.dev_peerings.yaml"))
        bench.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev")
        bench.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}))
        replicas = [Replica(bench, name, log_dir, args.peering_lifetime) for name in ("a", "b")]
        counter = NodeCounter(bench, cluster)
        try:
            replicas[0].start()
            nodes = 1
            counter.expect(nodes)
            bench.kubectl("apply", "-f", "-", input=json.dumps({
                "apiVersion": names.API_VERSION, "kind": "TrainingCluster", "metadata": {"name": cluster},
                "spec": {"pools": [{"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": nodes,
                                    "topology": {"nodesPerRack": 4, "racksPerBlock": 8}}]}}))
            if not counter.reached.wait(args.timeout):
                raise SystemExit(f"the first replica made no node; log: {replicas[0].log}")
            replicas[1].start()
            times = []
            for kill in range(1, args.kills + 1):
                # A replica starts paused and stays so beside a live leader of a
                # higher priority: both keep-alives there, the other one stands by.
                wait(lambda: len(live_peers(bench)) == 2, args.timeout, "both replicas' keep-alives")
                peers = live_peers(bench)
                active = next(r for r in replicas if r.name == max(peers, key=lambda name: peers[name]))
                standby = next(r for r in replicas if r is not active)
                nodes += 1
                counter.expect(nodes)
                active.kill()
                killed = time.monotonic()
                bench.kubectl("patch", "tc", cluster, "--type=json", "-p", json.dumps(
                    [{"op": "replace", "path": "/spec/pools/0/nodes", "value": nodes}]))
                if not counter.reached.wait(args.timeout):
                    raise SystemExit(f"no node {args.timeout} s after kill {kill}; log: {standby.log}")
                times.append(time.monotonic() - killed)
                print(f"kill {kill}: {active.name} killed, {standby.name} created the node "
                      f"{times[-1]:.1f} s later", flush=True)
                active.start()
                wait(restarted(bench, active.name, peers[active.name]), args.timeout,
                     f"{active.name}'s new keep-alive; log: {active.log}")
            print(f"failover over {len(times)} kills (peering lifetime {args.peering_lifetime} s): "
                  f"{', '.join(f'{t:.1f}' for t in times)} s; median {statistics.median(times):.1f} s")
            bench.kubectl("delete", "tc", cluster, "--timeout=120s")
        finally:
            for replica in replicas:
                replica.stop()
    print(f"(replica logs: {log_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
