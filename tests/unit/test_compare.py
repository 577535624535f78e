"""bench/compare.py's pure parts: the stream, the manifests each system gets,
and the figures computed from watch times."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import compare  # noqa: E402


def test_the_stream_is_seeded_and_replays_from_its_file(tmp_path: Path) -> None:
    stream = compare.make_stream(nodes=1000, jobs=400, seed=7, load=1.5, median_runtime=60)
    assert stream == compare.make_stream(nodes=1000, jobs=400, seed=7, load=1.5, median_runtime=60)
    stream.save(tmp_path / "stream.json")
    assert compare.Stream.load(tmp_path / "stream.json") == stream
    assert stream.pools == {"h100": 800, "h200": 200}
    arrivals = [job.arrival for job in stream.jobs]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0
    assert {(j.workers, j.gpus_per_worker) for j in stream.jobs} <= set(compare.JOB_SIZES)
    assert max(j.gpus for j in stream.jobs) == 64 * 8 and min(j.gpus for j in stream.jobs) == 1
    assert all(j.runtime <= 240 for j in stream.jobs)
    required = [j for j in stream.jobs if j.topology_mode == "required"]
    assert {j.topology_level for j in required} == {"block", "rack"}
    assert all(j.workers <= (4 if j.topology_level == "rack" else 32) for j in required)


def test_arrivals_offer_the_load_asked() -> None:
    stream = compare.make_stream(nodes=1000, jobs=1000, seed=1, load=1.5, median_runtime=60)
    offered = sum(j.gpus * j.runtime for j in stream.jobs) / (8000 * stream.jobs[-1].arrival)
    assert 1.2 < offered < 1.8


def test_small_clusters_get_jobs_that_fit_their_pools() -> None:
    stream = compare.make_stream(nodes=16, jobs=200, seed=3, load=1.5, median_runtime=5)
    assert stream.pools == {"h100": 12, "h200": 4}
    assert all(j.workers <= stream.pools[j.pool] for j in stream.jobs)


def test_each_system_asks_for_the_topology_its_own_way() -> None:
    job = compare.StreamJob("j1", "h100", 4, 8, 0.0, 60.0, "rack", "required")
    queued = compare.batch_job(job, queued=True)
    template = queued["spec"]["template"]
    assert queued["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "h100"}
    assert template["metadata"]["annotations"] == {"kueue.x-k8s.io/podset-required-topology": "gpucluster.dev/rack"}
    assert "affinity" not in template["spec"]
    alone = compare.batch_job(job, queued=False)["spec"]["template"]["spec"]
    (term,) = alone["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term == {"labelSelector": {"matchLabels": {compare.JOB_LABEL: "j1"}}, "topologyKey": "gpucluster.dev/rack"}
    ours = compare.training_job(job)["spec"]
    assert ours["topology"] == {"level": "rack", "mode": "required"}
    assert (ours["workers"], ours["gpusPerWorker"], ours["pool"]) == (4, 8, "h100")


def pod(gpus: int, bound: float | None, released: float | None = None, node: str = "") -> compare.PodRecord:
    return compare.PodRecord("p", "j", gpus, node, bound, bound, released)


def test_partial_gangs_count_gpu_seconds_while_some_but_not_all_workers_are_bound() -> None:
    job = compare.JobRecord(compare.StreamJob("j", "h100", 3, 8, 0.0, 10.0),
                            pods=[pod(8, 0.0), pod(8, 5.0), pod(8, 7.0)], ending_at=20.0)
    # 8 GPUs for 5 s, then 16 for 2 s; all three bound from 7 s on.
    assert compare.partial_gang_gpu_seconds(job, end=30.0) == 8 * 5 + 16 * 2
    never_whole = compare.JobRecord(compare.StreamJob("k", "h100", 2, 8, 0.0, 10.0), pods=[pod(8, 1.0), pod(8, None)])
    assert compare.partial_gang_gpu_seconds(never_whole, end=11.0) == 80


def test_allocation_follows_binds_and_releases_until_the_run_stops() -> None:
    series = compare.allocation_series([pod(8, 1.0, 4.0), pod(2, 2.0)], t0=0.0, end=6.0)
    assert series == [(0.0, 0), (1.0, 8), (2.0, 10), (4.0, 2), (6.0, 2)]


def test_a_wait_percentile_on_a_job_never_bound_is_a_lower_bound() -> None:
    waits = [(1.0, True), (2.0, True), (50.0, False), (3.0, True)]
    assert compare.wait_percentile(waits, 0.5) == (3.0, True)
    assert compare.wait_percentile(waits, 0.99) == (50.0, False)


def test_a_required_level_spanned_is_a_violation() -> None:
    domains = {"a": ("h100/b000", "r0000"), "b": ("h100/b000", "r0001"), "c": ("h100/b001", "r0008")}
    job = compare.StreamJob("j", "h100", 2, 8, 0.0, 1.0, "rack", "required")
    assert compare.topology_violation(compare.JobRecord(job, bound_nodes=("a", "b")), domains)
    block = compare.StreamJob("j", "h100", 2, 8, 0.0, 1.0, "block", "required")
    assert not compare.topology_violation(compare.JobRecord(block, bound_nodes=("a", "b")), domains)
    assert compare.topology_violation(compare.JobRecord(block, bound_nodes=("a", "c")), domains)
    preferred = compare.StreamJob("j", "h100", 2, 8, 0.0, 1.0, "rack", "preferred")
    assert not compare.topology_violation(compare.JobRecord(preferred, bound_nodes=("a", "c")), domains)
