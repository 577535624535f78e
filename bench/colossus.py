"""Colossus on one machine: one TrainingCluster of H100 and H200 nodes (3:1,
the real Colossus's 150,000 H100 and 50,000 H200 GPUs at 25,000 nodes) from
apply to jobs running, measured end to end in one run.

    python bench/colossus.py [--nodes 25000] [--jobs 1000] [--png colossus.png]

1. the raw node-create rate on this API server (on up to 2,000 nodes,
   `--raw-nodes`), then the TrainingCluster from apply to every node Ready,
   then the raw rate again on the API server holding the whole cluster:
   the ratio of the operator's nodes Ready per second to the raw rate at
   either end (per-node costs of the control plane grow with the nodes it
   holds, so the raw rate over the same range lies between the two);
2. a job trace (sizes 1 to 2,048 GPUs, three priorities, some required
   topology) submitted at once: submit-to-admitted p50/p99 from watch
   receive times, admitted jobs/s, and the planner's time for one job's
   decision and for a whole cycle, from the operator's histograms;
3. fatal XIDs through the fleet agent: fault-to-cordon p50/p99 and gangs
   restarted;
4. the operator restarted: time to its first admission cycle, and no node
   or worker pod made twice;
5. CPU seconds and peak RSS of the operator and the API server for each phase;
6. a table on stdout and a PNG timeline (nodes Ready, GPUs allocated, queue
   depth, faults and cordons) with matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, SupportsIndex

import kubernetes
from common import (
    BenchCluster,
    add_simulator_arguments,
    bench_cluster,
    cpu_seconds,
    simulator_args,
    simulator_settings,
    simulator_summary,
    watch_raw,
)
from gpucluster import devcluster, names
from gpucluster.kube.client import read_reply
from gpucluster.planning.remediation import RemediationBudget
from gpucluster.sim.trace import generate
from health import NodeHealthWatch, inject, percentile, wait
from provision import raw_create

H100_SHARE = 0.75
# The raw sample beside the whole cluster waits this long at most: where the
# node simulator has fallen behind, the jobs' part of the run still runs.
RAW_AT_FULL_SIZE_TIMEOUT_S = 600
SUBMITTERS = 8
PROFILE_RATE_HZ = 20
PROFILE_WINDOW_S = 60
ADMISSIONS_SETTLED_S = 60
# Each pool's remediation budget, maxUnavailable in percent of its nodes.
REMEDIATION_BUDGET_PERCENT = 5
# How long phase 3 waits for the faulty nodes to be drained and replaced.
REPLACED_WITHIN_S = 300
CYCLES_WITHOUT_ADMISSION = 2
PY_SPY = Path(sys.executable).parent / "py-spy"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pid_of(state_dir: Path, component: str) -> int | None:
    state = devcluster.status(state_dir)
    return state.pids.get(component) if state is not None else None


class Rows(list[tuple[str, str, str]]):
    """The table's rows, each also printed to stderr as it is measured: a run
    of an hour that fails late still leaves what it measured."""

    def append(self, row: tuple[str, str, str]) -> None:
        print("  ".join(row), file=sys.stderr, flush=True)
        super().append(row)

    def insert(self, index: SupportsIndex, row: tuple[str, str, str]) -> None:
        print("  ".join(row), file=sys.stderr, flush=True)
        super().insert(index, row)


class Timeline:
    """What the PNG draws, sampled from the watches once a second."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, int, int, int, int, int]] = []

    def sample(self, started: float, nodes: NodeHealthWatch, jobs: JobWatch, faults: int) -> None:
        self.rows.append((time.time() - started, len(nodes.healthy), jobs.allocated(), jobs.queued(),
                          faults, len(nodes.quarantined_at)))


class JobWatch:
    """When each job was first seen Admitted (watch receive time) and its GPUs."""

    def __init__(self, bench: BenchCluster) -> None:
        self.admitted_at: dict[str, float] = {}
        self.phase: dict[str, str] = {}
        self.gpus: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        # Followed until the control plane goes away, taken up again when the
        # server closes, cuts or expires the watch: a watch that died with its
        # first error saw nothing more, and phase 2 took that silence for
        # admissions settled (33 of 1,000 at 25,000 nodes).
        custom = kubernetes.client.CustomObjectsApi(bench.core.api_client)
        watch_raw(functools.partial(custom.list_cluster_custom_object, names.GROUP, names.VERSION, "trainingjobs"),
                  "", self._see)

    def _see(self, kind: str, job: dict[str, Any]) -> bool:
        name = job["metadata"]["name"]
        status = job.get("status") or {}
        phase = status.get("phase", "")
        self.phase[name] = phase
        self.gpus[name] = int(job["spec"]["workers"]) * int(job["spec"]["gpusPerWorker"])
        self.restarts[name] = int(status.get("restarts", 0))
        if phase in ("Admitted", "Running") and name not in self.admitted_at:
            self.admitted_at[name] = time.time()
        return False

    def allocated(self) -> int:
        return sum(self.gpus[n] for n, p in list(self.phase.items()) if p in ("Admitted", "Running"))

    def queued(self) -> int:
        return sum(1 for p in list(self.phase.values()) if p in ("Queued", "Restarting", ""))


class QuietAdmissions:
    """Admissions have settled when none came for ADMISSIONS_SETTLED_S and
    the planner has since decided whole cycles (CYCLES_WITHOUT_ADMISSION) and
    admitted nothing. Silence alone is not enough: at 25,000 nodes one cycle
    that places a 256-worker gang writes for minutes, and phase 2 ended with
    644 of 1,000 jobs admitted while the rest were on their way."""

    def __init__(self, cycles: Callable[[], float]) -> None:
        self._cycles = cycles  # how many cycles the planner has decided so far
        self._last_admission: float | None = None
        self._cycles_then = 0.0

    def settled(self, admitted_at: list[float], now: float) -> bool:
        if not admitted_at:
            return False
        last = max(admitted_at)
        if last != self._last_admission:
            self._last_admission, self._cycles_then = last, self._cycles()
            return False
        return (now - last > ADMISSIONS_SETTLED_S
                and self._cycles() - self._cycles_then >= CYCLES_WITHOUT_ADMISSION)


def metric(port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith(name)}


def histogram_quantile(buckets: dict[str, float], q: float) -> float:
    """Prometheus's histogram_quantile over one histogram's cumulative buckets."""
    edges = sorted((float("inf") if m.group(1) == "+Inf" else float(m.group(1)), count)
                   for key, count in buckets.items() if (m := re.search(r'le="([^"]+)"', key)))
    total = edges[-1][1] if edges else 0
    if not total:
        return 0.0
    rank, lower, below = q * total, 0.0, 0.0
    for edge, count in edges:
        if count >= rank:
            return edge if edge == float("inf") else lower + (edge - lower) * (rank - below) / max(count - below, 1)
        lower, below = edge, count
    return lower


def quantile_ms(buckets: dict[str, float], q: float) -> str:
    """A quantile in ms, or '> the largest finite bound' where it falls in
    the +Inf bucket (no estimate is possible there)."""
    value = histogram_quantile(buckets, q)
    if value != float("inf"):
        return f"{value * 1000:.0f}"
    bounds = [float(m.group(1)) for key in buckets if (m := re.search(r'le="([^"+]+)"', key))]
    return f"> {max(bounds, default=0) * 1000:.0f}"


# Where the operator's time goes, by the package a sample's stack passes
# through (a sample counts under each it passes through).
PROFILE_PACKAGES = {
    "Kopf's machinery": "(kopf/",
    "planning (decisions)": "(gpucluster/planning/",
    "Node and pod watches (ListWatcher)": "(gpucluster/kube/watch.py",
    "indexes": "(gpucluster/handlers/indexes.py",
    "kubernetes client": "(kubernetes/",
    "JSON": "(json/",
    "TLS reads and writes": "(ssl.py",
    "the event loop waiting (select)": "EpollSelector.select",
}


class Profiler:
    """py-spy on the operator for a window from the start of each phase."""

    def __init__(self, directory: Path | None, log_dir: Path) -> None:
        self.directory = directory
        self.log_dir = log_dir
        self.windows: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def window(self, phase: str, pid: int, young: bool = False) -> None:
        """`young`: the process has just started, and py-spy finds no
        interpreter in a process that young."""
        if self.directory is None:
            return
        if young:
            time.sleep(1)
        path = self.directory / f"phase-{phase}.raw"
        with open(self.log_dir / f"py-spy-{phase}.log", "wb") as log:
            self.windows.append((phase, path, subprocess.Popen(
                [str(PY_SPY), "record", "--pid", str(pid), "--format", "raw",
                 "--rate", str(PROFILE_RATE_HZ), "--nonblocking", "--duration", str(PROFILE_WINDOW_S),
                 "--output", str(path)], stdout=subprocess.DEVNULL, stderr=log)))

    def report(self) -> None:
        for phase, path, process in self.windows:
            process.wait(PROFILE_WINDOW_S + 60)
            what = f"phase {phase}, {PROFILE_WINDOW_S} s from its start"
            lines = profile_summary(path, what) if path.exists() else [f"py-spy: nothing recorded for {what}"]
            for line in lines:
                print(line, file=sys.stderr, flush=True)


def profile_summary(path: Path, what: str, top: int = 12) -> list[str]:
    """The functions that used the most CPU themselves, and the share of
    samples under each of PROFILE_PACKAGES, from py-spy's raw stacks."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[re.sub(r":\d+\)$", ")", frames[-1])] += count
        for label, marker in PROFILE_PACKAGES.items():
            if any(marker in frame for frame in frames):
                under[label] += count
    if not total:
        return [f"py-spy: no samples in {path}"]
    lines = [f"py-spy: {total} samples at {PROFILE_RATE_HZ} Hz of the operator's threads not idle by py-spy's "
             f"reckoning (a thread blocked in a TLS read counts), {what} ({path})"]
    lines += [f"  {100 * n / total:5.1f} %  under {label}" for label, n in under.most_common()]
    lines += [f"  {100 * n / total:5.1f} %  own   {frame}" for frame, n in own.most_common(top)]
    return lines


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def manifest(name: str, nodes: int) -> dict[str, Any]:
    h100 = round(nodes * H100_SHARE)
    return {"apiVersion": names.API_VERSION, "kind": "TrainingCluster", "metadata": {"name": name},
            "spec": {"pools": [
                {"name": "h100", "gpu": "H100-80GB-HBM3", "nodes": h100,
                 "topology": {"nodesPerRack": 4, "racksPerBlock": 8},
                 "remediation": {"maxUnavailable": f"{REMEDIATION_BUDGET_PERCENT}%"}},
                {"name": "h200", "gpu": "H200-141GB", "nodes": nodes - h100,
                 "topology": {"nodesPerRack": 4, "racksPerBlock": 8},
                 "remediation": {"maxUnavailable": f"{REMEDIATION_BUDGET_PERCENT}%"}}]}}


def job_manifest(job: Any, cluster: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"cluster": cluster, "gpu": job.gpu, "workers": job.workers,
                            "gpusPerWorker": job.gpus_per_worker, "priority": job.priority, "maxRestarts": 5,
                            "template": {"spec": {"containers": [{"name": "trainer", "image": "trainer"}]}}}
    if job.topology_level:
        spec["topology"] = {"level": job.topology_level, "mode": job.topology_mode}
    return {"apiVersion": names.API_VERSION, "kind": "TrainingJob",
            "metadata": {"name": job.id.replace("job-", "j"), "namespace": "default"}, "spec": spec}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=25000)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--faults", type=int, default=100)
    parser.add_argument("--png", type=Path, default=Path("colossus.png"))
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--raw-nodes", type=int, default=None,
                        help="nodes the raw side creates for its rate (default: all of --nodes up to 2,000). "
                             "A raw rate taken on an API server holding fewer nodes is the faster one, so a "
                             "sample only makes the ratio harder for the operator; at 25,000 nodes it saves "
                             "creating and deleting 23,000 nodes (over 40 minutes)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help=f"record the operator with py-spy for {PROFILE_WINDOW_S} s from the start of each "
                             "phase into DIR (py-spy's raw collapsed stacks, for flamegraph tools) and print "
                             "where its time went; windows, not the whole run: py-spy walking the operator's "
                             "threads 20 times a second took a third of a core")
    add_simulator_arguments(parser)
    args = parser.parse_args()
    if args.profile is not None and not PY_SPY.exists():
        parser.error(f"--profile needs py-spy, not found at {PY_SPY}: pip install -e '.[sim]'")
    lease_seconds, kwok_shards = simulator_settings(args, args.nodes)
    log_dir = Path(tempfile.mkdtemp(prefix="gpucluster-colossus-"))
    rows = Rows()
    timeline = Timeline()
    print(simulator_summary(lease_seconds, kwok_shards, args.nodes), file=sys.stderr, flush=True)
    with bench_cluster("bench-colossus", simulator_args(lease_seconds), kwok_shards) as bench:
        apiserver = pid_of(Path(bench.kubeconfig).parent, "kube-apiserver")

        def usage(phase: str, operator_pid: int, cpu0: tuple[float, float],
                  cpu1: tuple[float, float] | None = None) -> None:
            """CPU seconds from `cpu0` to `cpu1` (default: now), and peak RSS."""
            op1, api1 = cpu1 or cpu_now(operator_pid)
            op, api = op1 - cpu0[0], (api1 - cpu0[1]) if apiserver else 0
            rows.append((f"{phase}: CPU s operator / API server", f"{op:.0f} / {api:.0f}",
                         f"peak RSS operator {peak_rss_mib(operator_pid):.0f} MiB"
                         + (f", API server {peak_rss_mib(apiserver):.0f} MiB" if apiserver else "")))

        def cpu_now(operator_pid: int) -> tuple[float, float]:
            return cpu_seconds(operator_pid), cpu_seconds(apiserver) if apiserver else 0.0

        raw_nodes = args.raw_nodes or min(args.nodes, 2000)
        print(f"raw node creates: {raw_nodes} nodes", file=sys.stderr, flush=True)
        raw = raw_create(bench, raw_nodes, args.timeout)
        raw_rate = raw_nodes / raw
        metrics_port = free_port()
        operator = bench.gpucluster("run", "--metrics-port", str(metrics_port), "--liveness-port", "0",
                                    log=log_dir / "operator.log")
        profiler = Profiler(args.profile, log_dir)
        cluster = "colossus"
        agent = None
        try:
            nodes = NodeHealthWatch(bench, f"{names.LABEL_CLUSTER}={cluster}")
            jobs = JobWatch(bench)
            started = time.time()
            injected: dict[str, float] = {}  # node -> when its fault was on the Node
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.wait(1.0):
                    timeline.sample(started, nodes, jobs, len(injected))

            threading.Thread(target=sample, daemon=True).start()

            colossus = manifest(cluster, args.nodes)
            cpu0 = cpu_now(operator.pid)
            applied = time.monotonic()
            profiler.window("1", operator.pid)
            bench.kubectl("apply", "-f", "-", input=json.dumps(colossus))
            custom = kubernetes.client.CustomObjectsApi(bench.core.api_client)
            shown: list[str] = []  # status.nodes, `kubectl get tc`'s NODES column, as it grows

            def all_ready() -> bool:
                column = (custom.get_cluster_custom_object(names.GROUP, names.VERSION, "trainingclusters",
                                                           cluster).get("status") or {}).get("nodes", "")
                if column and (not shown or shown[-1] != column):
                    shown.append(column)
                return len(nodes.ready) >= args.nodes

            wait(all_ready, args.timeout, f"{args.nodes} nodes Ready")
            ours = time.monotonic() - applied
            cpu_provisioned = cpu_now(operator.pid)
            print(f"raw node creates beside the {args.nodes} nodes: {raw_nodes} nodes", file=sys.stderr, flush=True)
            try:
                raw_full: float | None = raw_create(bench, raw_nodes, RAW_AT_FULL_SIZE_TIMEOUT_S, cluster="rawfull")
            except SystemExit as err:  # the node simulator behind: say so, and go on to the jobs
                print(err, file=sys.stderr, flush=True)
                raw_full = None
            # The fleet agent starts once every node is Ready: its health
            # writes load the API server, and the raw side has no agent.
            agent = bench.gpucluster("agent", "--backend", "fake", "--fleet", "--node-selector",
                                     f"{names.LABEL_CLUSTER}={cluster}", "--metrics-port", "0", "--interval", "5",
                                     log=log_dir / "agent.log")
            agent_started = time.monotonic()
            ours_rate = args.nodes / ours
            rows.append(("1. nodes Ready/s: raw / operator / ratio", f"{raw_rate:.1f} / {ours_rate:.1f}",
                         f"{ours_rate / raw_rate:.2f} (raw: {raw_nodes} nodes in {raw:.0f} s on the empty API "
                         f"server; operator: {args.nodes} in {ours:.0f} s; aim >= 0.8)"))
            if raw_full is not None:
                rows.append(("1. raw at full size / operator / ratio",
                             f"{raw_nodes / raw_full:.1f} / {ours_rate:.1f}",
                             f"{ours_rate * raw_full / raw_nodes:.2f} (raw: {raw_nodes} nodes in {raw_full:.0f} s "
                             f"beside the {args.nodes}; the raw rate from 0 to {args.nodes} lies between the two)"))
            else:
                rows.append(("1. raw at full size", "not Ready",
                             f"{raw_nodes} raw nodes not all Ready {RAW_AT_FULL_SIZE_TIMEOUT_S} s after their "
                             f"creates beside the {args.nodes}"))
            # Ready is where the raw creates stop. The fleet agent's first
            # GPUHealthy write on every node (the raw side has no counterpart)
            # goes on while the jobs are submitted: a node with no verdict yet
            # counts as healthy to the planner, as without an agent.
            all_healthy: list[float] = []

            def healthy() -> None:
                # Once on each node, not all at once: at 25,000 nodes KWOK's
                # late status posts leave a few nodes Unknown at any moment.
                wait(lambda: len(nodes.judged) >= args.nodes, args.timeout, f"{args.nodes} nodes GPUHealthy")
                all_healthy.append(time.monotonic())

            healthy_waiter = threading.Thread(target=healthy, daemon=True)
            healthy_waiter.start()
            rows.append(("1. kubectl get tc NODES while provisioning", f"{len(shown)} values",
                         ", ".join(shown[:: max(1, len(shown) // 6)][:6])))
            usage("1", operator.pid, cpu0, cpu_provisioned)
            end_of_phase_1 = len(rows)

            cpu0 = cpu_now(operator.pid)
            profiler.window("2", operator.pid)
            trace = list(generate(args.jobs, seed=7, mean_interarrival=0.0001, mean_runtime=3600,
                                  gpus=["H100-80GB-HBM3", "H200-141GB"], max_gpus=2048))
            submitted: dict[str, float] = {}

            def submit(job: Any) -> None:
                body = job_manifest(job, cluster)
                submitted[body["metadata"]["name"]] = time.time()
                read_reply(custom.create_namespaced_custom_object(
                    names.GROUP, names.VERSION, "default", "trainingjobs", body, _preload_content=False))

            # Side by side, as many users or a pipeline would: one at a time,
            # a create answered in a second at 25,000 nodes paced the trace.
            with ThreadPoolExecutor(SUBMITTERS) as submitters:
                list(submitters.map(submit, trace))
            first = min(submitted.values())

            quiet = QuietAdmissions(lambda: sum(metric(metrics_port, "gpucluster_admission_decision_seconds_count")
                                                .values()))

            def admissions_settled() -> bool:
                """Every job admitted, or none for a while: jobs here never
                end (no run-time limits), so on a small cluster the queue's
                head waits for GPUs no gang gives back, and what it reserved
                stays reserved."""
                if len(jobs.admitted_at) >= len(submitted):
                    return True
                return quiet.settled(list(jobs.admitted_at.values()), time.time())  # the watch thread adds to it

            wait(admissions_settled, args.timeout, "admissions to settle")
            latencies = [jobs.admitted_at[n] - t for n, t in submitted.items() if n in jobs.admitted_at]
            last = max(jobs.admitted_at.values())
            decisions = metric(metrics_port, "gpucluster_admission_decision_seconds_bucket")
            rows.append(("2. submit->admitted p50 / p99 s", f"{statistics.median(latencies):.2f} / "
                         f"{percentile(latencies, 0.99):.2f}",
                         f"{len(latencies)} of {len(submitted)} admitted, "
                         f"{len(latencies) / (last - first):.1f} jobs/s; {sum(jobs.restarts.values())} gang "
                         f"restarts before any fault was injected"))
            per_job = metric(metrics_port, "gpucluster_admission_job_decision_seconds_bucket")
            decided = sum(count for key, count in per_job.items() if '"+Inf"' in key)
            rows.append(("2. one planner decision p50 / p99 ms",
                         f"{histogram_quantile(per_job, 0.5) * 1000:.2f} / "
                         f"{histogram_quantile(per_job, 0.99) * 1000:.2f}",
                         f"one queued job admitted, placed, reserved or left waiting; aim p99 <= 20 ms "
                         f"({decided:.0f} decisions)"))
            rows.append(("2. whole admission cycle p50 / p99 ms",
                         f"{quantile_ms(decisions, 0.5)} / {quantile_ms(decisions, 0.99)}",
                         "every queued job judged and decided"))
            usage("2", operator.pid, cpu0)

            healthy_waiter.join()
            if not all_healthy:
                raise SystemExit(f"timed out waiting for {args.nodes} nodes GPUHealthy")
            rows.insert(end_of_phase_1, ("1. GPUHealthy on every node s", f"{all_healthy[0] - agent_started:.0f}",
                         f"the fleet agent's first health write on each node, from its start once all were "
                         f"Ready ({args.nodes / (all_healthy[0] - agent_started):.0f} nodes/s, beside phase 2)"))
            cpu0 = cpu_now(operator.pid)
            restarts_before = sum(jobs.restarts.values())
            busy = sorted(nodes.healthy)[:: max(1, args.nodes // args.faults)][: args.faults]
            profiler.window("3", operator.pid)
            patch_s: list[float] = []
            inject(bench, busy, 0.1, injected, patch_s)
            wait(lambda: all(n in nodes.quarantined_at for n in busy), 600, "every faulty node quarantined")
            to_cordon = [nodes.quarantined_at[n] - injected[n] for n in busy]
            # The two hops, each as this bench's own watch saw its end: the
            # fleet agent's GPUHealthy=False, then the operator's taint.
            to_verdict = [nodes.unhealthy_at[n] - injected[n] for n in busy if n in nodes.unhealthy_at]
            verdict_to_cordon = [nodes.quarantined_at[n] - nodes.unhealthy_at[n] for n in busy
                                 if n in nodes.unhealthy_at]
            time.sleep(10)
            rows.append(("3. fault->cordon p50 / p99 s", f"{statistics.median(to_cordon):.2f} / "
                         f"{percentile(to_cordon, 0.99):.2f}",
                         f"{sum(jobs.restarts.values()) - restarts_before} gangs restarted, aim p99 <= 2 s; from each "
                         f"fault on its Node (the bench's patches took p50 / p99 {statistics.median(patch_s):.2f} / "
                         f"{percentile(patch_s, 0.99):.2f} s)"))
            if to_verdict:
                rows.append(("3. fault->GPUHealthy=False / ->cordon p50 / p99 s",
                             f"{statistics.median(to_verdict):.2f} / {percentile(to_verdict, 0.99):.2f}",
                             f"the agent's hop; the operator's: {statistics.median(verdict_to_cordon):.2f} / "
                             f"{percentile(verdict_to_cordon, 0.99):.2f}"))
            passes = {key: value for key, value in metric(
                metrics_port, "gpucluster_reconcile_duration_seconds_bucket").items() if '"Remediation"' in key}
            rows.append(("3. one remediation pass p50 / p99 ms",
                         f"{quantile_ms(passes, 0.5)} / {quantile_ms(passes, 0.99)}",
                         "one pool's cordons and status (drains and replacements go on beside), since the start"))
            # Fatal XIDs: each faulty node is drained (its gang restarts
            # elsewhere) and replaced, never more of a pool out at once than
            # its budget allows.
            with contextlib.suppress(SystemExit):
                wait(lambda: all(n in nodes.deleted_at for n in busy), REPLACED_WITHIN_S, "faulty nodes replaced")
            replaced = [nodes.deleted_at[n] - nodes.quarantined_at[n] for n in busy if n in nodes.deleted_at]
            budget = sum(RemediationBudget(max_unavailable=pool["remediation"]["maxUnavailable"])
                         .unavailable_allowed(pool["nodes"]) for pool in colossus["spec"]["pools"])
            rows.append(("3. faulty nodes replaced, cordon->deleted p50 / p99 s",
                         f"{len(replaced)} of {len(busy)}",
                         (f"{statistics.median(replaced):.1f} / {percentile(replaced, 0.99):.1f}; " if replaced
                          else "") + f"at most {nodes.most_out} out at once (budgets: {budget} across the pools)"))
            usage("3", operator.pid, cpu0)

            node_names = {n["metadata"]["name"] for n in json.loads(bench.kubectl(
                "get", "nodes", "-l", f"{names.LABEL_CLUSTER}={cluster}", "-o", "json"))["items"]}
            pods_before = {p["metadata"]["name"] for p in json.loads(bench.kubectl(
                "get", "pods", "-A", "-l", names.LABEL_JOB_NAME, "-o", "json"))["items"]}
            operator.terminate()
            operator.wait(60)
            restarted = time.monotonic()
            cpu0 = (0.0, cpu_seconds(apiserver) if apiserver else 0.0)  # the new operator's from its start
            operator = bench.gpucluster("run", "--metrics-port", str(metrics_port), "--liveness-port", "0",
                                        log=log_dir / "operator-2.log")
            profiler.window("4", operator.pid, young=True)

            def first_cycle() -> bool:
                try:
                    return any(v > 0 for k, v in metric(
                        metrics_port, "gpucluster_jobs{").items())
                except OSError:
                    return False
            wait(first_cycle, 600, "the restarted operator's first admission cycle")
            warm = time.monotonic() - restarted
            time.sleep(10)
            node_names_after = {n["metadata"]["name"] for n in json.loads(bench.kubectl(
                "get", "nodes", "-l", f"{names.LABEL_CLUSTER}={cluster}", "-o", "json"))["items"]}
            pods_after = [p for p in json.loads(bench.kubectl(
                "get", "pods", "-A", "-l", names.LABEL_JOB_NAME, "-o", "json"))["items"]]
            twice = len(pods_after) - len({p["metadata"]["name"] for p in pods_after})
            rows.append(("4. restart to first cycle s", f"{warm:.1f}",
                         f"nodes {len(node_names)} -> {len(node_names_after)}, pods kept "
                         f"{len(pods_before & {p['metadata']['name'] for p in pods_after})}, made twice {twice}"))
            usage("4 (new operator)", operator.pid, cpu0)
            sampling.set()
        finally:
            for process in (operator, agent):
                if process is not None:
                    process.terminate()
                    process.wait(60)
            profiler.report()
    width = max(len(r[0]) for r in rows)
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>16}  {note}")
    draw(timeline, args.png, args.nodes)
    print(f"(PNG {args.png}; logs {log_dir})")
    return 0


def draw(timeline: Timeline, path: Path, nodes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r[0] for r in timeline.rows]
    figure, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    series = [("nodes Ready and healthy", 1), ("GPUs allocated", 2), ("jobs waiting", 3)]
    for axis, (label, column) in zip(axes, series, strict=False):
        axis.plot(t, [r[column] for r in timeline.rows])
        axis.set_ylabel(label)
    axes[3].plot(t, [r[4] for r in timeline.rows], label="faults injected")
    axes[3].plot(t, [r[5] for r in timeline.rows], label="nodes cordoned")
    axes[3].legend()
    axes[3].set_xlabel("seconds since apply")
    axes[0].set_title(f"Colossus at {nodes:,} nodes")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
