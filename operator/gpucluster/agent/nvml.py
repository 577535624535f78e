"""The NVML backend: reads the node's real GPUs through nvidia-ml-py (pynvml)
and listens for XID events.

Imports only pynvml, the standard library and planning.health, so it (and
tests/gpu) runs on a GPU machine that has no kubernetes client, Kopf or
pydantic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import pynvml

from gpucluster.planning.health import GpuReading, XidEvent

log = logging.getLogger(__name__)

T = TypeVar("T")

_MIB = 1024 * 1024
_THERMAL_SLOWDOWN = (
    pynvml.nvmlClocksThrottleReasonHwThermalSlowdown
    | pynvml.nvmlClocksThrottleReasonSwThermalSlowdown
)
# Renamed from "throttle" to "clocks event" reasons in the 535 driver API;
# take the new name where this nvidia-ml-py has it.
_clock_event_reasons: Callable[[Any], int] = getattr(
    pynvml, "nvmlDeviceGetCurrentClocksEventReasons",
    pynvml.nvmlDeviceGetCurrentClocksThrottleReasons,
)


class _GpuLost(Exception):
    """NVML answered GPU_IS_LOST: the GPU no longer responds."""


class _Identity(NamedTuple):
    uuid: str
    name: str
    pci_bus_id: str
    device_minor: int | None


class NvmlBackend:
    """The GPUs NVML lists at start, read on demand; XIDs arrive on a thread.

    A fatal XID is remembered for the backend's lifetime (resetting a GPU
    restarts the agent with it); the verdict ages transient ones out.
    """

    def __init__(self, clock: Callable[[], float] = time.time, event_wait_ms: int = 1000):
        self._clock = clock
        self._event_wait_ms = event_wait_ms
        pynvml.nvmlInit()
        try:
            self._start()
        except pynvml.NVMLError:
            pynvml.nvmlShutdown()
            raise

    def _start(self) -> None:
        count = pynvml.nvmlDeviceGetCount()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(count)]
        self._identity = [_identify(handle) for handle in self._handles]
        self._index_by_uuid = {gpu.uuid: index for index, gpu in enumerate(self._identity)}
        self._slowdown_c = [
            _optional(pynvml.nvmlDeviceGetTemperatureThreshold, handle,
                      pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
            for handle in self._handles
        ]
        # Per GPU index: XID -> when it last happened.
        self._xids: dict[int, dict[int, float]] = {index: {} for index in range(count)}
        self._xid_lock = threading.Lock()
        self._stop = threading.Event()
        self._event_set = pynvml.nvmlEventSetCreate()
        for handle in self._handles:
            try:
                pynvml.nvmlDeviceRegisterEvents(
                    handle, pynvml.nvmlEventTypeXidCriticalError, self._event_set
                )
            except pynvml.NVMLError as err:
                log.warning("XID events unavailable on a GPU: %s", err)
        self._xid_thread = threading.Thread(target=self._watch_xids, name="nvml-xid",
                                            daemon=True)
        self._xid_thread.start()

    @property
    def expected_gpus(self) -> int:
        return len(self._handles)

    def read(self) -> list[GpuReading]:
        return [self._read(index, handle) for index, handle in enumerate(self._handles)]

    def close(self) -> None:
        self._stop.set()
        self._xid_thread.join(timeout=self._event_wait_ms / 1000 + 5)
        pynvml.nvmlEventSetFree(self._event_set)
        pynvml.nvmlShutdown()

    def _record_xid(self, index: int | None, xid: int) -> None:
        """Remember an XID of one GPU, or of every GPU when NVML did not say which."""
        now = self._clock()
        with self._xid_lock:
            for gpu in self._xids if index is None else (index,):
                self._xids[gpu][xid] = now

    def _watch_xids(self) -> None:
        while not self._stop.is_set():
            try:
                event = pynvml.nvmlEventSetWait_v2(self._event_set, self._event_wait_ms)
            except pynvml.NVMLError as err:
                if err.value != pynvml.NVML_ERROR_TIMEOUT:
                    log.warning("waiting for XID events: %s", err)
                    self._stop.wait(1.0)
                continue
            if event.eventType & pynvml.nvmlEventTypeXidCriticalError:
                self._record_xid(self._event_gpu(event.device), int(event.eventData))

    def _event_gpu(self, handle: Any) -> int | None:
        try:
            return self._index_by_uuid.get(pynvml.nvmlDeviceGetUUID(handle))
        except pynvml.NVMLError:
            # As NVIDIA's device plugin does: an XID NVML cannot place
            # counts against every GPU.
            return None

    def _read(self, index: int, handle: Any) -> GpuReading:
        identity = self._identity[index]
        with self._xid_lock:
            xid_events = tuple(
                XidEvent(xid, at) for xid, at in sorted(self._xids[index].items(),
                                                        key=lambda item: item[1])
            )
        try:
            telemetry = self._telemetry(handle)
        except _GpuLost:
            return GpuReading(
                index=index, uuid=identity.uuid, name=identity.name,
                pci_bus_id=identity.pci_bus_id, device_minor=identity.device_minor,
                reachable=False, xid_events=xid_events,
            )
        return GpuReading(
            index=index, uuid=identity.uuid, name=identity.name,
            pci_bus_id=identity.pci_bus_id, device_minor=identity.device_minor,
            slowdown_temperature_c=self._slowdown_c[index], xid_events=xid_events,
            **telemetry,
        )

    def _telemetry(self, handle: Any) -> dict[str, Any]:
        memory = _query(pynvml.nvmlDeviceGetMemoryInfo, handle)
        utilization = _query(pynvml.nvmlDeviceGetUtilizationRates, handle)
        power_mw = _query(pynvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = _query(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        reasons = _query(_clock_event_reasons, handle)
        ecc_mode = _query(pynvml.nvmlDeviceGetEccMode, handle)
        ecc_enabled = None if ecc_mode is None else ecc_mode[0] == pynvml.NVML_FEATURE_ENABLED
        remapped = _query(pynvml.nvmlDeviceGetRemappedRows, handle)
        return {
            "temperature_c": _query(pynvml.nvmlDeviceGetTemperature, handle,
                                    pynvml.NVML_TEMPERATURE_GPU),
            "thermal_slowdown": bool(reasons and reasons & _THERMAL_SLOWDOWN),
            "power_usage_w": None if power_mw is None else power_mw / 1000,
            "power_limit_w": None if limit_mw is None else limit_mw / 1000,
            "fb_total_mib": None if memory is None else memory.total // _MIB,
            "fb_used_mib": None if memory is None else memory.used // _MIB,
            "fb_free_mib": None if memory is None else memory.free // _MIB,
            "gpu_util_percent": None if utilization is None else utilization.gpu,
            "mem_util_percent": None if utilization is None else utilization.memory,
            "sm_clock_mhz": _query(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": _query(pynvml.nvmlDeviceGetClockInfo, handle,
                                    pynvml.NVML_CLOCK_MEM),
            "ecc_enabled": ecc_enabled,
            "ecc_sbe_volatile": _ecc_count(handle, ecc_enabled, corrected=True, volatile=True),
            "ecc_dbe_volatile": _ecc_count(handle, ecc_enabled, corrected=False, volatile=True),
            "ecc_sbe_aggregate": _ecc_count(handle, ecc_enabled, corrected=True,
                                            volatile=False),
            "ecc_dbe_aggregate": _ecc_count(handle, ecc_enabled, corrected=False,
                                            volatile=False),
            "remapped_rows_correctable": None if remapped is None else remapped[0],
            "remapped_rows_uncorrectable": None if remapped is None else remapped[1],
            "row_remap_pending": bool(remapped and remapped[2]),
            "row_remap_failure": bool(remapped and remapped[3]),
        }


def _identify(handle: Any) -> _Identity:
    return _Identity(
        uuid=pynvml.nvmlDeviceGetUUID(handle),
        name=pynvml.nvmlDeviceGetName(handle),
        pci_bus_id=pynvml.nvmlDeviceGetPciInfo(handle).busId,
        device_minor=_optional(pynvml.nvmlDeviceGetMinorNumber, handle),
    )


def _ecc_count(handle: Any, ecc_enabled: bool | None, *, corrected: bool,
               volatile: bool) -> int | None:
    if not ecc_enabled:
        return None
    error_type = (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED if corrected
                  else pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
    counter = pynvml.NVML_VOLATILE_ECC if volatile else pynvml.NVML_AGGREGATE_ECC
    return _query(pynvml.nvmlDeviceGetTotalEccErrors, handle, error_type, counter)


def _query(fn: Callable[..., T], *args: Any) -> T | None:
    """One NVML figure; None where the board does not give it. A lost GPU
    raises _GpuLost: none of its figures mean anything then."""
    try:
        return fn(*args)
    except pynvml.NVMLError as err:
        if err.value == pynvml.NVML_ERROR_GPU_IS_LOST:
            raise _GpuLost from err
        return None


def _optional(fn: Callable[..., T], *args: Any) -> T | None:
    """A figure read once at start; None where the board does not give it."""
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None
