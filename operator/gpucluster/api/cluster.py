"""TrainingCluster: node pools of H100/H200 nodes, reconciled to the declared
size and kept healthy. Cluster-scoped, short name `tc`."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ConfigDict, Field

from gpucluster.planning.jobs import PoolFacts

from .common import DNS_LABEL_PATTERN, CamelModel, Condition, LabelValue, Taint, cel_quoted, label_keys_validation
from .gpus import GPUProduct

KIND = "TrainingCluster"
PLURAL = "trainingclusters"
MAX_POOLS = 32
# Node names are "<cluster>-<pool>-<5-digit ordinal>"; these bounds keep them
# valid label values (63 characters) too.
MAX_CLUSTER_NAME = 30
MAX_POOL_NAME = 24


class Provider(StrEnum):
    KWOK = "kwok"
    STATIC = "static"


class PoolTopology(CamelModel):
    """How the pool's nodes are grouped into racks and blocks, the units
    placement packs a gang into (an NVLink/InfiniBand rail group, a scalable
    unit). Written on each node as `gpucluster.dev/rack` and `gpucluster.dev/block`."""

    nodesPerRack: int = Field(
        default=4, ge=1, le=256, description="Nodes in one rack (written as label gpucluster.dev/rack)."
    )
    racksPerBlock: int = Field(
        default=8, ge=1, le=256, description="Racks in one block (written as label gpucluster.dev/block)."
    )


class RemediationPolicy(CamelModel):
    """How a pool heals GPU faults: the quarantine budget (a circuit breaker
    in NVSentinel's manner) and whether fatally failed nodes are replaced."""

    maxUnavailable: int | str = Field(
        default="10%",
        description="Most nodes of the pool out of service at once (quarantined, NotReady or missing): "
                    "a count or a percent of the pool's nodes. Past it, faulty nodes wait and the "
                    "cluster reports Degraded/RemediationBudgetExhausted.",
        json_schema_extra={"x-kubernetes-int-or-string": True, "maxLength": 4, "x-kubernetes-validations": [{
            "rule": "type(self) == int ? self >= 0 : self.matches('^(100|[1-9]?[0-9])%$')",
            "message": "must be a node count of 0 or more (e.g. 2) or a percent of the pool's nodes "
                       "from 0% to 100% (e.g. 10%)",
            "messageExpression": f"{cel_quoted('string(self)')} + \" is neither a node count of 0 or more "
                                 "(e.g. 2) nor a percent of the pool's nodes from 0% to 100% (e.g. 10%)\"",
        }]},
    )
    maxPerWindow: int = Field(
        default=0, ge=0, le=100000,
        description="Most new quarantines in windowSeconds (0: only maxUnavailable limits).")
    windowSeconds: int = Field(default=600, ge=1, le=86400,
                               description="The sliding window of maxPerWindow, in seconds.")
    replace: bool = Field(
        default=True,
        description="Replace a node with a fatal GPU fault by a new one once drained (kwok pools; "
                    "a static node stays quarantined for a person).")


class NodePool(CamelModel):
    """A set of identical GPU nodes."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.provider != 'static' || has(self.nodeSelector)",
                    "message": "nodeSelector is required when provider is static: "
                               "it selects the existing nodes to adopt",
                    "fieldPath": ".nodeSelector",
                    "reason": "FieldValueRequired",
                },
                {
                    "rule": "self.provider != 'kwok' || !has(self.nodeSelector)",
                    "message": "nodeSelector is only for provider static: a kwok pool creates its own nodes; "
                               "remove nodeSelector or set provider: static",
                    "fieldPath": ".nodeSelector",
                    "reason": "FieldValueForbidden",
                },
            ]
        }
    )

    name: str = Field(
        description="Pool name, unique in the cluster; a DNS label, written on nodes as gpucluster.dev/pool.",
        min_length=1,
        max_length=MAX_POOL_NAME,
        pattern=DNS_LABEL_PATTERN,
    )
    gpu: GPUProduct = Field(description="The GPU product of every node of the pool.")
    gpusPerNode: int = Field(default=8, ge=1, le=8, description="GPUs per node, 1 to 8.")
    nodes: int = Field(
        ge=0,
        le=99999,
        description="Desired number of nodes. 0 keeps the pool with no nodes.",
    )
    provider: Provider = Field(
        default=Provider.KWOK,
        description="kwok creates simulated nodes that KWOK runs; static adopts existing nodes "
        "matching nodeSelector and never deletes them.",
    )
    nodeSelector: dict[str, LabelValue] | None = Field(
        default=None,
        description="Labels of the existing nodes a static pool adopts. Required for static, "
        "forbidden for kwok.",
        json_schema_extra={"minProperties": 1, "maxProperties": 32, **label_keys_validation()},
    )
    topology: PoolTopology = Field(
        default_factory=PoolTopology, description="Racks and blocks the nodes are grouped into."
    )
    labels: dict[str, LabelValue] = Field(
        default_factory=dict,
        description="Extra labels on every node of the pool.",
        json_schema_extra={"maxProperties": 64, **label_keys_validation()},
    )
    taints: list[Taint] = Field(
        default_factory=list,
        description="Taints on every node of the pool.",
        max_length=32,
    )
    remediation: RemediationPolicy = Field(
        default_factory=RemediationPolicy, description="How GPU faults of the pool's nodes are remediated.")

    def facts(self) -> PoolFacts:
        """What a job's submission check needs to know of the pool."""
        return PoolFacts(name=self.name, gpu=self.gpu.value, gpus_per_node=self.gpusPerNode, nodes=self.nodes,
                         nodes_per_rack=self.topology.nodesPerRack, racks_per_block=self.topology.racksPerBlock)


class TrainingClusterSpec(CamelModel):
    pools: list[NodePool] = Field(
        description="Node pools; names must be unique.",
        min_length=1,
        max_length=MAX_POOLS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class PoolStatus(CamelModel):
    name: str = Field(description="Pool name.")
    gpu: str = Field(default="", description="GPU product.")
    desiredNodes: int = Field(default=0, description="Nodes the spec asks for.")
    nodes: int = Field(default=0, description="Nodes that exist and belong to the pool.")
    readyNodes: int = Field(default=0, description="Nodes whose Ready condition is True.")
    healthyNodes: int = Field(
        default=0, description="Ready nodes whose GPUs are healthy and that are not cordoned."
    )
    desiredGPUs: int = Field(default=0, description="desiredNodes x gpusPerNode.")
    readyGPUs: int = Field(default=0, description="GPUs on ready nodes.")
    healthyGPUs: int = Field(default=0, description="GPUs on healthy nodes.")
    quarantinedNodes: int = Field(default=0, description="Nodes cordoned and tainted for a GPU fault.")


class PoolRemediationStatus(CamelModel):
    recentQuarantines: list[str] = Field(
        default_factory=list, description="When nodes were quarantined within the window (RFC 3339).")
    waiting: list[str] = Field(
        default_factory=list, description="Faulty nodes waiting for the budget to allow their quarantine.")


class TrainingClusterStatus(CamelModel):
    observedGeneration: int = Field(default=0, description="The generation last reconciled.")
    pools: list[PoolStatus] = Field(default_factory=list, description="Per-pool counts.")
    nodes: str = Field(default="", description="Ready/desired nodes of all pools, e.g. 80/80.")
    readyGPUs: int = Field(default=0, description="GPUs on ready nodes of all pools.")
    healthyGPUs: int = Field(default=0, description="GPUs on healthy nodes of all pools.")
    poolNames: str = Field(default="", description="Pool names, comma separated (for kubectl get).")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Progressing and Degraded."
    )
    remediation: dict[str, PoolRemediationStatus] = Field(
        default_factory=dict, description="Per pool: recent quarantines and nodes waiting for budget.")


class TrainingCluster(CamelModel):
    """A GPU training cluster: node pools of NVIDIA H100/H200 nodes that the
    operator creates (kwok) or adopts (static), labels for topology-aware
    placement, and keeps at the declared size."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self.metadata.name.size() <= {MAX_CLUSTER_NAME} && "
                    f"self.metadata.name.matches('{DNS_LABEL_PATTERN}')",
                    "message": f"metadata.name must be a DNS label of at most {MAX_CLUSTER_NAME} "
                    "characters (lower-case letters, digits, '-'): it is written on nodes as a label value",
                }
            ]
        }
    )

    spec: TrainingClusterSpec
    status: TrainingClusterStatus | None = None
