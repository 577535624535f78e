"""Every label, annotation, taint, condition type and resource name gpucluster
reads or writes, defined once. Names the ecosystem already uses (NVIDIA GPU
feature discovery, the device plugin, KWOK) are kept exactly as upstream spells
them so other tools interoperate."""

GROUP = "gpucluster.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Resource and GPU feature discovery labels (NVIDIA's spelling).
GPU_RESOURCE = "nvidia.com/gpu"
LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
LABEL_GPU_COUNT = "nvidia.com/gpu.count"
LABEL_GPU_MEMORY = "nvidia.com/gpu.memory"
LABEL_GPU_FAMILY = "nvidia.com/gpu.family"
LABEL_GPU_COMPUTE_MAJOR = "nvidia.com/gpu.compute.major"
LABEL_GPU_COMPUTE_MINOR = "nvidia.com/gpu.compute.minor"
LABEL_GPU_PRESENT = "nvidia.com/gpu.present"

# The quarantine taint NVIDIA's tooling uses for a node with a failed GPU.
TAINT_GPU_ERROR = "nvidia.com/gpu-error"

# KWOK takes over the kubelet role for nodes carrying this annotation.
ANNOTATION_KWOK_NODE = "kwok.x-k8s.io/node"
KWOK_NODE_VALUE = "fake"
# A simulated cluster may run several KWOK controllers, each managing the
# nodes of some buckets (devcluster.py says why); a node's bucket, a hash of
# its name, is in this label. A node without it goes to the first controller.
LABEL_KWOK_SHARD = "gpucluster.dev/kwok-shard"
KWOK_SHARD_BUCKETS = 16

# Ownership of nodes: the labels on the nodes are the state of a pool.
LABEL_CLUSTER = f"{GROUP}/cluster"
LABEL_POOL = f"{GROUP}/pool"
LABEL_PROVIDER = f"{GROUP}/provider"
LABEL_BLOCK = f"{GROUP}/block"
LABEL_RACK = f"{GROUP}/rack"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "gpucluster"

# Written by the node agent: the node condition both the job controller and
# remediation read, and the number of GPUs the agent found healthy.
CONDITION_GPU_HEALTHY = "GPUHealthy"
# Fake GPUs only: faults to inject, read by the fake backend and the fleet.
ANNOTATION_INJECT_FAULT = f"{GROUP}/inject-fault"
ANNOTATION_HEALTHY_GPUS = f"{GROUP}/healthy-gpus"
ANNOTATION_UNHEALTHY_GPUS = f"{GROUP}/unhealthy-gpus"

# Job pods.
LABEL_JOB_NAME = f"{GROUP}/job"
LABEL_JOB_RANK = f"{GROUP}/rank"
LABEL_JOB_ATTEMPT = f"{GROUP}/attempt"

FINALIZER = f"{GROUP}/finalizer"

# Karpenter (provider: karpenter): its API, the labels it and the cloud
# write on nodes, and AWS's network topology labels (layer 1 the top of the
# hierarchy, layer 3 the network node the instance hangs off).
KARPENTER_GROUP = "karpenter.sh"
KARPENTER_VERSION = "v1"
KARPENTER_NODEPOOLS = "nodepools"
KARPENTER_NODECLAIMS = "nodeclaims"
LABEL_KARPENTER_NODEPOOL = f"{KARPENTER_GROUP}/nodepool"
LABEL_INSTANCE_TYPE = "node.kubernetes.io/instance-type"
LABEL_AWS_NETWORK_LAYER_2 = "topology.k8s.aws/network-node-layer-2"
LABEL_AWS_NETWORK_LAYER_3 = "topology.k8s.aws/network-node-layer-3"
ANNOTATION_NODEPOOL_APPLIED = f"{GROUP}/applied"
