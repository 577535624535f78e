"""TrainingCluster: node pools of H100/H200 nodes, reconciled to the declared
size and kept healthy. Cluster-scoped, short name `tc`."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from pydantic.config import JsonDict

from gpucluster.planning.jobs import PoolFacts

from .common import (
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    NONEMPTY_LABEL_VALUE_PATTERN,
    CamelModel,
    Condition,
    LabelValue,
    Taint,
    cel_quoted,
    label_keys_validation,
)
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
    KARPENTER = "karpenter"


# A karpenter pool without instanceTypes asks for these: AWS's 8-GPU HGX
# instances (p5: H100 80GB; p5e and p5en: H200 141GB, p5en with faster
# EFA networking). A KWOK test cluster defines types of the same names.
DEFAULT_INSTANCE_TYPES: dict[GPUProduct, tuple[str, ...]] = {
    GPUProduct.H100_80GB_HBM3: ("p5.48xlarge",),
    GPUProduct.H200_141GB: ("p5e.48xlarge", "p5en.48xlarge"),
}
DEFAULT_SLOW_LAUNCH_S = 600
InstanceType = Annotated[str, Field(min_length=1, max_length=63, pattern=NONEMPTY_LABEL_VALUE_PATTERN)]


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
        description="Replace a node with a fatal GPU fault by a new one once drained (kwok pools; in "
                    "karpenter pools its NodeClaim is deleted and Karpenter launches another; a static node "
                    "stays quarantined for a person).")


class NodeClassRef(CamelModel):
    """The Karpenter NodeClass a karpenter pool's nodes launch from: an
    EC2NodeClass (group karpenter.k8s.aws) on AWS, a KWOKNodeClass (group
    karpenter.kwok.sh) in a KWOK test cluster, or another provider's."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "self.group == oldSelf.group && self.kind == oldSelf.kind",
        "message": "nodeClassRef.group and nodeClassRef.kind are immutable (Karpenter refuses the change on its "
                   "NodePool); to move to another kind of NodeClass, add a new pool and remove this one",
    }]})

    group: str = Field(description="API group of the NodeClass, e.g. karpenter.k8s.aws or karpenter.kwok.sh.",
                       min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    kind: str = Field(description="Kind of the NodeClass, e.g. EC2NodeClass or KWOKNodeClass.",
                      min_length=1, max_length=63, pattern=r"^[A-Z][A-Za-z0-9]*$")
    name: str = Field(description="Name of the NodeClass. Changing it replaces every node of the pool "
                                  "(Karpenter's drift), one budget at a time.",
                      min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)


def _only_for(provider: Provider, field: str, why: str) -> JsonDict:
    return {"rule": f"self.provider == '{provider.value}' || !has(self.{field})",
            "message": f"{field} is only for provider {provider.value}: {why}",
            "fieldPath": f".{field}", "reason": "FieldValueForbidden"}


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
                _only_for(Provider.STATIC, "nodeSelector", "a kwok or karpenter pool creates its own nodes; "
                          "remove nodeSelector or set provider: static"),
                {
                    "rule": "self.provider != 'karpenter' || has(self.nodeClassRef)",
                    "message": "nodeClassRef is required when provider is karpenter: it names the Karpenter "
                               "NodeClass the nodes launch from (group, kind, name)",
                    "fieldPath": ".nodeClassRef",
                    "reason": "FieldValueRequired",
                },
                _only_for(Provider.KARPENTER, "nodeClassRef", "remove it or set provider: karpenter"),
                _only_for(Provider.KARPENTER, "instanceTypes", "remove it or set provider: karpenter"),
                _only_for(Provider.KARPENTER, "slowLaunchSeconds", "remove it or set provider: karpenter"),
                {
                    "rule": "self.provider != 'karpenter' || has(self.instanceTypes) || self.gpusPerNode == 8",
                    "message": "the default instanceTypes of a karpenter pool have 8 GPUs: set gpusPerNode: 8, "
                               "or list instanceTypes with gpusPerNode GPUs",
                    "fieldPath": ".gpusPerNode",
                    "reason": "FieldValueInvalid",
                },
                {
                    "rule": "self.provider == oldSelf.provider || "
                            "(self.provider != 'karpenter' && oldSelf.provider != 'karpenter')",
                    "message": "provider cannot change to or from karpenter (Karpenter owns such a pool's nodes): "
                               "add a pool under a new name and remove this one",
                    "fieldPath": ".provider",
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
        "matching nodeSelector and never deletes them; karpenter owns a Karpenter NodePool of exactly "
        "`nodes` replicas (Karpenter >= 1.8 with the StaticCapacity feature gate) and Karpenter launches "
        "the machines.",
    )
    nodeClassRef: NodeClassRef | None = Field(
        default=None, description="karpenter pools (required there): the NodeClass the nodes launch from.")
    instanceTypes: list[InstanceType] | None = Field(
        default=None, min_length=1, max_length=32,
        description="karpenter pools: the instance types Karpenter may launch (node.kubernetes.io/instance-type), "
                    "each with gpusPerNode GPUs of the pool's gpu. Default: "
                    + "; ".join(f"{gpu.value}: {', '.join(types)}" for gpu, types in DEFAULT_INSTANCE_TYPES.items())
                    + " (AWS).",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    slowLaunchSeconds: int | None = Field(
        default=None, ge=1, le=86400,
        description=f"karpenter pools: a NodeClaim not Ready this long after its creation is reported "
                    f"(Warning NodeClaimSlow). Default {DEFAULT_SLOW_LAUNCH_S}.",
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

    def instance_types(self) -> tuple[str, ...]:
        return tuple(self.instanceTypes) if self.instanceTypes else DEFAULT_INSTANCE_TYPES[self.gpu]

    def slow_launch_seconds(self) -> int:
        return self.slowLaunchSeconds or DEFAULT_SLOW_LAUNCH_S

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


class PoolProvisioning(CamelModel):
    """A karpenter pool's NodePool and NodeClaims, through Karpenter's
    launch stages (Launched, Registered, Initialized, Ready)."""

    nodePool: str = Field(description="The Karpenter NodePool the operator owns for the pool.")
    nodePoolReady: str = Field(default="Unknown", description="The NodePool's Ready condition: True, False or "
                                                              "Unknown (then the message says why).")
    message: str = Field(default="", description="Why the NodePool is not Ready, as Karpenter says.")
    nodeClaims: int = Field(default=0, description="NodeClaims of the pool, including those being deleted.")
    launched: int = Field(default=0, description="NodeClaims whose machine was launched.")
    registered: int = Field(default=0, description="NodeClaims whose node registered with the API server.")
    initialized: int = Field(default=0, description="NodeClaims whose node finished initialising.")
    ready: int = Field(default=0, description="NodeClaims that are Ready.")
    slow: list[str] = Field(default_factory=list,
                            description="NodeClaims not Ready after slowLaunchSeconds (at most 20 listed).")
    failed: list[str] = Field(default_factory=list,
                              description="NodeClaims whose launch failed (at most 20 listed).")


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
    provisioning: PoolProvisioning | None = Field(
        default=None, description="karpenter pools: the NodePool and its NodeClaims' launch stages.")

    @model_serializer(mode="wrap")
    def _without_provisioning_of_other_pools(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Absent rather than null: the status written is compared with the
        # status read, which never holds a null.
        dumped: dict[str, Any] = handler(self)
        if dumped.get("provisioning") is None:
            dumped.pop("provisioning", None)
        return dumped


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
    provisioning: str = Field(
        default="", description="karpenter pools' NodeClaims by launch stage, e.g. "
                                "'4/4 launched, 4 registered, 3 initialized, 3 ready' (for kubectl get).")
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
