"""Benchmark of the TrainingJob admission planner.

    PYTHONPATH=operator python bench/admission.py [--quick] [--seed N] [--traces K]
                                                  [--skip-latency] [--jobs J]

1. Decision latency. A pool pair (80% H100, 20% H200) of 5,000 and of
   25,000 nodes x 8 GPUs (racks of 4 nodes, blocks of 8 racks), about 80%
   busy with running gangs left fragmented by gangs that ended, 1% of nodes
   unschedulable, and 1,000 queued jobs of mixed sizes (1x1 up to 64x8
   GPUs; a fifth of multi-node gangs require one block; three priorities,
   so some heads preempt).
   A *decision* is one `AdmissionCycle.decide(job)` call: the admit /
   place / reserve / preempt / wait verdict for one job inside a cycle,
   including the placement search and index updates it causes. The
   per-cycle setup (grouping the snapshot, building the capacity indexes)
   is reported on its own, and the *whole cycle* is one `plan_admissions`
   call over the full queue, timed separately without per-decision timers.

2. Utilisation on a simulated trace, through `gpucluster simulate`'s engine
   (gpucluster/sim/engine.py: the operator's lifecycle on a simulated
   clock) on one pool of 8-GPU nodes (racks of 4, blocks of 8 racks). Jobs
   of mixed sizes (the same mix) and log-normal durations (median 1.5 h)
   arrive as a Poisson stream, once near the pool's capacity and once well
   above it; every `CYCLE_SECONDS` the policy looks at the queue. Each job
   has a run-time limit (spec.activeDeadlineSeconds) as users set them: its
   duration times a factor drawn from 1 to 3, rounded up to a whole hour.
   Utilisation is allocated GPU-seconds (a gang's, from its admission to
   its end) over available GPU-seconds from the end of a warm-up to the end
   of arrivals, where the run stops with jobs still queued. Policies, all on
   the same trace, each in `plan_admissions`' place in the lifecycle:
   - planner: `plan_admissions` (topology, best fit, reservation backfill,
     and backfill onto the head's reservation of jobs whose limits end them
     before the head's start);
   - planner (no limits): the same trace with no job declaring a limit;
   - planner (no required): the same trace with every required topology
     level made preferred: what honouring required levels costs the
     planner, which blocking and skipping first-fit do not pay;
   - first-fit (blocking): queue order, each worker on the first node in
     name order with room, no topology; the first job that does not fit
     blocks everything behind it (strict FIFO, like Kueue's StrictFIFO
     without topology-aware scheduling);
   - first-fit (skipping): the same, but a job that does not fit is skipped
     and later ones may start (Kueue's BestEffortFIFO, without topology):
     nothing holds capacity for a large job, so nothing guarantees it ever
     starts; the trace shows how large jobs fared;
   - first-fit (skip, lvl): skipping first-fit held to required levels: a
     job that requires a block or rack goes first-fit into the first one,
     in name order, that holds it.
   The first two baselines ignore `required` topology, which only helps them
   pack; how many of their placements broke a required level is reported
   (the third shows what honouring it costs first-fit). So is
   the longest wait of the largest jobs (the top size class; one still
   queued at the end counts until then): whether a policy starves them; and
   where each policy left GPUs free while jobs waited (held for a waiting
   head, whole idle nodes, parts of nodes), seen after each of its cycles.
   One priority level, so no policy preempts. With several traces a load
   (--traces, simulated --jobs at a time), the means come with the
   planner's difference to each other policy paired trace by trace: a
   trace moves every policy alike, and they are hundredths of a point
   apart.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import gc
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from gpucluster.api.cluster import TrainingClusterSpec
from gpucluster.planning.lifecycle import Planner
from gpucluster.planning.scheduling import (
    AdmissionCycle,
    AdmissionPlan,
    CapacityCache,
    NodeSnapshot,
    PendingJob,
    RunningGang,
    TopologyLevel,
    TopologyRequest,
    plan_admissions,
    queue_order,
)
from gpucluster.sim.engine import JobRecord, Report, Simulation
from gpucluster.sim.trace import TraceJob, limit_of

NODES_PER_RACK = 4
RACKS_PER_BLOCK = 8
GPUS_PER_NODE = 8
HOUR = 3600.0
CYCLE_SECONDS = 300.0

# (workers, GPUs per worker) -> weight, for queued and simulated jobs.
JOB_SIZES: dict[tuple[int, int], int] = {
    (1, 1): 15,
    (1, 2): 5,
    (1, 4): 5,
    (4, 1): 3,
    (1, 8): 15,
    (2, 8): 12,
    (4, 8): 12,
    (8, 8): 11,
    (16, 8): 10,
    (32, 8): 7,
    (64, 8): 5,
}


# --- cluster and queue generation --------------------------------------------


def make_nodes(count: int, rng: random.Random) -> list[NodeSnapshot]:
    nodes = []
    for index in range(count):
        pool, product = ("h100", "H100-80GB-HBM3") if index < count * 0.8 else ("h200", "H200-141GB")
        rack_index = index // NODES_PER_RACK
        nodes.append(
            NodeSnapshot(
                name=f"node-{index:05d}",
                pool=pool,
                gpu_product=product,
                allocatable_gpus=GPUS_PER_NODE,
                block=f"block-{rack_index // RACKS_PER_BLOCK:04d}",
                rack=f"rack-{rack_index % RACKS_PER_BLOCK}",
                schedulable=rng.random() >= 0.01,
            )
        )
    return nodes


def random_job(key: str, rng: random.Random, pool: str, arrival: float, priority: int) -> PendingJob:
    workers, gpus = rng.choices(list(JOB_SIZES), weights=list(JOB_SIZES.values()))[0]
    topology = TopologyRequest()
    if workers > 1 and gpus == GPUS_PER_NODE:
        roll = rng.random()
        if roll < 0.2 and workers <= NODES_PER_RACK * RACKS_PER_BLOCK:
            topology = TopologyRequest("block", "required")
        elif roll < 0.5:
            topology = TopologyRequest("rack", "preferred")
    return PendingJob(key, priority, arrival, workers, gpus, pool, topology)


def busy_cluster(nodes: list[NodeSnapshot], rng: random.Random) -> list[RunningGang]:
    """Gangs packed in node order to ~100%, then a sixth of them ended at
    random: the fragmented state of a pool that has been running a while."""
    gangs: list[RunningGang] = []
    by_pool: dict[str, list[NodeSnapshot]] = {}
    for node in nodes:
        by_pool.setdefault(node.pool, []).append(node)
    for pool, pool_nodes in by_pool.items():
        cursor = 0
        while cursor < len(pool_nodes):
            workers, gpus = rng.choices(list(JOB_SIZES), weights=list(JOB_SIZES.values()))[0]
            usage: dict[str, int] = {}
            if gpus == GPUS_PER_NODE:
                for node in pool_nodes[cursor : cursor + workers]:
                    usage[node.name] = GPUS_PER_NODE
                cursor += workers
            else:  # small gangs share one node
                usage[pool_nodes[cursor].name] = min(GPUS_PER_NODE, workers * gpus)
                cursor += 1
            gangs.append(
                RunningGang(
                    key=f"running/{pool}-{len(gangs)}",
                    priority=rng.choice([0, 0, 1]),
                    pool=pool,
                    gpus_by_node=usage,
                    admitted_at=-rng.uniform(0, 48 * HOUR),
                )
            )
    return [gang for gang in gangs if rng.random() >= 1 / 6]


def queued_jobs(nodes: list[NodeSnapshot], count: int, rng: random.Random) -> list[PendingJob]:
    names = [node.name for node in nodes]
    jobs = []
    for index in range(count):
        pool = "h100" if rng.random() < 0.8 else "h200"
        job = random_job(f"queued/{index}", rng, pool, float(index), rng.choice([0, 0, 0, 1, 2]))
        if rng.random() < 0.02:  # a gang restart avoiding the nodes that failed
            job = PendingJob(
                job.key, job.priority, job.arrival, job.workers, job.gpus_per_worker, job.pool,
                job.topology, frozenset(rng.sample(names, 2)),
            )
        jobs.append(job)
    return jobs


# --- 1. decision latency -----------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def bench_decisions(node_count: int, queue_length: int, cycles: int, seed: int) -> None:
    decision_ms: list[float] = []
    setup_ms: list[float] = []
    cycle_ms: list[float] = []
    outcomes: Counter[str] = Counter()
    for cycle_number in range(cycles):
        rng = random.Random(seed * 1000 + cycle_number)
        nodes = make_nodes(node_count, rng)
        running = busy_cluster(nodes, rng)
        queue = queue_order(queued_jobs(nodes, queue_length, rng))
        gc.collect()
        started = time.perf_counter()
        cycle = AdmissionCycle(nodes, running, now=0.0)
        setup_ms.append((time.perf_counter() - started) * 1e3)
        for job in queue:
            started = time.perf_counter()
            outcomes[cycle.decide(job)] += 1
            decision_ms.append((time.perf_counter() - started) * 1e3)
        cycle.plan()
        gc.collect()
        started = time.perf_counter()
        plan_admissions(nodes, running, queue, now=0.0)
        cycle_ms.append((time.perf_counter() - started) * 1e3)
    decision_ms.sort()
    busy = sum(gang.gpus for gang in running) / (node_count * GPUS_PER_NODE)
    print(
        f"{node_count:>6} nodes ({node_count * GPUS_PER_NODE:,} GPUs, {busy:.0%} busy), "
        f"{queue_length} queued jobs, {cycles} cycle(s), {len(decision_ms)} decisions"
    )
    print(
        f"    per decision: p50 {percentile(decision_ms, 0.50):.3f} ms   "
        f"p99 {percentile(decision_ms, 0.99):.3f} ms   max {decision_ms[-1]:.1f} ms"
    )
    print(
        f"    per cycle: setup {statistics.median(setup_ms):.0f} ms, "
        f"whole plan_admissions {statistics.median(cycle_ms):.0f} ms (median)"
    )
    print("    outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))


# --- 2. utilisation on a simulated trace: `gpucluster simulate`'s engine ------


def bench_cluster(node_count: int) -> TrainingClusterSpec:
    """One pool of `node_count` nodes x 8 GPUs, racks of 4 nodes, blocks of 8 racks."""
    return TrainingClusterSpec.model_validate({"pools": [{
        "name": "h100", "gpu": "H100-80GB-HBM3", "nodes": node_count, "gpusPerNode": GPUS_PER_NODE,
        "topology": {"nodesPerRack": NODES_PER_RACK, "racksPerBlock": RACKS_PER_BLOCK}}]})


def free_gpus(nodes: list[NodeSnapshot], running: list[RunningGang]) -> dict[str, int]:
    """GPUs free on each node now: none on an unschedulable one."""
    free = {node.name: node.allocatable_gpus if node.schedulable else 0 for node in nodes}
    for gang in running:
        for name, gpus in gang.gpus_by_node.items():
            free[name] -= gpus
    return free


def first_fit_policy(skip_blocked: bool, keep_levels: bool = False) -> Planner:
    """A baseline in the planner's place: in queue order, each worker on the
    first node of its pool, in name order, with room. Not blocking: a job
    that does not fit is skipped; blocking: it stops its pool's queue.
    `keep_levels`: a job that requires a block or rack goes first-fit into
    the first one that holds it; otherwise topology is ignored."""

    def first_fit(nodes: list[NodeSnapshot], running: list[RunningGang], pending: list[PendingJob],
                  now: float) -> AdmissionPlan:
        free = free_gpus(nodes, running)
        # Only nodes with room now, each pool's in name order: a first fit
        # passes over the others anyway.
        with_room: dict[str, list[NodeSnapshot]] = {}
        for node in sorted((node for node in nodes if free[node.name] > 0), key=lambda node: node.name):
            with_room.setdefault(node.pool, []).append(node)
        admitted: dict[str, tuple[str, ...]] = {}
        blocked: set[str] = set()
        for job in queue_order(pending):
            if job.pool in blocked:
                continue
            pool_nodes = with_room.get(job.pool, [])
            if job.excluded_nodes:
                pool_nodes = [node for node in pool_nodes if node.name not in job.excluded_nodes]
            level = job.topology.required_level if keep_levels else None
            for group in domains(pool_nodes, level):
                ranks = first_fit_in(group, job, free)
                if ranks is not None:
                    admitted[job.key] = ranks
                    for name in ranks:
                        free[name] -= job.gpus_per_worker
                    break
            else:
                if not skip_blocked:
                    blocked.add(job.pool)
        return AdmissionPlan(admissions=admitted, preemptions=(), unschedulable={}, queue_positions={},
                             reservations={}, starts_by={})

    return first_fit


@dataclasses.dataclass
class IdleMeter:
    """A policy in the planner's place, and the GPUs it left free after each
    of its cycles while jobs waited, by where they were: on nodes held for a
    waiting head (its reservation), on whole idle nodes, or in parts of
    nodes. GPUs a gang gives back between two cycles (the simulated cycle
    lag) are not seen here; a policy runs only while jobs wait."""

    policy: Planner | None  # None: the operator's planner
    cache: CapacityCache = dataclasses.field(default_factory=CapacityCache)
    # (cycle time, GPUs held for heads, on whole idle nodes, in parts of nodes)
    cycles: list[tuple[float, int, int, int]] = dataclasses.field(default_factory=list)

    def __call__(self, nodes: list[NodeSnapshot], running: list[RunningGang], pending: list[PendingJob],
                 now: float) -> AdmissionPlan:
        plan = (plan_admissions(nodes, running, pending, now=now, cache=self.cache) if self.policy is None
                else self.policy(nodes, running, pending, now))
        free = free_gpus(nodes, running)
        worker_gpus = {job.key: job.gpus_per_worker for job in pending}
        for key, ranks in plan.admissions.items():
            for name in ranks:
                free[name] -= worker_gpus[key]
        held = {name for reserved in plan.reservations.values() for name in reserved}
        whole = {node.name for node in nodes if free[node.name] == node.allocatable_gpus} - held
        self.cycles.append((now, sum(free[name] for name in held), sum(free[name] for name in whole),
                            sum(gpus for name, gpus in free.items() if name not in held and name not in whole)))
        return plan

    def shares(self, report: Report, start: float, end: float) -> tuple[float, float, float]:
        """GPU-time left free after a cycle, as shares of all GPU-time from
        `start` to `end`: each cycle's state holds until the next cycle, or
        until the queue is empty (the report's samples say when)."""
        emptied = [sample.at for sample in report.samples if sample.queued_jobs == 0]
        totals = [0.0, 0.0, 0.0]
        for (at, *gpus), (following, *_) in zip(self.cycles, [*self.cycles[1:], (end, 0, 0, 0)], strict=True):
            empty_at = bisect.bisect_right(emptied, at)
            until = min(following, emptied[empty_at] if empty_at < len(emptied) else end, end)
            seconds = max(0.0, until - max(at, start))
            for kind, count in enumerate(gpus):
                totals[kind] += count * seconds
        available = report.total_gpus * (end - start)
        return totals[0] / available, totals[1] / available, totals[2] / available


def domains(nodes: list[NodeSnapshot], level: TopologyLevel | None) -> list[list[NodeSnapshot]]:
    """The pool, or its blocks or racks, each in name order."""
    if level is None:
        return [nodes]
    groups: dict[tuple[str, str], list[NodeSnapshot]] = {}
    for node in nodes:
        groups.setdefault((node.block, node.rack if level == "rack" else ""), []).append(node)
    return list(groups.values())


def first_fit_in(group: list[NodeSnapshot], job: PendingJob, free: dict[str, int]) -> tuple[str, ...] | None:
    """Each worker on the first node of `group` with room, or None if the
    job does not fit there."""
    ranks: list[str] = []
    for node in group:
        room = free[node.name]
        while len(ranks) < job.workers and room >= job.gpus_per_worker:
            room -= job.gpus_per_worker
            ranks.append(node.name)
        if len(ranks) == job.workers:
            return tuple(ranks)
    return None


def make_trace(node_count: int, hours: float, load: float, seed: int) -> list[TraceJob]:
    """Arrivals (Poisson) offering `load` x the pool's GPU-hours; durations
    log-normal with a median of 1.5 h, capped at 12 h; each job's limit its
    duration x U(1, 3), rounded up to a whole hour."""
    rng = random.Random(seed)
    capacity = node_count * GPUS_PER_NODE
    mean_gpus = sum(w * g * weight for (w, g), weight in JOB_SIZES.items()) / sum(
        JOB_SIZES.values()
    )
    mean_duration = 1.5 * HOUR * 1.13  # median x exp(sigma^2 / 2) for sigma 0.5
    rate = load * capacity / (mean_gpus * mean_duration)
    trace: list[TraceJob] = []
    clock = 0.0
    while True:
        clock += rng.expovariate(rate)
        if clock > hours * HOUR:
            return trace
        job = random_job(str(len(trace)), rng, "h100", clock, 0)
        duration = min(12 * HOUR, rng.lognormvariate(0, 0.5) * 1.5 * HOUR)
        trace.append(TraceJob(id=job.key, arrival=clock, workers=job.workers,
                              gpus_per_worker=job.gpus_per_worker, runtime=duration, pool=job.pool,
                              topology_level=job.topology.level, topology_mode=job.topology.mode,
                              deadline_s=limit_of(duration, rng.uniform(1.0, 3.0))))


def longest_wait(report: Report, jobs: Sequence[JobRecord]) -> str:
    """The longest wait among `jobs`; a job still queued at the end counts as
    waiting until then, and '>' says the longest is such a lower bound."""
    waits = [wait for wait in map(report.wait, jobs) if wait is not None]
    if not waits:
        return "    -  "
    wait, still_queued = max(waits)
    return f"{'>' if still_queued else ' '}{wait / HOUR:4.1f} h"


def bench_utilisation(node_count: int, hours: float, load: float, seed: int) -> tuple[str, dict[str, float]]:
    """One trace's table, and each policy's utilisation."""
    cluster = bench_cluster(node_count)
    trace = make_trace(node_count, hours, load, seed=seed)
    warmup, horizon = 6 * HOUR, hours * HOUR
    capacity = node_count * GPUS_PER_NODE
    largest_size = max(JOB_SIZES, key=lambda size: size[0] * size[1])
    offered = sum(job.gpus * job.runtime for job in trace) / (capacity * horizon)
    lines = [
        f"  offered load {offered:.2f}x (GPU-hours asked / available; target {load}x): "
        f"{len(trace)} jobs over {hours:.0f} h on {node_count} nodes ({capacity} GPUs), "
        f"a cycle every {CYCLE_SECONDS:.0f} s, utilisation from {warmup / HOUR:.0f} h to "
        f"{hours:.0f} h"
    ]
    without_limits = [dataclasses.replace(job, deadline_s=None) for job in trace]
    without_required = [dataclasses.replace(job, topology_mode="preferred") if job.topology_mode == "required"
                        else job for job in trace]
    results = {}
    for name, policy, jobs in (
        ("planner", None, trace),
        ("planner (no limits)", None, without_limits),
        ("planner (no required)", None, without_required),
        ("first-fit (blocking)", first_fit_policy(skip_blocked=False), trace),
        ("first-fit (skipping)", first_fit_policy(skip_blocked=True), trace),
        ("first-fit (skip, lvl)", first_fit_policy(skip_blocked=True, keep_levels=True), trace),
    ):
        meter = IdleMeter(policy)
        report = Simulation(cluster, jobs, cycle_s=CYCLE_SECONDS, planner=meter).run(until=horizon)
        utilisation = report.utilisation_between(warmup, horizon)
        held, whole, parts = meter.shares(report, warmup, horizon)
        results[name] = utilisation
        waits = sorted(job.first_admitted - job.trace.arrival
                       for job in report.jobs if job.first_admitted is not None)
        big = [job for job in report.jobs if job.trace.gpus >= 128]
        big_waits = sorted(job.first_admitted - job.trace.arrival
                           for job in big if job.first_admitted is not None)
        big_text = f"{statistics.median(big_waits) / HOUR:4.1f} h" if big_waits else "   -  "
        largest = [job for job in report.jobs
                   if (job.trace.workers, job.trace.gpus_per_worker) == largest_size]
        lines.append(
            f"    {name:<21} utilisation {utilisation:6.2%}   started {report.started:4d}   "
            f"median wait {statistics.median(waits) / HOUR:4.1f} h   "
            f">=128-GPU jobs: median wait {big_text}, "
            f"{sum(job.first_admitted is None for job in big):3d} never "
            f"started   {largest_size[0]}x{largest_size[1]} jobs: longest wait "
            f"{longest_wait(report, largest)}   required level broken {report.topology_broken}   "
            f"free while jobs waited: held for heads {held:.2%}, whole nodes {whole:.2%}, "
            f"parts of nodes {parts:.2%}"
        )
    lines.append(
        f"    utilisation ratio planner / first-fit (blocking) "
        f"{results['planner'] / results['first-fit (blocking)']:.3f}x, "
        f"planner / first-fit (skipping) "
        f"{results['planner'] / results['first-fit (skipping)']:.3f}x, "
        f"planner / first-fit (skip, lvl) "
        f"{results['planner'] / results['first-fit (skip, lvl)']:.3f}x"
    )
    return "\n".join(lines), results


def print_means(load: float, runs: Sequence[dict[str, float]]) -> None:
    """Mean utilisation of each policy over the seeds' traces, the planner's
    ratio to each baseline, and the paired difference per trace (planner
    minus baseline, in points) with its standard error and how many traces
    the planner led: one trace decides little when policies are a tenth of
    a point apart, and a trace moves every policy alike."""
    means = {name: statistics.mean(run[name] for run in runs) for name in runs[0]}
    print(f"  mean over {len(runs)} traces at target {load}x: " + ", ".join(
        f"{name} {value:.2%}" for name, value in means.items()))
    print("    planner / " + ", planner / ".join(
        f"{name} {means['planner'] / value:.4f}x" for name, value in means.items() if name != "planner"))
    for name in means:
        if name == "planner":
            continue
        differences = [100 * (run["planner"] - run[name]) for run in runs]
        error = statistics.stdev(differences) / len(differences) ** 0.5
        print(f"    planner - {name}: {statistics.mean(differences):+.3f} points per trace "
              f"(standard error {error:.3f}), ahead in {sum(d > 0 for d in differences)} of {len(runs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark of the TrainingJob admission planner.")
    parser.add_argument("--quick", action="store_true", help="fewer cycles, a shorter trace")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--traces", type=int, default=3,
                        help="traces per load (seeds from --seed on); their means are compared")
    parser.add_argument("--skip-latency", action="store_true", help="only the utilisation part")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="traces simulated at once, one process each (default: one per CPU)")
    args = parser.parse_args()
    cycles = 1 if args.quick else 3
    if not args.skip_latency:
        print("1. decision latency")
        for node_count in (5_000, 25_000):
            bench_decisions(node_count, 1_000, cycles, args.seed)
    print("2. utilisation on a simulated trace", flush=True)
    traces = 1 if args.quick else args.traces
    node_count, hours = (256, 36) if args.quick else (512, 72)
    loads = (0.9, 1.3)
    with ProcessPoolExecutor(max(1, min(args.jobs, traces * len(loads)))) as pool:
        # Both loads' traces at once, so no process waits for the first load's last trace.
        tables = {load: [pool.submit(bench_utilisation, node_count, hours, load, seed)
                         for seed in range(args.seed, args.seed + traces)] for load in loads}
        for load, futures in tables.items():
            runs = []
            for future in futures:
                table, results = future.result()
                print(table, flush=True)
                runs.append(results)
            if traces > 1:
                print_means(load, runs)


if __name__ == "__main__":
    main()
