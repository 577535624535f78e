"""Job traces for `gpucluster simulate`: the format, a reader that names the
line and field at fault, and a generator of synthetic traces.

One JSON object per line:

    {"id": "llama-7", "arrival": 3600, "workers": 64, "gpusPerWorker": 8,
     "runtime": 86400, "priority": 100, "gpu": "H100-80GB-HBM3",
     "topology": {"level": "block", "mode": "required"},
     "activeDeadlineSeconds": 172800}

- `arrival` and `runtime`: seconds (from the trace's start; of uninterrupted
  running). `id` is optional (the line number otherwise).
- `pool` or `gpu` chooses the pool as a TrainingJob's spec does (neither: the
  cluster's first pool); `priority` defaults to 0; `topology` is optional.
- `activeDeadlineSeconds` (optional): the job's run-time limit, as in its
  spec, counted from its first admission. The planner backfills a job onto
  a waiting head's reserved nodes when the limits prove it leaves in time;
  a job still running past its limit is Failed (DeadlineExceeded).

Public traces map onto it: Microsoft's Philly trace (`submitted_time` ->
arrival, the GPU count of an attempt's `detail` -> workers x gpusPerWorker,
the last attempt's `end_time - start_time` -> runtime), Alibaba's
cluster-trace-gpu-v2020 (`start_time` of the job -> arrival, `inst_num` ->
workers, `plan_gpu / 100` -> gpusPerWorker, `end_time - start_time` ->
runtime) and SenseTime's Helios (`submit_time`, `node_num`, `gpu_num /
node_num`, `duration`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpucluster.planning.admission_snapshot import TopologyLevel, TopologyMode


@dataclass(frozen=True)
class TraceJob:
    id: str
    arrival: float
    workers: int
    gpus_per_worker: int
    runtime: float
    priority: int = 0
    pool: str | None = None
    gpu: str | None = None
    topology_level: TopologyLevel | None = None
    topology_mode: TopologyMode = "preferred"
    deadline_s: int | None = None  # spec.activeDeadlineSeconds

    @property
    def gpus(self) -> int:
        return self.workers * self.gpus_per_worker

    def to_json(self) -> dict[str, Any]:
        line: dict[str, Any] = {"id": self.id, "arrival": round(self.arrival, 3), "workers": self.workers,
                                "gpusPerWorker": self.gpus_per_worker, "runtime": round(self.runtime, 3),
                                "priority": self.priority}
        if self.pool is not None:
            line["pool"] = self.pool
        if self.gpu is not None:
            line["gpu"] = self.gpu
        if self.topology_level is not None:
            line["topology"] = {"level": self.topology_level, "mode": self.topology_mode}
        if self.deadline_s is not None:
            line["activeDeadlineSeconds"] = self.deadline_s
        return line


class TraceError(ValueError):
    pass


def _field(obj: dict[str, Any], name: str, kind: type, where: str, default: Any = None) -> Any:
    value = obj.get(name, default)
    if value is None and default is None:
        raise TraceError(f"{where}: field {name!r} is required")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TraceError(f"{where}: field {name!r} must be {'a number' if kind is float else kind.__name__}, "
                         f"not {value!r}")
    return value


def parse_line(text: str, number: int) -> TraceJob:
    where = f"line {number}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise TraceError(f"{where}: not JSON ({err.msg})") from err
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object")
    workers = _field(obj, "workers", int, where)
    gpus = _field(obj, "gpusPerWorker", int, where)
    if workers < 1 or not 1 <= gpus <= 8:
        raise TraceError(f"{where}: workers must be >= 1 and gpusPerWorker 1 to 8")
    arrival, runtime = _field(obj, "arrival", float, where), _field(obj, "runtime", float, where)
    if arrival < 0 or runtime <= 0:
        raise TraceError(f"{where}: arrival must be >= 0 and runtime > 0 (seconds)")
    topology = obj.get("topology") or {}
    level, mode = topology.get("level"), topology.get("mode", "preferred")
    if level not in (None, "block", "rack") or mode not in ("required", "preferred"):
        raise TraceError(f"{where}: topology.level must be block or rack, topology.mode required or preferred")
    deadline = obj.get("activeDeadlineSeconds")
    if deadline is not None and (_field(obj, "activeDeadlineSeconds", int, where) < 1):
        raise TraceError(f"{where}: activeDeadlineSeconds must be >= 1 (seconds)")
    return TraceJob(id=str(obj.get("id", number)), arrival=arrival, workers=workers, gpus_per_worker=gpus,
                    runtime=runtime, priority=_field(obj, "priority", int, where, 0),
                    pool=obj.get("pool"), gpu=obj.get("gpu"), topology_level=level, topology_mode=mode,
                    deadline_s=deadline)


def read_trace(path: Path) -> list[TraceJob]:
    with open(path) as lines:
        jobs = [parse_line(line, n) for n, line in enumerate(lines, 1) if line.strip()]
    return sorted(jobs, key=lambda j: (j.arrival, j.id))


def write_trace(path: Path, jobs: Iterable[TraceJob]) -> None:
    with open(path, "w") as out:
        for job in jobs:
            out.write(json.dumps(job.to_json()) + "\n")


# Sizes in GPUs and their weights: many small jobs, few huge ones, as in
# published cluster traces (Philly, Helios), up to 2,048-GPU pretraining runs.
SIZE_WEIGHTS = {1: 30, 2: 8, 4: 8, 8: 20, 16: 10, 32: 8, 64: 6, 128: 4, 256: 3, 512: 1.5, 1024: 1, 2048: 0.5}


def generate(count: int, *, seed: int = 0, mean_interarrival: float = 60.0, mean_runtime: float = 4 * 3600.0,
             gpus: Iterable[str | None] = (None,), max_gpus: int = 2048, limits: bool = False
             ) -> Iterator[TraceJob]:
    """A synthetic trace: Poisson arrivals, sizes by SIZE_WEIGHTS (at most
    `max_gpus`), log-normal run times, three priorities, and a required or
    preferred topology for a share of the multi-node jobs. With `limits`,
    each job declares a run-time limit as users set them: its run time
    times a factor from 1 to 3, rounded up to a whole hour (the jobs drawn
    are the same with or without)."""
    rng = random.Random(seed)
    sizes = [s for s in SIZE_WEIGHTS if s <= max_gpus]
    weights = [SIZE_WEIGHTS[s] for s in sizes]
    products = list(gpus)
    # Limits come from a stream of their own, so the jobs are the same with or without.
    limits_rng = random.Random(f"{seed}-limits") if limits else None
    clock = 0.0
    for n in range(count):
        clock += rng.expovariate(1 / mean_interarrival)
        size = rng.choices(sizes, weights)[0]
        per_worker = min(size, 8)
        workers = size // per_worker
        level: TopologyLevel | None = None
        mode: TopologyMode = "preferred"
        if workers > 1 and rng.random() < 0.4:
            level = "rack" if workers <= 4 else "block"
            mode = "required" if rng.random() < 0.5 and workers <= 32 else "preferred"
        runtime = round(max(60.0, min(30 * 86400.0, rng.lognormvariate(0, 1.0) * mean_runtime / 1.65)), 3)
        priority = rng.choices([0, 100, 1000], [70, 25, 5])[0]
        gpu = rng.choice(products)
        deadline = limit_of(runtime, limits_rng.uniform(1.0, 3.0)) if limits_rng is not None else None
        yield TraceJob(id=f"job-{n:06d}", arrival=round(clock, 3), workers=workers, gpus_per_worker=per_worker,
                       runtime=runtime, priority=priority, gpu=gpu, topology_level=level, topology_mode=mode,
                       deadline_s=deadline)


def limit_of(runtime: float, factor: float) -> int:
    """A run-time limit as users set them: `factor` (>= 1) times the run
    time, rounded up to a whole hour."""
    return math.ceil(runtime * factor / 3600) * 3600
