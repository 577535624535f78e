"""The NVML backend against a scripted pynvml (no GPU here; tests/gpu reads a
real board), and the promise that its import path stays light."""

from __future__ import annotations

import importlib
import queue
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml as real_pynvml
import pytest
from gpucluster.planning.health import node_verdict

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("kubernetes", "kopf", "pydantic", "grpc", "yaml")


def test_the_nvml_path_imports_nothing_heavy() -> None:
    """The GPU machine has pynvml, prometheus-client, grpcio and pytest only."""
    code = (
        "import importlib.util, sys\n"
        "import gpucluster.agent.nvml, gpucluster.agent.gpu_profile\n"
        "for name in ('conftest', 'test_nvml'):\n"
        f"    path = {str(REPO / 'tests' / 'gpu')!r} + '/' + name + '.py'\n"
        "    spec = importlib.util.spec_from_file_location('gpu_' + name, path)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stderr


class Handle:
    def __init__(self, index: int) -> None:
        self.index = index


class Board:
    """Two scripted H100s behind pynvml's functions."""

    def __init__(self) -> None:
        self.lost: set[int] = set()
        self.dbe = {0: 0, 1: 0}
        self.remapped = {0: (0, 0, 0, 0), 1: (0, 0, 0, 0)}
        self.reasons = {0: 1, 1: 1}  # GPU idle
        self.events: queue.Queue[Any] = queue.Queue()
        self.calls: list[str] = []

    def module(self) -> types.ModuleType:
        fake = types.ModuleType("pynvml")
        for name, value in vars(real_pynvml).items():
            if name.startswith("nvml") and callable(value):
                setattr(fake, name, self._unexpected(name))
            elif not name.startswith("__"):
                setattr(fake, name, value)
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(fake, name, getattr(self, name))
        return fake

    @staticmethod
    def _unexpected(name: str) -> Any:
        def call(*args: Any) -> Any:
            raise AssertionError(f"the backend called {name}, which this test does not script")
        return call

    def _gpu(self, handle: Handle) -> int:
        if handle.index in self.lost:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_GPU_IS_LOST)
        return handle.index

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        return Handle(index)

    def nvmlDeviceGetUUID(self, handle: Handle) -> str:
        if handle.index < 0:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return f"GPU-0000000{handle.index}-1111-2222-3333-444444444444"

    def nvmlDeviceGetName(self, handle: Handle) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetPciInfo(self, handle: Handle) -> Any:
        return types.SimpleNamespace(busId=f"00000000:{0x18 + handle.index:02X}:00.0")

    def nvmlDeviceGetMinorNumber(self, handle: Handle) -> int:
        return 7 - handle.index

    def nvmlDeviceGetTemperatureThreshold(self, handle: Handle, threshold: int) -> int:
        assert threshold == real_pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        return 87

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceRegisterEvents(self, handle: Handle, types_: int, event_set: str) -> None:
        assert types_ == real_pynvml.nvmlEventTypeXidCriticalError
        if handle.index == 1:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> Any:
        try:
            return self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_TIMEOUT) from None

    def nvmlEventSetFree(self, event_set: str) -> None:
        self.calls.append("free")

    def nvmlDeviceGetMemoryInfo(self, handle: Handle) -> Any:
        self._gpu(handle)
        total, used = 85520809984, 503316480
        return types.SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: Handle) -> Any:
        if self._gpu(handle) == 1:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_NOT_SUPPORTED)
        return types.SimpleNamespace(gpu=35, memory=12)

    def nvmlDeviceGetPowerUsage(self, handle: Handle) -> int:
        self._gpu(handle)
        return 92593

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Handle) -> int:
        self._gpu(handle)
        return 700000

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Handle) -> int:
        return self.reasons[self._gpu(handle)]

    def nvmlDeviceGetEccMode(self, handle: Handle) -> list[int]:
        self._gpu(handle)
        return [1, 1]

    def nvmlDeviceGetTotalEccErrors(self, handle: Handle, error_type: int, counter: int) -> int:
        gpu = self._gpu(handle)
        return self.dbe[gpu] if error_type == real_pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else 0

    def nvmlDeviceGetRemappedRows(self, handle: Handle) -> tuple[int, int, int, int]:
        return self.remapped[self._gpu(handle)]

    def nvmlDeviceGetTemperature(self, handle: Handle, sensor: int) -> int:
        self._gpu(handle)
        return 39

    def nvmlDeviceGetClockInfo(self, handle: Handle, clock: int) -> int:
        self._gpu(handle)
        return 1980 if clock == real_pynvml.NVML_CLOCK_SM else 2619


@pytest.fixture()
def board(monkeypatch: pytest.MonkeyPatch) -> Iterator[Board]:
    board = Board()
    monkeypatch.setitem(sys.modules, "pynvml", board.module())
    monkeypatch.delitem(sys.modules, "gpucluster.agent.nvml", raising=False)
    yield board
    # The module imported over the scripted pynvml must not outlive the test.
    sys.modules.pop("gpucluster.agent.nvml", None)


@pytest.fixture()
def backend(board: Board) -> Any:
    nvml = importlib.import_module("gpucluster.agent.nvml")
    backend = nvml.NvmlBackend(event_wait_ms=20)
    yield backend
    backend.close()


def verdict(backend: Any) -> Any:
    return node_verdict(backend.read(), expected_gpus=backend.expected_gpus, now=time.time())


def wait_for_xid(backend: Any, index: int) -> None:
    deadline = time.monotonic() + 5
    while not backend.read()[index].xid_events:
        assert time.monotonic() < deadline, "the XID never arrived"
        time.sleep(0.01)


def test_reads_the_board(backend: Any) -> None:
    first, second = backend.read()
    assert backend.expected_gpus == 2
    assert first.uuid == "GPU-00000000-1111-2222-3333-444444444444"
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert (first.pci_bus_id, first.device_minor) == ("00000000:18:00.0", 7)
    assert (first.temperature_c, first.slowdown_temperature_c) == (39, 87)
    assert (first.power_usage_w, first.power_limit_w) == (92.593, 700)
    assert (first.fb_total_mib, first.fb_used_mib, first.fb_free_mib) == (81559, 480, 81079)
    assert (first.gpu_util_percent, first.mem_util_percent) == (35, 12)
    assert (first.sm_clock_mhz, first.mem_clock_mhz) == (1980, 2619)
    assert first.ecc_enabled and first.ecc_dbe_volatile == 0 and first.ecc_sbe_aggregate == 0
    assert not first.thermal_slowdown and first.reachable
    assert second.gpu_util_percent is None  # not supported there: no figure, no failure
    assert verdict(backend).healthy


def test_an_xid_event_lands_on_its_gpu(backend: Any, board: Board) -> None:
    board.events.put(types.SimpleNamespace(
        eventType=real_pynvml.nvmlEventTypeXidCriticalError, eventData=79, device=Handle(1)))
    wait_for_xid(backend, 1)
    assert backend.read()[1].last_xid == 79
    assert not backend.read()[0].xid_events
    result = verdict(backend)
    assert (result.reason, result.unhealthy_indices) == ("GPUFellOffBus", (1,))


def test_an_xid_nvml_cannot_place_counts_against_every_gpu(backend: Any, board: Board) -> None:
    board.events.put(types.SimpleNamespace(
        eventType=real_pynvml.nvmlEventTypeXidCriticalError, eventData=48, device=Handle(-1)))
    wait_for_xid(backend, 0)
    assert [r.last_xid for r in backend.read()] == [48, 48]


def test_a_lost_gpu(backend: Any, board: Board) -> None:
    board.lost.add(0)
    lost, _ = backend.read()
    assert not lost.reachable
    assert lost.temperature_c is None and lost.uuid.startswith("GPU-00000000")
    assert verdict(backend).reason == "GPULost"


def test_memory_and_thermal_faults(backend: Any, board: Board) -> None:
    board.dbe[0] = 2
    board.remapped[1] = (0, 1, 0, 1)
    board.reasons[1] = real_pynvml.nvmlClocksThrottleReasonHwThermalSlowdown
    first, second = backend.read()
    assert first.ecc_dbe_volatile == 2
    assert second.row_remap_failure and second.remapped_rows_uncorrectable == 1
    assert second.thermal_slowdown
    result = verdict(backend)
    assert result.reason == "DoubleBitECCError"
    assert "RowRemapFailure" in {f.reason for f in result.gpus[1].faults}
    assert "GPUOverTemperature" in {f.reason for f in result.gpus[1].faults}


def test_close_frees_the_event_set_and_shuts_nvml_down(board: Board) -> None:
    nvml = importlib.import_module("gpucluster.agent.nvml")
    backend = nvml.NvmlBackend(event_wait_ms=20)
    backend.close()
    assert board.calls == ["init", "free", "shutdown"]


def test_a_failed_start_shuts_nvml_down(board: Board, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_count() -> int:
        raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_UNKNOWN)

    monkeypatch.setattr(sys.modules["pynvml"], "nvmlDeviceGetCount", no_count)
    nvml = importlib.import_module("gpucluster.agent.nvml")
    with pytest.raises(real_pynvml.NVMLError):
        nvml.NvmlBackend()
    assert board.calls == ["init", "shutdown"]
