"""GPU profiles: what NVML and nvidia-smi report for one board model, captured
on real H100 80GB HBM3 and H200 boards (../shared/gpu-profiles/<name>/). The
package ships the figures the fake backend and the GPU tests need as
profiles/<name>.json; tests/unit/test_agent_profiles.py checks them against
the captures.

Per-board figures only: the captures come from one-GPU machines, so how many
GPUs a node has is not part of a profile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

H100_80GB_HBM3 = "h100-80gb-hbm3"
H200_141GB = "h200-141gb"
PROFILE_NAMES = (H100_80GB_HBM3, H200_141GB)


@dataclass(frozen=True)
class GpuProfile:
    name: str
    product_name: str  # NVML's device name, e.g. "NVIDIA H100 80GB HBM3"
    architecture: str
    compute_capability: tuple[int, int]
    driver_version: str
    cuda_driver_version: int
    vbios_version: str
    board_part_number: str
    pci_device_id: str
    pcie_link_gen_max: int
    pcie_link_width_max: int
    memory_total_bytes: int
    memory_total_mib: int
    memory_reserved_mib: int
    idle_memory_used_bytes: int
    idle_temperature_c: int
    # nvidia-smi's T.Limit reference: the temperature it read plus the T.Limit
    # headroom it reported (gpu_temp + gpu_temp_tlimit); the fake backend
    # slows its clocks from here.
    temperature_limit_c: int
    idle_power_usage_mw: int
    power_limit_mw: int
    default_power_limit_mw: int
    min_power_limit_mw: int
    max_power_limit_mw: int
    sm_clock_max_mhz: int
    mem_clock_max_mhz: int
    ecc_mode: tuple[int, int]  # (current, pending); 1 is enabled
    persistence_mode: int
    mig_mode: tuple[int, int]  # (current, pending); 0 is disabled

    @property
    def gfd_product(self) -> str:
        """The nvidia.com/gpu.product label GPU feature discovery gives the board."""
        return self.product_name.replace(" ", "-")

    @property
    def idle_memory_used_mib(self) -> int:
        return self.idle_memory_used_bytes // (1024 * 1024)


@cache
def load_profile(name: str) -> GpuProfile:
    if name not in PROFILE_NAMES:
        raise ValueError(f"unknown GPU profile {name!r}; known: {', '.join(PROFILE_NAMES)}")
    text = (resources.files("gpucluster.agent") / "profiles" / f"{name}.json").read_text()
    raw = json.loads(text)
    for pair in ("compute_capability", "ecc_mode", "mig_mode"):
        raw[pair] = tuple(raw[pair])
    return GpuProfile(**raw)


def profile_for_product(product: str) -> GpuProfile:
    """The profile of a board named by its GFD product label or its NVML name."""
    for name in PROFILE_NAMES:
        profile = load_profile(name)
        if product in (profile.gfd_product, profile.product_name):
            return profile
    raise LookupError(f"no GPU profile for product {product!r}")
