"""gpucluster: a Kubernetes operator for NVIDIA H100/H200 training clusters."""

__version__ = "0.1.0"
