"""`gpucluster simulate`: replay a job trace on a TrainingCluster that may not
exist yet, through the operator's own lifecycle and planner.

    gpucluster simulate -f colossus.yaml --trace jobs.jsonl [--png out.png]
    gpucluster simulate -f colossus.yaml --generate 100000 --save-trace jobs.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pydantic
import yaml

from gpucluster.api import cluster as cluster_api
from gpucluster.sim.engine import Failures, Report, Simulation
from gpucluster.sim.trace import TraceError, generate, read_trace, write_trace


def add_parser(subparsers: Any) -> None:
    sim = subparsers.add_parser("simulate", help="replay a job trace on a TrainingCluster, simulated",
                                description=__doc__)
    sim.add_argument("-f", "--filename", required=True, type=Path, help="a TrainingCluster manifest")
    source = sim.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="a job trace, JSON lines (see gpucluster/sim/trace.py)")
    source.add_argument("--generate", type=int, metavar="JOBS", help="generate a synthetic trace of JOBS jobs")
    sim.add_argument("--save-trace", type=Path, help="write the generated trace here")
    sim.add_argument("--interarrival", type=float, default=60.0, help="generated: mean seconds between jobs")
    sim.add_argument("--runtime", type=float, default=4 * 3600.0, help="generated: mean run time, seconds")
    sim.add_argument("--limits", action="store_true",
                     help="generated: each job declares activeDeadlineSeconds, its run time x 1 to 3 "
                          "rounded up to a whole hour")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--cycle", type=float, default=60.0,
                     help="simulated seconds between admission cycles (default: %(default)s)")
    sim.add_argument("--fatal-rate", type=float, default=0.0, help="fatal GPU faults per GPU-hour")
    sim.add_argument("--transient-rate", type=float, default=0.0, help="transient NotReady per GPU-hour")
    sim.add_argument("--transient-mean", type=float, default=30.0, help="mean NotReady length, seconds")
    sim.add_argument("--repair-hours", type=float, default=4.0, help="a fatal node's time out of service")
    sim.add_argument("--checkpoint-minutes", type=float, default=30.0,
                     help="a restart loses the work since the last checkpoint (default: %(default)s)")
    sim.add_argument("--grace", type=float, default=60.0, help="the jobs' nodeFailureGraceSeconds")
    sim.add_argument("--until", type=float, metavar="HOURS",
                     help="stop at this simulated hour, with jobs still queued or running")
    sim.add_argument("--warmup", type=float, default=0.0, metavar="HOURS",
                     help="measure utilisation from this hour on (default: the first arrival)")
    sim.add_argument("--png", type=Path, help="write GPUs allocated, queue depth and waits by size here")
    sim.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(func=run)


def load_cluster(path: Path) -> cluster_api.TrainingClusterSpec:
    try:
        manifest = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"error: {path}: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("kind") != cluster_api.KIND:
        raise SystemExit(f"error: {path}: expected a {cluster_api.KIND} manifest")
    try:
        return cluster_api.TrainingClusterSpec.model_validate(manifest.get("spec") or {})
    except pydantic.ValidationError as err:
        problems = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise SystemExit(f"error: {path}: {problems}") from err


def summary(report: Report, seconds: float, warmup_s: float = 0.0) -> dict[str, Any]:
    waits = report.waits_by_size()
    utilisation = report.utilisation_between(warmup_s, report.end) if warmup_s else report.utilisation
    return {
        "jobs": len(report.jobs), "started": report.started, "completed": report.completed,
        "rejected": sum(1 for j in report.jobs if j.rejected),
        "deadline_exceeded": sum(1 for j in report.jobs if j.failed_reason == "DeadlineExceeded"),
        "gpus": report.total_gpus, "makespan_hours": round(report.makespan / 3600, 2),
        "utilisation": round(utilisation, 4), "cycles": report.cycles,
        "preemptions": report.preemptions, "restarts": report.restarts,
        "restarts_by_reason": report.restarts_by_reason, "gpu_hours_lost": round(report.gpu_hours_lost, 1),
        "fatal_faults": report.fatal_faults, "transient_faults": report.transient_faults,
        "repairs_waited_for_budget": report.repairs_waited,
        "required_topology_jobs": report.topology_required, "required_topology_kept": report.topology_kept,
        "wait_minutes_by_gpus": {size: {"p50": round(statistics.median(w) / 60, 1),
                                        "max": round(max(w) / 60, 1), "jobs": len(w)}
                                 for size, w in waits.items()},
        "wall_seconds": round(seconds, 1),
    }


def print_table(result: dict[str, Any]) -> None:
    for key, value in result.items():
        if key != "wait_minutes_by_gpus":
            print(f"{key:>28}  {value}")
    print(f"{'GPUs per job':>28}  {'jobs':>6} {'wait p50 min':>13} {'wait max min':>13}")
    for size, wait in result["wait_minutes_by_gpus"].items():
        print(f"{size:>28}  {wait['jobs']:>6} {wait['p50']:>13} {wait['max']:>13}")


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [s.at / 3600 for s in report.samples]
    figure, (allocation, queue, waits) = plt.subplots(3, 1, figsize=(10, 10))
    allocation.step(hours, [s.allocated_gpus for s in report.samples], where="post", label="allocated")
    allocation.step(hours, [s.gpus_in_service for s in report.samples], where="post", label="in service")
    allocation.set_ylabel("GPUs")
    allocation.set_title(f"utilisation {report.utilisation:.1%} of {report.total_gpus:,} GPUs")
    allocation.legend(loc="lower right")
    queue.step(hours, [s.queued_jobs for s in report.samples], where="post", color="tab:orange")
    queue.set_ylabel("jobs waiting")
    queue.set_xlabel("hours")
    by_size = report.waits_by_size()
    waits.boxplot([[w / 60 for w in by_size[s]] for s in by_size], tick_labels=[str(s) for s in by_size])
    waits.set_xlabel("GPUs per job")
    waits.set_ylabel("wait, minutes")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    cluster = load_cluster(args.filename)
    if args.trace:
        try:
            trace = read_trace(args.trace)
        except (OSError, TraceError) as err:
            print(f"error: {args.trace}: {err}", file=sys.stderr)
            return 2
    else:
        gpus = sorted({p.gpu.value for p in cluster.pools})
        trace = list(generate(args.generate, seed=args.seed, mean_interarrival=args.interarrival,
                              mean_runtime=args.runtime, gpus=gpus, limits=args.limits,
                              max_gpus=max(p.nodes * p.gpusPerNode for p in cluster.pools)))
        if args.save_trace:
            write_trace(args.save_trace, trace)
    failures = Failures(fatal_per_gpu_hour=args.fatal_rate, transient_per_gpu_hour=args.transient_rate,
                        transient_mean_s=args.transient_mean, repair_s=args.repair_hours * 3600,
                        checkpoint_s=args.checkpoint_minutes * 60)
    simulation = Simulation(cluster, trace, failures=failures, seed=args.seed, cycle_s=args.cycle,
                            grace_s=args.grace)
    started = time.monotonic()
    until = None if args.until is None else args.until * 3600
    if args.quiet:
        report = simulation.run(until=until)
    else:
        from tqdm import tqdm

        horizon = trace[-1].arrival if trace else 0.0
        with tqdm(total=len(trace), unit="job", desc="arrived", file=sys.stderr) as bar:
            def progress(now: float, arrived: int) -> None:
                bar.update(arrived - bar.n)
                bar.set_postfix_str(f"day {now / 86400:.1f} of {horizon / 86400:.1f}+", refresh=False)

            report = simulation.run(progress, until=until)
    result = summary(report, time.monotonic() - started, args.warmup * 3600)
    if args.output == "json":
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    if args.png:
        plot(report, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0
