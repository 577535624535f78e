"""The GPU products gpucluster provisions, with the figures NVIDIA's GPU
feature discovery writes for them (read off real boards; see
shared/gpu-profiles)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class GPUProduct(StrEnum):
    H100_80GB_HBM3 = "H100-80GB-HBM3"
    H200_141GB = "H200-141GB"


@dataclass(frozen=True)
class GPUFacts:
    nvml_name: str
    memory_mib: int
    compute_capability: tuple[int, int]
    family: str
    profile: str

    @property
    def gfd_product(self) -> str:
        """`nvidia.com/gpu.product` as GFD spells it: the NVML name, spaces as dashes."""
        return self.nvml_name.replace(" ", "-")


GPU_FACTS: dict[GPUProduct, GPUFacts] = {
    GPUProduct.H100_80GB_HBM3: GPUFacts(
        nvml_name="NVIDIA H100 80GB HBM3",
        memory_mib=81559,
        compute_capability=(9, 0),
        family="hopper",
        profile="h100-80gb-hbm3",
    ),
    GPUProduct.H200_141GB: GPUFacts(
        nvml_name="NVIDIA H200",
        memory_mib=143771,
        compute_capability=(9, 0),
        family="hopper",
        profile="h200-141gb",
    ),
}

PRODUCT_BY_GFD_LABEL: dict[str, GPUProduct] = {
    facts.gfd_product: product for product, facts in GPU_FACTS.items()
}
