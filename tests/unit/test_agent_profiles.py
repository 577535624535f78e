"""The GPU profiles the package ships match the captures of the real boards
(../shared/gpu-profiles) and the product table of the API."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from gpucluster.agent.gpu_profile import (
    PROFILE_NAMES,
    GpuProfile,
    load_profile,
    profile_for_product,
)

CAPTURES = Path(__file__).resolve().parents[2].parent / "shared" / "gpu-profiles"


def _figure(text: str) -> float:
    """'700.00 W' -> 700.0, '81559 MiB' -> 81559.0"""
    return float(text.split()[0])


@pytest.mark.skipif(not CAPTURES.is_dir(), reason=f"no captures at {CAPTURES}")
@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_profile_matches_the_capture(name: str) -> None:
    profile = load_profile(name)
    capture = CAPTURES / name
    nvml = json.loads((capture / "nvml.json").read_text())
    board = nvml["gpus"][0]
    with (capture / "query.csv").open() as f:
        query = {k.strip(): v.strip() for k, v in next(csv.DictReader(f)).items()}
    smi = ET.parse(capture / "nvidia-smi-q.xml").getroot().find("gpu")
    assert smi is not None

    def xml(path: str) -> str:
        node = smi.find(path)
        assert node is not None and node.text is not None, path
        return node.text

    assert profile.product_name == board["name"] == query["name"] == xml("product_name")
    assert profile.architecture == xml("product_architecture")
    assert list(profile.compute_capability) == board["compute_capability"]
    assert query["compute_cap"] == "{}.{}".format(*profile.compute_capability)
    assert profile.driver_version == nvml["driver"] == query["driver_version"]
    assert profile.cuda_driver_version == nvml["cuda_driver"]
    assert profile.vbios_version == board["vbios"] == query["vbios_version"]
    assert profile.board_part_number == board["board_part_number"]
    assert profile.pci_device_id == "0x" + xml("pci/pci_device_id")
    assert profile.pcie_link_gen_max == board["pcie_link_gen_max"]
    assert profile.pcie_link_width_max == board["pcie_link_width_max"]
    assert profile.memory_total_bytes == board["memory_total_bytes"]
    assert profile.memory_total_mib == _figure(query["memory.total [MiB]"])
    assert profile.memory_total_mib == _figure(xml("fb_memory_usage/total"))
    assert profile.memory_total_bytes == profile.memory_total_mib * 1024 * 1024
    assert profile.memory_reserved_mib == _figure(xml("fb_memory_usage/reserved"))
    assert profile.idle_memory_used_bytes == board["memory_used_bytes"]
    assert profile.idle_temperature_c == board["temperature_c"]
    assert profile.temperature_limit_c == (
        _figure(xml("temperature/gpu_temp")) + _figure(xml("temperature/gpu_temp_tlimit"))
    )
    assert profile.idle_power_usage_mw == board["power_usage_mw"]
    assert profile.power_limit_mw == board["power_limit_mw"]
    assert profile.power_limit_mw == _figure(query["power.limit [W]"]) * 1000
    assert profile.max_power_limit_mw == _figure(query["power.max_limit [W]"]) * 1000
    assert profile.default_power_limit_mw == (
        _figure(xml("gpu_power_readings/default_power_limit")) * 1000
    )
    assert profile.min_power_limit_mw == _figure(xml("gpu_power_readings/min_power_limit")) * 1000
    assert profile.sm_clock_max_mhz == board["sm_clock_max_mhz"]
    assert profile.sm_clock_max_mhz == _figure(query["clocks.max.sm [MHz]"])
    assert profile.mem_clock_max_mhz == board["mem_clock_max_mhz"]
    assert profile.mem_clock_max_mhz == _figure(query["clocks.max.memory [MHz]"])
    assert list(profile.ecc_mode) == board["ecc_mode"]
    assert query["ecc.mode.current"] == ("Enabled" if profile.ecc_mode[0] else "Disabled")
    assert profile.persistence_mode == board["persistence_mode"]
    assert list(profile.mig_mode) == board["mig_mode"]


def test_every_capture_has_a_profile() -> None:
    if not CAPTURES.is_dir():
        pytest.skip(f"no captures at {CAPTURES}")
    assert sorted(p.name for p in CAPTURES.iterdir() if p.is_dir()) == sorted(PROFILE_NAMES)


@pytest.mark.parametrize(("product", "name"), [
    ("NVIDIA-H100-80GB-HBM3", "h100-80gb-hbm3"),
    ("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3"),
    ("NVIDIA-H200", "h200-141gb"),
    ("NVIDIA H200", "h200-141gb"),
])
def test_profile_for_a_product_label_or_nvml_name(product: str, name: str) -> None:
    assert profile_for_product(product).name == name


def test_unknown_products_and_profiles() -> None:
    with pytest.raises(LookupError):
        profile_for_product("NVIDIA-A100-SXM4-80GB")
    with pytest.raises(ValueError):
        load_profile("a100")


def test_profiles_agree_with_the_api_product_table() -> None:
    from gpucluster.api.gpus import GPU_FACTS

    for facts in GPU_FACTS.values():
        profile: GpuProfile = load_profile(facts.profile)
        assert profile.product_name == facts.nvml_name
        assert profile.gfd_product == facts.gfd_product
        assert profile.memory_total_mib == facts.memory_mib
        assert profile.compute_capability == facts.compute_capability
