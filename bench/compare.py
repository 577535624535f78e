"""Side by side: gpucluster, Kueue with Topology Aware Scheduling on
kube-scheduler, and kube-scheduler alone, on the same KWOK nodes and the same
job stream, in one run.

    python bench/compare.py [--nodes 1000] [--jobs 1000] [--seed 1]
                            [--stream FILE] [--systems gpucluster,kueue,kube-scheduler]

- The stream: `--jobs` jobs (seeded; saved as stream.json, replayed with
  --stream) of 1 GPU up to 64 nodes x 8 GPUs, some requiring one block or
  one rack, Poisson arrivals offering `--load` times what the nodes can run,
  log-normal run times. A job's run time starts when all of its workers are
  Running (ranks wait for each other at the rendezvous) and ends with a
  status patch of each pod to Succeeded: the same code for every system.
- The systems: gpucluster runs each job as a TrainingJob; Kueue (the version
  hack/versions.env pins, built by hack/build-kueue.sh) as an Indexed
  batch/v1 Job in a LocalQueue, with the podset-required (or preferred)
  topology annotation; kube-scheduler alone as the same Job, with inter-pod
  affinity on the level for a topology, and no gang.
- Each system gets a fresh control plane of its own (the reset), the same
  Node objects (gpucluster's own node template), and the machine alone.
  KWOK runs pod stages that never end a pod (bench/kwok-pod-stages.yaml).
- Every timing is a watch receive time in this process (pod conditions carry
  1 s timestamps): submit is when the create call is sent, bound when a pod
  is first seen with a node.

Writes a table on stdout, results.json (every row, the settings and
versions) and gpus.png (GPUs allocated over time, the three systems in one
plot) into --out.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gpucluster
import kubernetes
import kueue as kueue_peer
from common import REPO, BenchCluster, bench_cluster, watch_nodes, watch_raw
from gpucluster import names
from gpucluster.api import job as job_api
from gpucluster.api.gpus import GPUProduct
from gpucluster.kube.nodes import PoolNodeTemplate
from gpucluster.planning.pools import PoolProvider, PoolShape, plan_pool
from matplotlib.figure import Figure

NAMESPACE = "bench"
CLUSTER = "bench"
JOB_LABEL = "bench.gpucluster.dev/job"
IMAGE = "bench/trainer:1"
STAGES = REPO / "bench" / "kwok-pod-stages.yaml"
GPUS_PER_NODE = 8
NODES_PER_RACK, RACKS_PER_BLOCK = 4, 8
POOLS = {"h100": GPUProduct.H100_80GB_HBM3, "h200": GPUProduct.H200_141GB}
# Client rate limits, the same for every component that has one: Kueue patches
# every pod to ungate it, and the job controller creates every pod of the two
# batch/v1 systems. gpucluster's client has no rate limiter (32 calls at once).
CLIENT_QPS, CLIENT_BURST = 200, 400
SYSTEMS = ("gpucluster", "kueue", "kube-scheduler")

# (workers, GPUs per worker) -> weight: the mix of bench/admission.py.
JOB_SIZES: dict[tuple[int, int], int] = {
    (1, 1): 15, (1, 2): 5, (1, 4): 5, (4, 1): 3, (1, 8): 15, (2, 8): 12,
    (4, 8): 12, (8, 8): 11, (16, 8): 10, (32, 8): 7, (64, 8): 5,
}


# --- the stream ----------------------------------------------------------------


@dataclass(frozen=True)
class StreamJob:
    name: str
    pool: str
    workers: int
    gpus_per_worker: int
    arrival: float  # seconds after the first submission
    runtime: float  # seconds from all workers Running to their end
    topology_level: str | None = None  # block or rack
    topology_mode: str | None = None  # required or preferred

    @property
    def gpus(self) -> int:
        return self.workers * self.gpus_per_worker


@dataclass(frozen=True)
class Stream:
    seed: int
    pools: dict[str, int]  # pool -> nodes
    jobs: list[StreamJob]

    @property
    def nodes(self) -> int:
        return sum(self.pools.values())

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"seed": self.seed, "pools": self.pools,
                                    "jobs": [asdict(j) for j in self.jobs]}, indent=1))

    @classmethod
    def load(cls, path: Path) -> Stream:
        data = json.loads(path.read_text())
        return cls(data["seed"], data["pools"], [StreamJob(**j) for j in data["jobs"]])


def pool_sizes(nodes: int) -> dict[str, int]:
    """80% H100, 20% H200, in whole racks."""
    h100 = max(NODES_PER_RACK, round(nodes * 0.8 / NODES_PER_RACK) * NODES_PER_RACK)
    return {"h100": h100, "h200": nodes - h100}


def make_stream(nodes: int, jobs: int, seed: int, load: float, median_runtime: float) -> Stream:
    """`jobs` jobs arriving as a Poisson stream that offers `load` times the
    GPU-seconds the nodes can run; run times log-normal (sigma 0.5) around
    `median_runtime`, capped at 4x. Multi-node 8-GPU gangs: a tenth require
    one rack, a tenth one block, a third prefer one rack."""
    rng = random.Random(seed)
    pools = pool_sizes(nodes)
    block_nodes = NODES_PER_RACK * RACKS_PER_BLOCK
    mean_runtime = median_runtime * math.exp(0.5**2 / 2)
    drafts = []
    for index in range(jobs):
        pool = "h100" if rng.random() < 0.8 or pools["h200"] == 0 else "h200"
        sizes = [s for s in JOB_SIZES if s[0] <= pools[pool]]
        workers, gpus = rng.choices(sizes, weights=[JOB_SIZES[s] for s in sizes])[0]
        level = mode = None
        if workers > 1 and gpus == GPUS_PER_NODE:
            roll = rng.random()
            if roll < 0.1 and workers <= NODES_PER_RACK:
                level, mode = "rack", "required"
            elif roll < 0.2 and workers <= block_nodes:
                level, mode = "block", "required"
            elif roll < 0.55:
                level, mode = "rack", "preferred"
        runtime = min(4 * median_runtime, median_runtime * rng.lognormvariate(0, 0.5))
        drafts.append((f"j{index:05d}", pool, workers, gpus, round(runtime, 1), level, mode))
    mean_gpus = statistics.fmean(w * g for _, _, w, g, *_ in drafts)
    rate = load * nodes * GPUS_PER_NODE / (mean_gpus * mean_runtime)
    clock, stream = 0.0, []
    for name, pool, workers, gpus, runtime, level, mode in drafts:
        stream.append(StreamJob(name, pool, workers, gpus, round(clock, 3), runtime, level, mode))
        clock += rng.expovariate(rate)
    return Stream(seed, pools, stream)


# --- what each system is given ----------------------------------------------------


def node_manifests(pools: dict[str, int]) -> list[dict[str, Any]]:
    """The Nodes gpucluster itself would make for the pools: every system
    gets exactly these."""
    manifests = []
    for pool, count in pools.items():
        shape = PoolShape(cluster=CLUSTER, name=pool, provider=PoolProvider.KWOK, desired_nodes=count,
                          gpus_per_node=GPUS_PER_NODE, nodes_per_rack=NODES_PER_RACK,
                          racks_per_block=RACKS_PER_BLOCK)
        template = PoolNodeTemplate(shape=shape, gpu=POOLS[pool])
        manifests += [template.kwok_node(n) for n in plan_pool(shape, []).create]
    return manifests


def container(gpus: int | None) -> dict[str, Any]:
    limits = {"resources": {"limits": {names.GPU_RESOURCE: str(gpus)}}} if gpus else {}
    return {"name": "trainer", "image": IMAGE, **limits}


def training_job(job: StreamJob) -> dict[str, Any]:
    topology = {"topology": {"level": job.topology_level, "mode": job.topology_mode}} if job.topology_level else {}
    return {
        "apiVersion": names.API_VERSION, "kind": job_api.KIND,
        "metadata": {"name": job.name, "namespace": NAMESPACE},
        "spec": {"cluster": CLUSTER, "pool": job.pool, "workers": job.workers, "gpusPerWorker": job.gpus_per_worker,
                 **topology,
                 "template": {"metadata": {"labels": {JOB_LABEL: job.name}},
                              "spec": {"containers": [container(None)]}}},
    }


def batch_job(job: StreamJob, queued: bool) -> dict[str, Any]:
    """An Indexed Job of `workers` pods. `queued`: Kueue's (a LocalQueue, the
    topology as its annotation); otherwise kube-scheduler's (the topology as
    inter-pod affinity on the level's label: the first pod may go anywhere,
    the others must, or should, join its block or rack)."""
    metadata: dict[str, Any] = {"name": job.name, "namespace": NAMESPACE}
    annotations: dict[str, str] = {}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "nodeSelector": {names.LABEL_POOL: job.pool},
        "containers": [container(job.gpus_per_worker)],
    }
    level, mode = job.topology_level, job.topology_mode
    if queued:
        metadata["labels"] = {kueue_peer.QUEUE_LABEL: job.pool}
        if level and mode:
            annotations[kueue_peer.TOPOLOGY_ANNOTATIONS[mode]] = kueue_peer.LEVEL_LABELS[level]
    elif level:
        term = {"labelSelector": {"matchLabels": {JOB_LABEL: job.name}},
                "topologyKey": kueue_peer.LEVEL_LABELS[level]}
        pod_spec["affinity"] = {"podAffinity": (
            {"requiredDuringSchedulingIgnoredDuringExecution": [term]} if mode == "required" else
            {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]})}
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
        "spec": {"completionMode": "Indexed", "completions": job.workers, "parallelism": job.workers,
                 "backoffLimit": 0,
                 "template": {"metadata": {"labels": {JOB_LABEL: job.name}, "annotations": annotations},
                              "spec": pod_spec}},
    }


# --- watching and ending pods --------------------------------------------------------


@dataclass
class PodRecord:
    name: str
    job: str
    gpus: int
    node: str = ""
    bound_at: float | None = None
    running_at: float | None = None
    released_at: float | None = None  # terminal or deleted


@dataclass
class JobRecord:
    spec: StreamJob
    pods: list[PodRecord] = field(default_factory=list)
    submitted_at: float | None = None
    all_bound_at: float | None = None
    bound_nodes: tuple[str, ...] = ()
    started_at: float | None = None  # all workers Running: the run time counts from here
    ending_at: float | None = None  # the bench began ending its pods
    completed_at: float | None = None  # every pod ended

    def live(self) -> list[PodRecord]:
        return [p for p in self.pods if p.bound_at is not None and p.released_at is None]


class Tracker:
    """Reads the pod watch (one thread), ends each job's pods when its run
    time is over (another), and keeps every time it saw."""

    def __init__(self, stream: Stream, core: kubernetes.client.CoreV1Api) -> None:
        self.core = core
        self.jobs = {j.name: JobRecord(j) for j in stream.jobs}
        self.by_uid: dict[str, PodRecord] = {}
        self.lock = threading.Lock()
        self.timers: list[tuple[float, str, float]] = []  # (end, job, when its run started)
        self.last_progress = time.monotonic()
        self.stopped = threading.Event()
        self.patcher = ThreadPoolExecutor(16, thread_name_prefix="end-pod")
        # Nodes that went NotReady during the run: none should (no system is
        # tested on failures here), so one is a fault of the simulation.
        self.not_ready: set[str] = set()
        self.node_flaps = 0
        watch_raw(functools.partial(core.list_namespaced_pod, NAMESPACE), JOB_LABEL, self._see)
        watch_nodes(core, names.LABEL_CLUSTER, self._see_node)
        threading.Thread(target=self._end_jobs, daemon=True).start()

    def _see_node(self, kind: str, node: dict[str, Any]) -> bool:
        name = node["metadata"]["name"]
        ready = kind != "DELETED" and any(c["type"] == "Ready" and c["status"] == "True"
                                          for c in node.get("status", {}).get("conditions", []))
        with self.lock:
            if not ready and name not in self.not_ready:
                self.not_ready.add(name)
                self.node_flaps += 1
            elif ready:
                self.not_ready.discard(name)
        return self.stopped.is_set()

    def _see(self, kind: str, pod: dict[str, Any]) -> bool:
        now = time.monotonic()
        meta = pod["metadata"]
        job = self.jobs.get(meta.get("labels", {}).get(JOB_LABEL, ""))
        if job is None:
            return self.stopped.is_set()
        with self.lock:
            record = self.by_uid.get(meta["uid"])
            if record is None:
                record = PodRecord(meta["name"], job.spec.name, job.spec.gpus_per_worker)
                self.by_uid[meta["uid"]] = record
                job.pods.append(record)
            node = pod["spec"].get("nodeName")
            phase = pod.get("status", {}).get("phase")
            if node and record.bound_at is None:
                record.node, record.bound_at = node, now
                self.last_progress = now
            if phase == "Running" and record.running_at is None:
                record.running_at = now
            if (kind == "DELETED" or phase in ("Succeeded", "Failed")) and record.released_at is None:
                record.released_at = now
            self._advance(job, now)
        return self.stopped.is_set()

    def _advance(self, job: JobRecord, now: float) -> None:
        workers = job.spec.workers
        live = job.live()
        if job.all_bound_at is None and len(live) == workers:
            job.all_bound_at, job.bound_nodes = now, tuple(p.node for p in live)
        running = sum(p.running_at is not None for p in live)
        if job.ending_at is None and job.started_at is None and running == workers:
            job.started_at = now
            heapq.heappush(self.timers, (now + job.spec.runtime, job.spec.name, now))
        elif job.ending_at is None and job.started_at is not None and running < workers:
            job.started_at = None  # a worker was lost: the run starts over once all are back
        if job.ending_at is not None and job.completed_at is None and \
                sum(p.released_at is not None for p in job.pods) >= workers and not live:
            job.completed_at = now
            self.last_progress = now

    def _end_jobs(self) -> None:
        while not self.stopped.is_set():
            due = []
            with self.lock:
                now = time.monotonic()
                while self.timers and self.timers[0][0] <= now:
                    _, name, started = heapq.heappop(self.timers)
                    job = self.jobs[name]
                    if job.started_at == started:  # else that run was lost, and a later one is timed
                        job.ending_at = now
                        due += [p.name for p in job.live()]
            for name in due:
                self.patcher.submit(self._finish, name)
            time.sleep(0.1)

    def _finish(self, pod: str) -> None:
        """Ends a pod as its container would on exit 0 (what
        tests/integration/harness.finish_pod does with kubectl)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {"phase": "Succeeded", "containerStatuses": [{
            "name": "trainer", "image": IMAGE, "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}}]}
        try:
            self.core.patch_namespaced_pod_status(pod, NAMESPACE, {"status": status}, _preload_content=False)
        except kubernetes.client.ApiException as err:
            if err.status != 404:
                print(f"ending pod {pod}: {err.status} {err.reason}", file=sys.stderr)

    def running(self) -> int:
        with self.lock:
            return sum(1 for j in self.jobs.values() if j.started_at is not None and j.completed_at is None)

    def completed(self) -> int:
        with self.lock:
            return sum(1 for j in self.jobs.values() if j.completed_at is not None)

    def stop(self) -> None:
        self.stopped.set()
        self.patcher.shutdown(wait=True, cancel_futures=True)


# --- the systems ---------------------------------------------------------------------


class System:
    """One system under test on a fresh cluster: `start` it, `submit` jobs,
    `stop` it. `versions` says what ran."""

    name = ""

    def __init__(self, bench: BenchCluster, stream: Stream, state_dir: Path) -> None:
        self.bench, self.stream, self.state_dir = bench, stream, state_dir
        self.batch = kubernetes.client.BatchV1Api(bench.core.api_client)
        self.custom = kubernetes.client.CustomObjectsApi(bench.core.api_client)
        self.versions: dict[str, str] = {}

    def start(self) -> None:
        pass

    def submit(self, job: StreamJob) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        pass


class Gpucluster(System):
    name = "gpucluster"

    def start(self) -> None:
        self.operator = self.bench.gpucluster("run", "-n", NAMESPACE, "--metrics-port", "0", "--liveness-port", "0",
                                              log=self.state_dir / "operator.log")
        pools = [{"name": pool, "gpu": POOLS[pool].value, "nodes": count,
                  "topology": {"nodesPerRack": NODES_PER_RACK, "racksPerBlock": RACKS_PER_BLOCK}}
                 for pool, count in self.stream.pools.items() if count]
        self.bench.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": names.API_VERSION, "kind": "TrainingCluster", "metadata": {"name": CLUSTER},
            "spec": {"pools": pools}}))
        # The operator adopts the nodes already there (their names and labels
        # are its own); it admits nothing before it has seen them Ready.
        self.bench.kubectl("wait", "--for=jsonpath={.status.readyGPUs}=" + str(self.stream.nodes * GPUS_PER_NODE),
                           "--timeout=600s", f"trainingcluster/{CLUSTER}")
        self.versions["gpucluster"] = f"{gpucluster.__version__} ({_git_commit()})"

    def submit(self, job: StreamJob) -> None:
        self.custom.create_namespaced_custom_object(names.GROUP, names.VERSION, NAMESPACE, job_api.PLURAL,
                                                    training_job(job), _preload_content=False)

    def stop(self) -> None:
        self.operator.terminate()
        try:
            self.operator.wait(30)
        except subprocess.TimeoutExpired:
            self.operator.kill()
            self.operator.wait(5)


class KubeScheduler(System):
    name = "kube-scheduler"

    def submit(self, job: StreamJob) -> None:
        self.batch.create_namespaced_job(NAMESPACE, batch_job(job, queued=False), _preload_content=False)


class Kueue(System):
    name = "kueue"

    def start(self) -> None:
        self.kueue = kueue_peer.Kueue(self.bench, self.state_dir, CLIENT_QPS, CLIENT_BURST)
        self.kueue.start(kueue_peer.build())
        pool_gpus = {pool: count * GPUS_PER_NODE for pool, count in self.stream.pools.items() if count}
        for manifest in kueue_peer.queue_objects(pool_gpus, NAMESPACE):
            self.bench.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        self.bench.kubectl("wait", "--for=condition=Active", "--timeout=600s", "clusterqueue", "--all")
        self.versions["kueue"] = self.kueue.version

    def submit(self, job: StreamJob) -> None:
        self.batch.create_namespaced_job(NAMESPACE, batch_job(job, queued=True), _preload_content=False)

    def stop(self) -> None:
        self.kueue.stop()


SYSTEM_TYPES: dict[str, type[System]] = {t.name: t for t in (Gpucluster, Kueue, KubeScheduler)}


def _git_commit() -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"


# --- one system's run ------------------------------------------------------------------


@dataclass
class RunLimits:
    max_seconds: float  # from the first submission
    stall_seconds: float  # all submitted, nothing running, no pod bound and no job done for this long


def run_system(kind: str, stream: Stream, limits: RunLimits) -> tuple[dict[str, Any], list[Any]]:
    """One system on a fresh control plane, stopped at the end."""
    client_qps = [f"--kube-api-qps={CLIENT_QPS}", f"--kube-api-burst={CLIENT_BURST}"]
    # No node fails in this bench, and none may seem to: on a loaded machine
    # a simulated heartbeat posted late would make a node NotReady, which each
    # system answers differently (Kueue evicts the gangs on it after 30 s,
    # gpucluster after the job's grace, kube-scheduler taints it). The row
    # counts nodes that still went NotReady.
    extra_args = {"kwok": [f"--config={STAGES}"], "kube-scheduler": client_qps,
                  "kube-controller-manager": [*client_qps, "--node-monitor-grace-period=3600s"]}
    with bench_cluster(f"compare-{kind}", extra_args) as bench:
        bench.kubectl("create", "namespace", NAMESPACE)
        _create_nodes(bench, stream.pools)
        system = SYSTEM_TYPES[kind](bench, stream, REPO / ".local-cluster" / f"compare-{kind}")
        system.start()
        system.versions["kubernetes"] = json.loads(bench.kubectl("version", "-o", "json"))["serverVersion"][
            "gitVersion"]
        print(f"{kind}: started ({', '.join(f'{k} {v}' for k, v in system.versions.items())}); "
              f"submitting {len(stream.jobs)} jobs", file=sys.stderr, flush=True)
        tracker = Tracker(stream, bench.core)
        load_before = os.getloadavg()[0]
        try:
            t0, stop_at, stopped_by = _drive(system, tracker, stream, limits)
        finally:
            tracker.stop()
            system.stop()
        row, series = summarise(kind, stream, tracker, t0, stop_at, stopped_by)
        row["versions"] = system.versions
        # Other work on the machine slows every component: the 1-minute load
        # average at the start and the end of the run says how much there was.
        row["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        return row, series


def _create_nodes(bench: BenchCluster, pools: dict[str, int]) -> None:
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda body: bench.core.create_node(body, _preload_content=False), node_manifests(pools)))
    bench.kubectl("wait", "--for=condition=Ready", "--timeout=600s", "node", "-l", names.LABEL_CLUSTER)


def _drive(system: System, tracker: Tracker, stream: Stream, limits: RunLimits) -> tuple[float, float, str]:
    """Submits the stream on its schedule and waits until every job is done,
    the run stalls, or the time limit. Returns the first submission's time,
    the time it stopped and why."""
    t0 = time.monotonic()
    submitted = threading.Event()

    def submit_all() -> None:
        with ThreadPoolExecutor(8) as pool:
            for job in stream.jobs:
                time.sleep(max(0.0, t0 + job.arrival - time.monotonic()))
                with tracker.lock:
                    tracker.jobs[job.name].submitted_at = time.monotonic()
                pool.submit(_logged(system.submit, job))
        submitted.set()

    threading.Thread(target=submit_all, daemon=True).start()
    last_report = t0
    while True:
        time.sleep(1)
        now = time.monotonic()
        done = tracker.completed()
        if now - last_report >= 30:
            last_report = now
            print(f"  {system.name}: {now - t0:6.0f} s, {done}/{len(stream.jobs)} done, "
                  f"{tracker.running()} running", file=sys.stderr, flush=True)
        if done == len(stream.jobs):
            return t0, now, "all done"
        if now - t0 > limits.max_seconds:
            return t0, now, f"time limit ({limits.max_seconds:.0f} s)"
        if submitted.is_set() and not tracker.running() and now - tracker.last_progress > limits.stall_seconds:
            return t0, now, f"stalled ({limits.stall_seconds:.0f} s with nothing running, bound or done)"


def _logged(submit: Callable[[StreamJob], None], job: StreamJob) -> Callable[[], None]:
    def call() -> None:
        try:
            submit(job)
        except kubernetes.client.ApiException as err:
            print(f"submitting {job.name}: {err.status} {err.reason} {err.body}", file=sys.stderr)

    return call


# --- figures ---------------------------------------------------------------------------


def wait_percentile(waits: Sequence[tuple[float, bool]], fraction: float) -> tuple[float, bool]:
    """A percentile of (seconds, bound) waits. A job never bound waits until
    the run stopped, a lower bound of its wait: a percentile that lands on
    one is a lower bound too (returned with False)."""
    ordered = sorted(waits)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else (math.nan, False)


def allocation_series(pods: Iterable[PodRecord], t0: float, end: float) -> list[tuple[float, int]]:
    """(seconds since t0, GPUs held) at every change, up to `end`: a pod holds
    its GPUs from bound to terminal or deleted, as the scheduler counts them."""
    changes: list[tuple[float, int]] = []
    for pod in pods:
        if pod.bound_at is not None:
            changes.append((pod.bound_at - t0, pod.gpus))
            if pod.released_at is not None:
                changes.append((pod.released_at - t0, -pod.gpus))
    changes.sort()
    series, held = [(0.0, 0)], 0
    for at, delta in changes:
        held += delta
        series.append((at, held))
    series.append((end - t0, held))
    return series


def partial_gang_gpu_seconds(job: JobRecord, end: float) -> float:
    """GPU-seconds the job's pods held while some, not all, of its workers
    were bound, until the bench began ending them."""
    until = job.ending_at if job.ending_at is not None else end
    edges = sorted({t for p in job.pods for t in (p.bound_at, p.released_at) if t is not None and t < until}
                   | {until})
    total = 0.0
    for start, stop in itertools.pairwise(edges):
        held = [p for p in job.pods if p.bound_at is not None and p.bound_at <= start
                and (p.released_at is None or p.released_at > start)]
        if 0 < len(held) < job.spec.workers:
            total += sum(p.gpus for p in held) * (stop - start)
    return total


def topology_violation(job: JobRecord, node_domains: dict[str, tuple[str, str]]) -> bool:
    """A required level spanned by the nodes the job's workers were bound to."""
    if job.spec.topology_mode != "required" or not job.bound_nodes:
        return False
    depth = 1 if job.spec.topology_level == "block" else 2
    return len({node_domains[n][:depth] for n in job.bound_nodes}) > 1


def summarise(kind: str, stream: Stream, tracker: Tracker, t0: float, end: float, stopped_by: str,
              ) -> tuple[dict[str, Any], list[Any]]:
    """One row of figures; `end` is when the run stopped, the last job's end
    when every job completed."""
    with tracker.lock:
        jobs = [j for j in tracker.jobs.values() if j.submitted_at is not None]
        completed = [j for j in jobs if j.completed_at is not None]
        all_done = len(completed) == len(stream.jobs)
        if all_done:
            end = max(j.completed_at for j in completed if j.completed_at is not None)
        waits = [((j.all_bound_at if j.all_bound_at is not None else end) - j.submitted_at, j.all_bound_at is not None)
                 for j in jobs if j.submitted_at is not None]
        p50, p99 = wait_percentile(waits, 0.5), wait_percentile(waits, 0.99)
        admitted = [j.all_bound_at for j in jobs if j.all_bound_at is not None]
        pods = [p for j in jobs for p in j.pods]
        series = allocation_series(pods, t0, end)
        capacity = stream.nodes * GPUS_PER_NODE
        span = capacity * (end - t0)
        held = sum(a[1] * (b[0] - a[0]) for a, b in itertools.pairwise(series))
        running = sum(j.spec.gpus * ((j.ending_at or end) - j.started_at) for j in jobs if j.started_at is not None)
        domains = {n["metadata"]["name"]: (n["metadata"]["labels"][names.LABEL_POOL] + "/" +
                                           n["metadata"]["labels"][names.LABEL_BLOCK],
                                           n["metadata"]["labels"][names.LABEL_RACK])
                   for n in node_manifests(stream.pools)}
        largest = max(j.gpus for j in stream.jobs)
        largest_waits = [w for j, w in zip(jobs, waits, strict=True) if j.spec.gpus == largest]
        row = {
            "system": kind,
            "jobs": len(stream.jobs),
            "submitted": len(jobs),
            "completed": len(completed),
            "stopped_by": stopped_by,
            "makespan_s": round(end - t0, 1),
            "makespan_complete": all_done,
            "bound_p50_s": round(p50[0], 2),
            "bound_p50_complete": p50[1],
            "bound_p99_s": round(p99[0], 2),
            "bound_p99_complete": p99[1],
            "never_bound": len(jobs) - len(admitted),
            "admitted_per_s": round(len(admitted) / max(1e-9, max(admitted, default=t0) - t0), 3),
            "mean_gpu_allocation": round(held / span, 4),
            # GPUs of gangs whose every worker runs: the allocation that trains.
            "mean_gpu_running": round(running / span, 4),
            "partial_gang_gpu_hours": round(sum(partial_gang_gpu_seconds(j, end) for j in jobs) / 3600, 3),
            "required_topology_jobs": sum(1 for j in stream.jobs if j.topology_mode == "required"),
            "required_topology_violations": sum(topology_violation(j, domains) for j in jobs),
            "largest_job_gpus": largest,
            "largest_jobs_longest_wait_s": round(max(w for w, _ in largest_waits), 1) if largest_waits else math.nan,
            "largest_jobs_never_bound": sum(1 for _, bound in largest_waits if not bound),
            "pods_seen": len(pods),
            # KWOK's part, the same for every system: bound to Running.
            "pod_start_p99_s": round(wait_percentile(
                [(p.running_at - p.bound_at, True) for p in pods if p.running_at and p.bound_at], 0.99)[0], 2),
            "node_not_ready_events": tracker.node_flaps,
        }
    return row, series


# --- output ----------------------------------------------------------------------------

COLUMNS = [
    ("system", "system", "{}"),
    ("completed", "jobs done", "{}"),
    ("makespan_s", "makespan s", "{:.0f}"),
    ("bound_p50_s", "bound p50 s", "{:.1f}"),
    ("bound_p99_s", "bound p99 s", "{:.1f}"),
    ("admitted_per_s", "admitted/s", "{:.2f}"),
    ("mean_gpu_allocation", "GPU alloc", "{:.1%}"),
    ("mean_gpu_running", "GPU running", "{:.1%}"),
    ("partial_gang_gpu_hours", "partial GPU-h", "{:.2f}"),
    ("required_topology_violations", "topo violations", "{}"),
    ("largest_jobs_longest_wait_s", "largest wait s", "{:.0f}"),
]


def table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [[h for _, h, _ in COLUMNS]]
    for row in rows:
        line = []
        for key, _, fmt in COLUMNS:
            text = fmt.format(row[key])
            if key == "makespan_s" and not row["makespan_complete"]:
                text = f">{text}"
            if key == "largest_jobs_longest_wait_s" and row["largest_jobs_never_bound"]:
                text = f">{text}"
            if key in ("bound_p50_s", "bound_p99_s") and not row[key.replace("_s", "_complete")]:
                text = f">{text}"
            line.append(text)
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths,
                                                                                         strict=True)))
                     for line in cells)


def plot(series: dict[str, list[Any]], capacity: int, path: Path, title: str) -> None:
    figure = Figure(figsize=(10, 4.5))
    axes = figure.subplots()
    for kind, points in series.items():
        axes.step([p[0] for p in points], [p[1] for p in points], where="post", label=kind, linewidth=1.2)
    axes.axhline(capacity, color="grey", linestyle="--", linewidth=0.8, label=f"capacity ({capacity} GPUs)")
    axes.set_xlabel("seconds since the first submission")
    axes.set_ylabel("GPUs allocated (pods bound, not ended)")
    axes.set_title(title)
    axes.set_ylim(0, capacity * 1.05)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--load", type=float, default=1.5,
                        help="GPU-seconds offered per GPU-second the nodes can run (default %(default)s)")
    parser.add_argument("--median-runtime", type=float, default=60.0, help="seconds (default %(default)s)")
    parser.add_argument("--stream", type=Path, help="replay this stream file instead of generating one")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--max-minutes", type=float, default=60.0, help="per system, from the first submission")
    parser.add_argument("--stall-seconds", type=float, default=600.0,
                        help="stop a system after this long with nothing running, bound or done (a deadlock, "
                             "or an operator starved of its admission cycle)")
    parser.add_argument("--out", type=Path, default=REPO / ".local-cluster" / "compare-results")
    args = parser.parse_args(argv)
    if os.environ.get("GPUCLUSTER_KUBECONFIG"):
        parser.error("compare starts a fresh control plane per system; unset GPUCLUSTER_KUBECONFIG")
    systems = args.systems.split(",")
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    stream = Stream.load(args.stream) if args.stream else make_stream(
        args.nodes, args.jobs, args.seed, args.load, args.median_runtime)
    args.out.mkdir(parents=True, exist_ok=True)
    stream.save(args.out / "stream.json")
    limits = RunLimits(args.max_minutes * 60, args.stall_seconds)
    print(f"{len(stream.jobs)} jobs on {stream.nodes} nodes ({stream.pools}), stream {args.out / 'stream.json'}",
          file=sys.stderr, flush=True)
    capacity = stream.nodes * GPUS_PER_NODE
    settings = {"nodes": stream.nodes, "pools": stream.pools, "jobs": len(stream.jobs), "seed": stream.seed,
                "client_qps": CLIENT_QPS, "client_burst": CLIENT_BURST,
                "stream": str(args.out / "stream.json"), "limits": asdict(limits)}
    rows, series = [], {}
    for kind in systems:
        row, points = run_system(kind, stream, limits)
        rows.append(row)
        series[kind] = points
        print(f"{kind}: {row['completed']}/{row['jobs']} done, {row['stopped_by']}; nodes gone NotReady during "
              f"the run: {row['node_not_ready_events']}", file=sys.stderr, flush=True)
        # Written after each system: a long run that fails later keeps the rows it has.
        (args.out / "results.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    plot(series, capacity, args.out / "gpus.png",
         f"GPUs allocated: {len(stream.jobs)} jobs on {stream.nodes} nodes ({capacity} GPUs)")
    print(table(rows))
    for row in rows:
        print(f"{row['system']}: {', '.join(f'{k} {v}' for k, v in row['versions'].items())}")
    ours = next((r for r in rows if r["system"] == "gpucluster"), None)
    for other in (r for r in rows if ours and r is not ours):
        assert ours is not None
        at_least = "" if other["makespan_complete"] else ">"
        print(f"{other['system']} / gpucluster: makespan {at_least}{other['makespan_s'] / ours['makespan_s']:.2f}x, "
              f"bound p50 {other['bound_p50_s'] / max(1e-9, ours['bound_p50_s']):.2f}x; gpucluster / "
              f"{other['system']}: GPU allocation "
              f"{ours['mean_gpu_allocation'] / max(1e-9, other['mean_gpu_allocation']):.2f}x, admitted/s "
              f"{ours['admitted_per_s'] / max(1e-9, other['admitted_per_s']):.2f}x")
    print(f"(results: {args.out / 'results.json'}, plot: {args.out / 'gpus.png'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
