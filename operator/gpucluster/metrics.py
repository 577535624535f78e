"""Every Prometheus metric of the operator, defined once.

Names follow Prometheus conventions: the `gpucluster_` prefix, base units
(seconds), `_total` for counters. The node agent's per-GPU metrics use
dcgm-exporter's names instead and live in `agent/exporter.py`, so existing
DCGM dashboards work unchanged.
"""

from prometheus_client import Counter, Gauge, Histogram

POOL_LABELS = ("cluster", "pool", "gpu")

pool_nodes = Gauge(
    "gpucluster_pool_nodes",
    "Nodes of a pool by state (desired, ready, healthy).",
    [*POOL_LABELS, "state"],
)
pool_gpus = Gauge(
    "gpucluster_pool_gpus",
    "GPUs of a pool by state (desired, ready, healthy, unhealthy, allocated, free).",
    [*POOL_LABELS, "state"],
)
reconcile_duration_seconds = Histogram(
    "gpucluster_reconcile_duration_seconds",
    "Time one reconcile of a resource took.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
reconcile_errors_total = Counter(
    "gpucluster_reconcile_errors_total",
    "Reconciles that ended in an error, by kind and reason.",
    ["kind", "reason"],
)
nodes_created_total = Counter(
    "gpucluster_nodes_created_total", "Nodes created by kwok pools.", POOL_LABELS
)
nodes_deleted_total = Counter(
    "gpucluster_nodes_deleted_total", "Nodes deleted by kwok pools.", POOL_LABELS
)

queue_depth = Gauge(
    "gpucluster_queue_depth", "TrainingJobs waiting for admission.", ["cluster"]
)
queue_oldest_wait_seconds = Gauge(
    "gpucluster_queue_oldest_wait_seconds",
    "How long the longest-waiting queued TrainingJob has waited.",
    ["cluster"],
)
admission_wait_seconds = Histogram(
    "gpucluster_admission_wait_seconds",
    "Time from a TrainingJob's creation (or restart) to its admission.",
    ["cluster"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 14400),
)
admission_decision_seconds = Histogram(
    "gpucluster_admission_decision_seconds",
    "Time the planner took to decide one admission cycle.",
    ["cluster"],
    # Up to 10 s: a cycle over a thousand queued jobs at 25,000 nodes takes
    # seconds, and a p99 above the last bound is only known to be above it.
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 2.5, 5, 10),
)
job_decision_seconds = Histogram(
    "gpucluster_admission_job_decision_seconds",
    "Time the planner took to decide one queued job inside an admission cycle (admit, place, "
    "reserve, preempt or wait), its placement search included.",
    ["cluster"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
)
jobs = Gauge("gpucluster_jobs", "TrainingJobs by phase.", ["cluster", "phase"])
gang_restarts_total = Counter(
    "gpucluster_gang_restarts_total",
    "Whole-gang restarts of TrainingJobs, by reason.",
    ["cluster", "reason"],
)
preemptions_total = Counter(
    "gpucluster_preemptions_total",
    "TrainingJobs evicted to admit a higher-priority job.",
    ["cluster"],
)

remediations_total = Counter(
    "gpucluster_remediations_total",
    "Remediation actions on nodes, by action (cordon, drain, replace, uncordon) and reason.",
    ["cluster", "pool", "action", "reason"],
)
remediation_budget_exhausted = Gauge(
    "gpucluster_remediation_budget_exhausted",
    "1 while a pool's remediation budget is spent and remediation waits.",
    ["cluster", "pool"],
)
