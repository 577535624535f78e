"""TrainingJob: N workers x G GPUs, admitted all-or-nothing, placed by
topology, queued by priority, restarted as a gang. Namespaced, short name `tj`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field
from pydantic.config import JsonDict

from gpucluster.planning.jobs import ACTIVE_PHASES, Phase

from .common import DNS_LABEL_PATTERN, CamelModel, Condition
from .gpus import GPUProduct

KIND = "TrainingJob"
PLURAL = "trainingjobs"
# Pod names are "<job>-<attempt>-<rank>" and hostnames "<job>-<rank>": both
# must stay DNS labels (63 characters).
MAX_JOB_NAME = 40
MAX_WORKERS = 8192
DEFAULT_MASTER_PORT = 29500
# Kubelets miss a status update now and then at this scale; a restart of a
# gang throws away its progress since the last checkpoint.
DEFAULT_NODE_FAILURE_GRACE_S = 60

_PRESERVE: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}


class JobTopology(CamelModel):
    """How close together the workers must be placed."""

    level: Literal["block", "rack"] = Field(
        description="The unit to keep the gang in: block (a scalable unit of racks) or rack.")
    mode: Literal["required", "preferred"] = Field(
        default="preferred",
        description="required: never span more than one unit of `level` (the job waits instead); "
                    "preferred: pack into one if possible, else the fewest.")


# A PodSpec is kept whole (preserved), but it must name its containers.
_POD_SPEC_SCHEMA: JsonDict = {
    **_PRESERVE,
    "required": ["containers"],
    "properties": {"containers": {
        "type": "array", "minItems": 1,
        "description": "The worker's containers; the first one gets the GPUs.",
        "items": {"type": "object", **_PRESERVE}}},
}


class PodTemplateSpec(CamelModel):
    """The pod every worker runs. gpucluster adds the GPU limit, the torchrun
    environment, the node binding, labels and owner reference."""

    model_config = ConfigDict(json_schema_extra=_PRESERVE)

    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Labels and annotations for the worker pods.",
        json_schema_extra=_PRESERVE)
    spec: dict[str, Any] = Field(
        description="A PodSpec; containers[0] is the trainer and gets the GPUs.",
        json_schema_extra=_POD_SPEC_SCHEMA)


class TrainingJobSpec(CamelModel):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "has(self.pool) || has(self.gpu)",
         "message": "set spec.pool (a pool of the TrainingCluster) or spec.gpu (a GPU product): "
                    "the job must know which GPUs it runs on",
         "reason": "FieldValueRequired"},
        {"rule": "!(has(self.priority) && has(self.priorityClassName))",
         "message": "set spec.priority or spec.priorityClassName, not both",
         "reason": "FieldValueForbidden"},
        {"rule": "self == oldSelf || (self.workers == oldSelf.workers && "
                 "self.gpusPerWorker == oldSelf.gpusPerWorker && self.cluster == oldSelf.cluster)",
         "message": "spec.cluster, spec.workers and spec.gpusPerWorker are immutable: "
                    "create a new TrainingJob to change the gang's shape",
         "reason": "FieldValueForbidden"},
    ]})

    cluster: str = Field(description="The TrainingCluster that runs the job.",
                         min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)
    pool: str | None = Field(default=None, description="The pool to run on (one of the cluster's pools).",
                             max_length=63, pattern=DNS_LABEL_PATTERN)
    gpu: GPUProduct | None = Field(
        default=None, description="The GPU product to run on, when no pool is named: the "
                                  "cluster's first pool of that product is used.")
    workers: int = Field(ge=1, le=MAX_WORKERS, description="Worker pods (torchrun nodes), all admitted at once.")
    gpusPerWorker: int = Field(ge=1, le=8, description="GPUs per worker, 1 to 8; 8 takes whole nodes.")
    template: PodTemplateSpec = Field(description="The worker pod template.")
    priority: int | None = Field(
        default=None, ge=-1_000_000, le=1_000_000_000,
        description="Queue priority; higher first. A higher-priority job may preempt whole "
                    "lower-priority gangs. Default 0.")
    priorityClassName: str | None = Field(
        default=None, max_length=253,
        description="A scheduling.k8s.io PriorityClass whose value is the priority, instead of spec.priority.")
    topology: JobTopology | None = Field(default=None, description="Placement constraint; none by default.")
    maxRestarts: int = Field(default=3, ge=0, le=1000,
                             description="Gang restarts allowed after a worker or node fails; then Failed.")
    nodeFailureGraceSeconds: int = Field(
        default=DEFAULT_NODE_FAILURE_GRACE_S, ge=0, le=3600,
        description="How long a node of the running gang may be NotReady or Unknown, or report a "
                    "transient GPU fault, before the gang restarts without it. A node deleted or a "
                    "fatal GPU fault restarts the gang at once. 0 restarts on the first sign.")
    activeDeadlineSeconds: int | None = Field(
        default=None, ge=1, description="Run time limit from admission; past it the job is Failed.")
    masterPort: int = Field(default=DEFAULT_MASTER_PORT, ge=1, le=65535,
                            description="The rendezvous port of rank 0 (MASTER_PORT).")


class TrainingJobStatus(CamelModel):
    phase: Phase = Field(default=Phase.QUEUED,
                            description="Queued, Admitted, Running, Restarting, Succeeded or Failed.")
    reason: str = Field(default="", description="Why the job is in its phase, one CamelCase word.")
    message: str = Field(default="", description="Details for a person.")
    observedGeneration: int = Field(default=0, description="The generation last acted on.")
    pool: str = Field(default="", description="The pool the job runs on.")
    priority: int = Field(default=0, description="The effective priority, from spec.priority or the PriorityClass.")
    queuePosition: int = Field(default=0,
        description="Position among the pool's waiting jobs (1 is next); 0 when not waiting.")
    startsBy: str | None = Field(default=None,
        description="For the head of its queue, waiting for running gangs that all have "
                    "spec.activeDeadlineSeconds: when it starts at the latest (RFC 3339). Jobs whose "
                    "limits end them by then may backfill onto its reserved nodes.")
    attempt: int = Field(default=0, description="The current gang attempt; pods carry it in their names.")
    restarts: int = Field(default=0, description="Gang restarts so far.")
    nodes: list[str] = Field(default_factory=list, description="Node of each rank, rank 0 first.")
    nodeList: str = Field(default="",
        description="The gang's distinct nodes in Slurm's hostlist notation, e.g. h100-[0000-0031].")
    excludedNodes: list[str] = Field(default_factory=list,
        description="Nodes a restart avoids: where a worker or node failed.")
    workersReady: str = Field(default="", description="Running/total workers, e.g. 4/4.")
    gpus: int = Field(default=0, description="GPUs the job holds.")
    queuedAt: str = Field(default="",
        description="When the current attempt began waiting (after a restart or preemption).")
    admittedAt: str = Field(default="", description="When the current attempt was admitted (RFC 3339).")
    firstAdmittedAt: str = Field(default="",
        description="When the job was first admitted; the run time limit counts from it.")
    completedAt: str = Field(default="", description="When the job Succeeded or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Admitted, Running and Finished.")


def _unchanged(field: str) -> str:
    """CEL: the optional spec.`field` is as it was. Spelt with has(): the API
    server's cost estimate takes `self.spec.?field == oldSelf.spec.?field`
    for unbounded."""
    return (f"has(self.spec.{field}) == has(oldSelf.spec.{field}) && "
            f"(!has(self.spec.{field}) || self.spec.{field} == oldSelf.spec.{field})")


class TrainingJob(CamelModel):
    """A distributed training run: `workers` pods of `gpusPerWorker` GPUs each,
    admitted all-or-nothing on one pool of a TrainingCluster, placed by
    topology, queued by priority, restarted as a gang on failure, with the
    torchrun environment set."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": f"self.metadata.name.size() <= {MAX_JOB_NAME} && self.metadata.name.matches('{DNS_LABEL_PATTERN}')",
         "message": f"metadata.name must be a DNS label of at most {MAX_JOB_NAME} characters: worker "
                    "hostnames are <name>-<rank>"},
        # Where the gang runs must not move under the pods that hold its GPUs.
        # The rule sits at the root because only there is the old status in
        # reach; a status update leaves the spec as it was, so it passes.
        {"rule": f"!has(oldSelf.status) || !has(oldSelf.status.phase) || "
                 f"!(oldSelf.status.phase in {sorted(p.value for p in ACTIVE_PHASES)}) || "
                 f"({' && '.join(_unchanged(field) for field in ('pool', 'gpu', 'topology'))})",
         "message": "spec.pool, spec.gpu and spec.topology are immutable while the job is Admitted or Running: "
                    "delete and recreate the job, or wait until it ends",
         "fieldPath": ".spec",
         "reason": "FieldValueForbidden"},
    ]})

    spec: TrainingJobSpec
    status: TrainingJobStatus | None = None
