"""The NVML backend on a real board, checked against the profile of its model
(../shared/gpu-profiles, shipped in the package). Skipped where NVML cannot
start or sees no GPU."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

pynvml = pytest.importorskip("pynvml")

from gpucluster.agent.gpu_profile import GpuProfile, profile_for_product  # noqa: E402
from gpucluster.planning.health import node_verdict  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def handles() -> Iterator[list[object]]:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        pytest.skip(f"NVML does not start here: {err}")
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            pytest.skip("NVML sees no GPU")
        yield [pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
    finally:
        pynvml.nvmlShutdown()


def profile_of(handle: object) -> GpuProfile:
    name = pynvml.nvmlDeviceGetName(handle)
    try:
        return profile_for_product(name)
    except LookupError:
        pytest.skip(f"no GPU profile for {name!r}")


def test_the_board_matches_its_profile(handles: list[object]) -> None:
    for handle in handles:
        profile = profile_of(handle)
        assert pynvml.nvmlDeviceGetMemoryInfo(handle).total == profile.memory_total_bytes
        assert pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle) == (
            profile.default_power_limit_mw
        )
        assert pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle) == [
            profile.min_power_limit_mw, profile.max_power_limit_mw,
        ]
        assert pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM) == (
            profile.sm_clock_max_mhz
        )
        assert pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM) == (
            profile.mem_clock_max_mhz
        )
        assert tuple(pynvml.nvmlDeviceGetEccMode(handle)) == profile.ecc_mode
        assert pynvml.nvmlDeviceGetCudaComputeCapability(handle) == profile.compute_capability


def test_the_backend_reads_the_board(handles: list[object]) -> None:
    from gpucluster.agent.nvml import NvmlBackend

    backend = NvmlBackend()
    try:
        readings = backend.read()
        verdict = node_verdict(readings, expected_gpus=backend.expected_gpus, now=time.time())
    finally:
        started = time.monotonic()
        backend.close()
        assert time.monotonic() - started < 5  # the XID thread stops promptly
    assert [r.index for r in readings] == list(range(len(handles)))
    for reading, handle in zip(readings, handles, strict=True):
        profile = profile_of(handle)
        assert reading.reachable
        assert reading.uuid == pynvml.nvmlDeviceGetUUID(handle)
        assert reading.name == profile.product_name
        assert reading.fb_total_mib == profile.memory_total_mib
        assert reading.fb_used_mib is not None and reading.fb_free_mib is not None
        assert reading.fb_used_mib + reading.fb_free_mib in (
            profile.memory_total_mib - 1, profile.memory_total_mib
        )
        assert reading.power_limit_w is not None
        assert reading.power_limit_w <= profile.max_power_limit_mw / 1000
        assert reading.power_usage_w is not None and reading.power_usage_w > 0
        assert reading.sm_clock_mhz is not None
        assert 0 < reading.sm_clock_mhz <= profile.sm_clock_max_mhz
        assert reading.mem_clock_mhz is not None
        assert 0 < reading.mem_clock_mhz <= profile.mem_clock_max_mhz
        assert reading.ecc_enabled == (profile.ecc_mode[0] == 1)
        assert reading.temperature_c is not None and 0 < reading.temperature_c < 100
        assert reading.slowdown_temperature_c is None or (
            reading.temperature_c < reading.slowdown_temperature_c
        )
        if reading.ecc_enabled:
            assert reading.ecc_dbe_volatile is not None
    assert verdict.total_gpus == len(handles)
    print(f"verdict on this machine: {verdict.condition_status} {verdict.reason}: "
          f"{verdict.message}")
