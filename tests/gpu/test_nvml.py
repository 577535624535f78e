"""The NVML backend on a real board, checked against the profile of its model
(../shared/gpu-profiles, shipped in the package). Skipped where NVML cannot
start or sees no GPU."""

from __future__ import annotations

import logging
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


def test_the_backend_reads_the_board(handles: list[object], caplog: pytest.LogCaptureFixture) -> None:
    from gpucluster.agent.nvml import NvmlBackend

    with caplog.at_level(logging.WARNING, logger="gpucluster.agent.nvml"):
        backend = NvmlBackend()
    # Every GPU takes XID event registration: XIDs are the agent's main fault source.
    assert not caplog.records, [record.getMessage() for record in caplog.records]
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


def test_the_exporter_serves_dcgm_series_of_the_board(handles: list[object]) -> None:
    """What a DCGM dashboard scrapes from the agent on a real node."""
    import socket
    import urllib.request

    from gpucluster.agent.exporter import DcgmCollector, NodeGpus, serve_metrics
    from gpucluster.agent.nvml import NvmlBackend
    from prometheus_client.parser import text_string_to_metric_families

    backend = NvmlBackend()
    try:
        readings = backend.read()
        verdict = node_verdict(readings, expected_gpus=backend.expected_gpus, now=time.time())
    finally:
        backend.close()
    hostname = socket.gethostname()
    node = NodeGpus(hostname, readings, verdict)
    server = serve_metrics(DcgmCollector(lambda: (node,)), 0, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        server.stop()
    samples = {
        (sample.name, sample.labels["gpu"]): sample
        for family in text_string_to_metric_families(text) for sample in family.samples
    }
    for reading, handle in zip(readings, handles, strict=True):
        gpu = str(reading.index)
        for name in ("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_FB_USED",
                     "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_SM_CLOCK",
                     "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_XID_ERRORS",
                     "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_ROW_REMAP_FAILURE",
                     "gpucluster_gpu_healthy"):
            assert (name, gpu) in samples, f"{name} missing for GPU {gpu}"
        labels = samples[("DCGM_FI_DEV_GPU_TEMP", gpu)].labels
        assert labels["UUID"] == pynvml.nvmlDeviceGetUUID(handle)
        assert labels["modelName"] == pynvml.nvmlDeviceGetName(handle)
        assert labels["Hostname"] == hostname
        assert labels["device"] == f"nvidia{pynvml.nvmlDeviceGetMinorNumber(handle)}"
        assert samples[("DCGM_FI_DEV_FB_USED", gpu)].value == reading.fb_used_mib
        print(f"GPU {gpu} as scraped: " + ", ".join(
            f"{name.removeprefix('DCGM_FI_DEV_')}={sample.value:g}"
            for (name, index), sample in sorted(samples.items()) if index == gpu))


def test_the_backend_sees_a_workload(handles: list[object]) -> None:
    """Live figures, not start-time ones: under a matmul loop the board's
    utilisation, memory used and power rise in the backend's readings."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    from gpucluster.agent.nvml import NvmlBackend

    backend = NvmlBackend()
    try:
        idle = backend.read()[0]
        size = 8192
        a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
        busy = idle
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for _ in range(200):
                a = (a @ b).clamp_(-1, 1)
            torch.cuda.synchronize()
            busy = backend.read()[0]
            if busy.gpu_util_percent and busy.gpu_util_percent >= 50 and (
                busy.power_usage_w and idle.power_usage_w
                and busy.power_usage_w > idle.power_usage_w + 50
            ):
                break
    finally:
        backend.close()
    print(f"idle: util {idle.gpu_util_percent}% power {idle.power_usage_w} W "
          f"fb used {idle.fb_used_mib} MiB temp {idle.temperature_c} C sm {idle.sm_clock_mhz} MHz; "
          f"busy: util {busy.gpu_util_percent}% power {busy.power_usage_w} W "
          f"fb used {busy.fb_used_mib} MiB temp {busy.temperature_c} C sm {busy.sm_clock_mhz} MHz")
    assert busy.gpu_util_percent is not None and busy.gpu_util_percent >= 50
    assert busy.fb_used_mib is not None and idle.fb_used_mib is not None
    assert busy.fb_used_mib > idle.fb_used_mib + 256  # two 128 MiB bf16 matrices and more
    assert busy.power_usage_w is not None and idle.power_usage_w is not None
    assert busy.power_usage_w > idle.power_usage_w + 50
