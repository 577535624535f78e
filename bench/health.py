"""GPU-health benchmark: time from an injected GPU fault to the node
quarantined (cordoned and tainted nvidia.com/gpu-error), p50 and p99, and the
CPU the fleet agent spends per node, on N fake nodes.

    python bench/health.py --nodes 1000 [--nodes 5000] [--faults 100] [--storm 0.5 --storm-budget 10%]

With --storm, a fraction of the pool then fails at once against a budget:
the line after the row says how many nodes were ever out together.

The path measured is the whole product path: annotation -> fleet agent
(fake backend) -> GPUHealthy=False on the Node -> operator's node event ->
remediation plan -> cordon + taint. A local control plane is started for the
run (or GPUCLUSTER_KUBECONFIG names a running one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BenchCluster, bench_cluster, cpu_seconds, watch_nodes
from gpucluster import names
from gpucluster.kube.client import read_reply


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class NodeHealthWatch:
    """When each node became quarantined, and which are Ready and GPUHealthy."""

    def __init__(self, bench: BenchCluster, selector: str) -> None:
        self.quarantined_at: dict[str, float] = {}
        self.unhealthy_at: dict[str, float] = {}
        self.healthy: set[str] = set()
        self.judged: set[str] = set()  # shown GPUHealthy=True at least once: the agent's first write landed
        self.ready: set[str] = set()
        self.out: set[str] = set()  # tainted nvidia.com/gpu-error now
        self.deleted_at: dict[str, float] = {}
        self.most_out = 0
        watch_nodes(bench.core, selector, self._see)

    def _see(self, kind: str, node: dict[str, Any]) -> bool:
        name = node["metadata"]["name"]
        taints = node["spec"].get("taints") or []
        if kind != "DELETED" and any(t["key"] == names.TAINT_GPU_ERROR for t in taints):
            self.quarantined_at.setdefault(name, time.time())
            self.out.add(name)
            self.most_out = max(self.most_out, len(self.out))
        else:
            self.out.discard(name)
        if kind == "DELETED":
            self.deleted_at.setdefault(name, time.time())
        conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        if conditions.get(names.CONDITION_GPU_HEALTHY) == "False" and name not in self.unhealthy_at:
            self.unhealthy_at[name] = time.time()
        if kind != "DELETED" and conditions.get("Ready") == "True":
            self.ready.add(name)
        else:
            self.ready.discard(name)
        if kind != "DELETED" and conditions.get(names.CONDITION_GPU_HEALTHY) == "True":
            self.judged.add(name)
        if name in self.ready and conditions.get(names.CONDITION_GPU_HEALTHY) == "True":
            self.healthy.add(name)
        else:
            self.healthy.discard(name)
        return False


def wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def inject(bench: BenchCluster, nodes: list[str], spacing_s: float,
           injected: dict[str, float] | None = None, patch_s: list[float] | None = None) -> dict[str, float]:
    """XID 79 on one GPU of each node; returns when each fault was on its
    Node (the patch answered), in `injected` when given (filled as it goes: on
    a loaded API server each patch takes seconds), and how long each patch
    took in `patch_s`. A real fault is on the node when it happens; the time
    this client's write spends queued at the API server is not the product's."""
    injected = {} if injected is None else injected
    for index, node in enumerate(nodes):
        sent = time.time()
        read_reply(bench.core.patch_node(node, {"metadata": {"annotations": {
            "gpucluster.dev/inject-fault": f"gpu={index % 8},xid=79"}}}, _preload_content=False))
        injected[node] = time.time()
        if patch_s is not None:
            patch_s.append(injected[node] - sent)
        time.sleep(spacing_s)
    return injected


def storm(bench: BenchCluster, cluster: str, count: int, watch: NodeHealthWatch, fraction: float,
          budget: str) -> str:
    """Faults on `fraction` of the healthy nodes, as fast as one client
    writes them, against a pool budget of `budget`: how many nodes are ever
    out at once, and how long until the budget is used up."""
    bench.kubectl("patch", "tc", cluster, "--type=json", "-p", json.dumps([{
        "op": "replace", "path": "/spec/pools/0/remediation/maxUnavailable",
        "value": int(budget) if budget.isdigit() else budget}]))
    allowed = int(budget) if budget.isdigit() else max(1, count * int(budget.rstrip("%")) // 100)
    out_before = len(watch.out)
    healthy = sorted(watch.healthy - watch.out)
    targets = healthy[:: max(1, round(1 / fraction))][: int(len(healthy) * fraction)]
    watch.most_out = len(watch.out)
    started = time.time()
    injected = inject(bench, targets, 0)
    injected_s = time.time() - started
    wait(lambda: len(watch.out) >= allowed, 300, f"{allowed} nodes out")
    # The budget is full at the quarantine that took the last free place; the
    # fault behind it was injected at most that long before.
    storm_quarantines = sorted(watch.quarantined_at[n] for n in targets if n in watch.quarantined_at)
    last_admitted = storm_quarantines[allowed - out_before - 1]
    full_s = last_admitted - started
    lag_s = last_admitted - max(injected[n] for n in targets
                                if watch.quarantined_at.get(n, float("inf")) <= last_admitted)
    time.sleep(30)  # the storm keeps knocking: nothing more may go out
    status = json.loads(bench.kubectl("get", "tc", cluster, "-o", "json"))["status"]
    waiting = len((status.get("remediation") or {}).get("h100", {}).get("waiting") or [])
    degraded = next((c for c in status.get("conditions") or [] if c["type"] == "Degraded"), {})
    return (f"storm: {len(targets)} faults on {count} nodes ({out_before} already out) in {injected_s:.1f} s, "
            f"budget {budget} = {allowed} out: most out at once {watch.most_out}, budget full after "
            f"{full_s:.1f} s ({lag_s:.2f} s after the last admitted fault), {waiting} reported waiting, "
            f"Degraded={degraded.get('status')} "
            f"({degraded.get('reason')})")


def run(bench: BenchCluster, count: int, faults: int, log_dir: Path, storm_fraction: float,
        storm_budget: str) -> str:
    cluster = f"health{count}"
    operator = bench.gpucluster("run", "--metrics-port", "0", "--liveness-port", "0",
                                log=log_dir / f"operator-{count}.log")
    agent = bench.gpucluster("agent", "--backend", "fake", "--fleet", "--node-selector",
                             f"{names.LABEL_CLUSTER}={cluster}", "--metrics-port", "0",
                             log=log_dir / f"agent-{count}.log")
    try:
        watch = NodeHealthWatch(bench, f"{names.LABEL_CLUSTER}={cluster}")
        bench.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": names.API_VERSION, "kind": "TrainingCluster", "metadata": {"name": cluster},
            "spec": {"pools": [{"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": count,
                                "remediation": {"maxUnavailable": "100%", "replace": False}}]}}))
        wait(lambda: len(watch.healthy) >= count, 1800, f"{count} nodes Ready and GPUHealthy")
        time.sleep(5)
        cpu_before, wall_before = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(30)
        steady = (cpu_seconds(agent.pid) - cpu_before) / (time.monotonic() - wall_before)

        print(f"{count} nodes healthy; injecting faults", file=sys.stderr, flush=True)
        targets = sorted(watch.healthy)[:: max(1, count // faults)][:faults]
        injected = inject(bench, targets, 0.1)
        wait(lambda: all(n in watch.quarantined_at for n in targets), 300, "every faulty node quarantined")
        latencies = [watch.quarantined_at[n] - injected[n] for n in targets]
        agent_part = [watch.unhealthy_at.get(n, watch.quarantined_at[n]) - injected[n] for n in targets]
        storm_line = storm(bench, cluster, count, watch, storm_fraction, storm_budget) if storm_fraction else ""
        bench.kubectl("delete", "tc", cluster, "--timeout=900s")
    finally:
        for process in (operator, agent):
            process.terminate()
            process.wait(30)
    return (f"{count:>6} {len(latencies):>7} {statistics.median(latencies):>8.2f} "
            f"{percentile(latencies, 0.99):>8.2f} {max(latencies):>8.2f} "
            f"{steady * 100:>12.1f} {steady / count * 1e6:>14.0f} "
            f"{statistics.median(agent_part):>14.2f} {percentile(agent_part, 0.99):>14.2f}"
            + (f"\n  {storm_line}" if storm_line else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, action="append")
    parser.add_argument("--faults", type=int, default=100, help="faults injected per run (0.1 s apart)")
    parser.add_argument("--storm", type=float, default=0.0, metavar="FRACTION",
                        help="then fault this fraction of the healthy nodes at once (0.5: half the pool)")
    parser.add_argument("--storm-budget", default="10%",
                        help="the pool's remediation.maxUnavailable during the storm (count or percent)")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="gpucluster-bench-health-"))
    with bench_cluster("bench-health") as bench:
        print(f"{'nodes':>6} {'faults':>7} {'p50 s':>8} {'p99 s':>8} {'max s':>8} "
              f"{'agent %core':>12} {'agent µs/node/s':>14} {'to condition p50':>14} "
              f"{'to condition p99':>14}", flush=True)
        for count in args.nodes or [1000]:
            print(run(bench, count, args.faults, log_dir, args.storm, args.storm_budget), flush=True)
    print(f"(logs: {log_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
