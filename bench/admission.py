"""Benchmark of the TrainingJob admission planner.

    PYTHONPATH=operator python bench/admission.py [--quick] [--seed N] [--traces K]
                                                  [--skip-latency]

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

2. Utilisation on a simulated trace. Jobs of mixed sizes (the same mix) and
   log-normal durations (median 1.5 h) arrive as a Poisson stream on a
   simulated clock, once near the pool's capacity and once well above it;
   every `CYCLE_SECONDS` the policy looks at the queue. Each job has a
   run-time limit (spec.activeDeadlineSeconds) as users set them: its
   duration times a factor drawn from 1 to 3, rounded up to a whole hour.
   Utilisation is
   allocated GPU-seconds over available GPU-seconds from the end of a
   warm-up to the end of arrivals. Policies, all on the same trace:
   - planner: `plan_admissions` (topology, best fit, reservation backfill,
     and backfill onto the head's reservation of jobs whose limits end them
     before the head's start);
   - planner (no limits): the same trace with no job declaring a limit;
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
   queued at the end counts until then): whether a policy starves them. One
   priority level, so no policy preempts.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gpucluster.planning.scheduling import (
    AdmissionCycle,
    NodeSnapshot,
    PendingJob,
    RunningGang,
    TopologyLevel,
    TopologyRequest,
    plan_admissions,
    queue_order,
)

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


# --- 2. utilisation on a simulated trace ---------------------------------------


@dataclass
class TraceJob:
    job: PendingJob
    duration: float


@dataclass
class Simulation:
    busy_gpu_seconds: float = 0.0
    waits: dict[str, float] = field(default_factory=dict)
    broken_required: int = 0


Policy = Callable[[list[NodeSnapshot], list[RunningGang], list[PendingJob], float],
                  dict[str, tuple[str, ...]]]


def planner_policy(
    nodes: list[NodeSnapshot], running: list[RunningGang], queue: list[PendingJob], now: float
) -> dict[str, tuple[str, ...]]:
    return dict(plan_admissions(nodes, running, queue, now=now).admissions)


def first_fit_policy(skip_blocked: bool, keep_levels: bool = False) -> Policy:
    def first_fit(
        nodes: list[NodeSnapshot], running: list[RunningGang], queue: list[PendingJob], now: float
    ) -> dict[str, tuple[str, ...]]:
        free = {node.name: node.allocatable_gpus for node in nodes}
        for gang in running:
            for name, gpus in gang.gpus_by_node.items():
                free[name] -= gpus
        admitted: dict[str, tuple[str, ...]] = {}
        for job in queue_order(queue):
            level = job.topology.required_level if keep_levels else None
            for group in domains(nodes, level):
                placed = first_fit_in(group, job, free)
                if placed is not None:
                    admitted[job.key], free = placed
                    break
            else:
                if not skip_blocked:
                    break
        return admitted

    return first_fit


def domains(nodes: list[NodeSnapshot], level: TopologyLevel | None) -> list[list[NodeSnapshot]]:
    """The pool, or its blocks or racks, each in name order."""
    if level is None:
        return [nodes]
    groups: dict[tuple[str, str], list[NodeSnapshot]] = {}
    for node in nodes:
        groups.setdefault((node.block, node.rack if level == "rack" else ""), []).append(node)
    return list(groups.values())


def first_fit_in(
    group: list[NodeSnapshot], job: PendingJob, free: dict[str, int]
) -> tuple[tuple[str, ...], dict[str, int]] | None:
    """Each worker on the first node of `group` with room, and what is free
    after, or None if the job does not fit there."""
    ranks: list[str] = []
    trial = dict(free)
    for node in group:
        while len(ranks) < job.workers and trial[node.name] >= job.gpus_per_worker:
            trial[node.name] -= job.gpus_per_worker
            ranks.append(node.name)
        if len(ranks) == job.workers:
            return tuple(ranks), trial
    return None


def make_trace(nodes: list[NodeSnapshot], hours: float, load: float, seed: int) -> list[TraceJob]:
    """Arrivals (Poisson) offering `load` x the pool's GPU-hours; durations
    log-normal with a median of 1.5 h, capped at 12 h."""
    rng = random.Random(seed)
    capacity = sum(node.allocatable_gpus for node in nodes)
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
        job = random_job(f"trace/{len(trace)}", rng, "h100", clock, 0)
        duration = min(12 * HOUR, rng.lognormvariate(0, 0.5) * 1.5 * HOUR)
        limit = math.ceil(duration * rng.uniform(1.0, 3.0) / HOUR) * HOUR
        trace.append(TraceJob(dataclasses.replace(job, time_limit=limit), duration))


def simulate(nodes: list[NodeSnapshot], trace: list[TraceJob], policy: Policy,
             warmup: float, horizon: float) -> Simulation:
    sim = Simulation()
    by_name = {node.name: node for node in nodes}
    durations = {item.job.key: item.duration for item in trace}
    arrivals = iter(trace)
    upcoming = next(arrivals, None)
    queue: dict[str, PendingJob] = {}
    running: dict[str, tuple[RunningGang, float]] = {}
    clock = 0.0
    while clock < horizon:
        while upcoming is not None and upcoming.job.arrival <= clock:
            queue[upcoming.job.key] = upcoming.job
            upcoming = next(arrivals, None)
        for key in [key for key, (_, end) in running.items() if end <= clock]:
            del running[key]
        admitted = policy(nodes, [gang for gang, _ in running.values()], list(queue.values()), clock)
        for key, ranks in admitted.items():
            job = queue.pop(key)
            end = clock + durations[key]
            usage = Counter({name: 0 for name in ranks})
            for name in ranks:
                usage[name] += job.gpus_per_worker
            ends_by = None if job.time_limit is None else clock + job.time_limit
            running[key] = (RunningGang(key, 0, job.pool, dict(usage), clock, ends_by=ends_by), end)
            sim.waits[key] = clock - job.arrival
            overlap = max(0.0, min(end, horizon) - max(clock, warmup))
            sim.busy_gpu_seconds += job.gpus * overlap
            level = job.topology.required_level
            if level is not None:
                spanned = {(by_name[n].block, by_name[n].rack if level == "rack" else "")
                           for n in ranks}
                sim.broken_required += len(spanned) > 1
        clock += CYCLE_SECONDS
    return sim


def longest_wait(sim: Simulation, jobs: Sequence[PendingJob], horizon: float) -> str:
    """The longest wait among `jobs`; a job still queued at the end counts as
    waiting until then, and '>' says the longest is such a lower bound."""
    waits = [(sim.waits.get(job.key, horizon - job.arrival), job.key not in sim.waits)
             for job in jobs]
    if not waits:
        return "    -  "
    wait, still_queued = max(waits)
    return f"{'>' if still_queued else ' '}{wait / HOUR:4.1f} h"


def bench_utilisation(node_count: int, hours: float, load: float, seed: int) -> dict[str, float]:
    """Prints one trace's table; returns each policy's utilisation."""
    rng = random.Random(seed)
    nodes = [
        NodeSnapshot(n.name, "h100", n.gpu_product, n.allocatable_gpus, n.block, n.rack)
        for n in make_nodes(node_count, rng)
    ]
    trace = make_trace(nodes, hours, load, seed=seed)
    warmup, horizon = 6 * HOUR, hours * HOUR
    capacity = sum(node.allocatable_gpus for node in nodes)
    big = {item.job.key for item in trace if item.job.gpus >= 128}
    largest_size = max(JOB_SIZES, key=lambda size: size[0] * size[1])
    largest = [item.job for item in trace
               if (item.job.workers, item.job.gpus_per_worker) == largest_size]
    offered = sum(item.job.gpus * item.duration for item in trace) / (capacity * horizon)
    print(
        f"  offered load {offered:.2f}x (GPU-hours asked / available; target {load}x): "
        f"{len(trace)} jobs over {hours:.0f} h on {node_count} nodes ({capacity} GPUs), "
        f"a cycle every {CYCLE_SECONDS:.0f} s, utilisation from {warmup / HOUR:.0f} h to "
        f"{hours:.0f} h"
    )
    without_limits = [TraceJob(dataclasses.replace(item.job, time_limit=None), item.duration)
                      for item in trace]
    results = {}
    for name, policy, jobs in (
        ("planner", planner_policy, trace),
        ("planner (no limits)", planner_policy, without_limits),
        ("first-fit (blocking)", first_fit_policy(skip_blocked=False), trace),
        ("first-fit (skipping)", first_fit_policy(skip_blocked=True), trace),
        ("first-fit (skip, lvl)", first_fit_policy(skip_blocked=True, keep_levels=True), trace),
    ):
        sim = simulate(nodes, jobs, policy, warmup, horizon)
        utilisation = sim.busy_gpu_seconds / (capacity * (horizon - warmup))
        results[name] = utilisation
        waits = sorted(sim.waits.values())
        big_waits = sorted(sim.waits[key] for key in big if key in sim.waits)
        big_text = f"{statistics.median(big_waits) / HOUR:4.1f} h" if big_waits else "   -  "
        print(
            f"    {name:<21} utilisation {utilisation:6.2%}   started {len(waits):4d}   "
            f"median wait {statistics.median(waits) / HOUR:4.1f} h   "
            f">=128-GPU jobs: median wait {big_text}, {len(big - set(sim.waits)):3d} never "
            f"started   {largest_size[0]}x{largest_size[1]} jobs: longest wait "
            f"{longest_wait(sim, largest, horizon)}   required level broken {sim.broken_required}"
        )
    print(
        f"    utilisation ratio planner / first-fit (blocking) "
        f"{results['planner'] / results['first-fit (blocking)']:.3f}x, "
        f"planner / first-fit (skipping) "
        f"{results['planner'] / results['first-fit (skipping)']:.3f}x, "
        f"planner / first-fit (skip, lvl) "
        f"{results['planner'] / results['first-fit (skip, lvl)']:.3f}x"
    )
    return results


def print_means(load: float, runs: Sequence[dict[str, float]]) -> None:
    """Mean utilisation of each policy over the seeds' traces, and the
    planner's ratio to each baseline: one trace decides little when the
    policies are a tenth of a point apart."""
    means = {name: statistics.mean(run[name] for run in runs) for name in runs[0]}
    print(f"  mean over {len(runs)} traces at target {load}x: " + ", ".join(
        f"{name} {value:.2%}" for name, value in means.items()))
    print("    planner / " + ", planner / ".join(
        f"{name} {means['planner'] / value:.4f}x" for name, value in means.items() if name != "planner"))


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark of the TrainingJob admission planner.")
    parser.add_argument("--quick", action="store_true", help="fewer cycles, a shorter trace")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--traces", type=int, default=3,
                        help="traces per load (seeds from --seed on); their means are compared")
    parser.add_argument("--skip-latency", action="store_true", help="only the utilisation part")
    args = parser.parse_args()
    cycles = 1 if args.quick else 3
    if not args.skip_latency:
        print("1. decision latency")
        for node_count in (5_000, 25_000):
            bench_decisions(node_count, 1_000, cycles, args.seed)
    print("2. utilisation on a simulated trace")
    traces = 1 if args.quick else args.traces
    for load in (0.9, 1.3):
        runs = [bench_utilisation(256 if args.quick else 512, 36 if args.quick else 72, load, seed)
                for seed in range(args.seed, args.seed + traces)]
        if traces > 1:
            print_means(load, runs)


if __name__ == "__main__":
    main()
