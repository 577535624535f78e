"""The fake backend: the GPUs of one node, made from a GPU profile, reading
what the real boards read when idle, with faults injected on demand.

Cheap by design, because the fleet keeps one FakeGpuSet per KWOK node (5,000
nodes and more in one process): a healthy GPU's reading is built once and
shared, and a set rebuilds its readings only when its faults change.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

from gpucluster.agent.gpu_profile import GpuProfile
from gpucluster.agent.injection import FaultKind, Injection, parse_injections
from gpucluster.names import ANNOTATION_INJECT_FAULT
from gpucluster.planning.health import GpuReading, XidClass, XidEvent, classify_xid

log = logging.getLogger(__name__)

# An HGX H100 or H200 board carries eight GPUs.
GPUS_PER_NODE = 8

# Namespace of the fake UUIDs: any fixed UUID works, this one is uuid5 of the
# project's domain so it says where the UUIDs come from.
_FAKE_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "gpucluster.dev")

_DOUBLE_BIT_ECC_XID = 48
_ROW_REMAP_PENDING_XID = 63
_ROW_REMAP_FAILURE_XID = 64
_GPU_LOST_XID = 79
# The XIDs a named fault raises on a real board.
_XID_OF_FAULT = {
    FaultKind.DOUBLE_BIT_ECC: _DOUBLE_BIT_ECC_XID,
    FaultKind.ROW_REMAP_FAILURE: _ROW_REMAP_FAILURE_XID,
}
# How far over its slowdown temperature an over-temperature GPU reads.
_OVER_TEMPERATURE_MARGIN_C = 3

_FaultKey = tuple[FaultKind, int]


def fake_gpu_uuid(node_name: str, index: int) -> str:
    """A GPU UUID in NVML's form, the same for a node name and index every time."""
    return f"GPU-{uuid.uuid5(_FAKE_UUID_NAMESPACE, f'{node_name}/{index}')}"


def fake_pci_bus_id(index: int) -> str:
    return f"00000000:{index + 1:02X}:00.0"


def is_fatal(injection: Injection) -> bool:
    """Whether an injected fault outlives its annotation entry (see injection.py)."""
    if injection.kind is FaultKind.XID:
        return classify_xid(injection.xid).kind is XidClass.FATAL
    return injection.kind in (FaultKind.DOUBLE_BIT_ECC, FaultKind.ROW_REMAP_FAILURE,
                              FaultKind.GONE)


class FakeGpuSet:
    """The GPUs of one fake node. Thread-safe: the fleet's watch applies
    faults while its evaluation loop and the metrics scrape read."""

    def __init__(
        self,
        profile: GpuProfile,
        node_name: str,
        gpu_count: int = GPUS_PER_NODE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.profile = profile
        self.node_name = node_name
        self.gpu_count = gpu_count
        self._clock = clock
        self._lock = threading.Lock()
        self._healthy = [self._healthy_reading(index) for index in range(gpu_count)]
        # Faults by GPU index, each with the time it began.
        self._latched: dict[int, dict[_FaultKey, float]] = {}
        self._transient: dict[int, dict[_FaultKey, float]] = {}
        self._readings: list[GpuReading] | None = None
        self._version = 0
        self._annotation = ""

    @property
    def version(self) -> int:
        """Grows with every change of faults: a reader that saw this version
        has seen the current readings."""
        return self._version

    @property
    def expected_gpus(self) -> int:
        return self.gpu_count

    @property
    def uuids(self) -> dict[int, str]:
        """Every GPU's UUID by index, those of GPUs gone included."""
        return {reading.index: reading.uuid for reading in self._healthy}

    def apply(self, injections: Sequence[Injection]) -> None:
        """Make the injected faults those of an annotation's new value (see
        injection.py): transient faults not listed end, fatal ones latch, a
        reset clears its GPU. Raises ValueError for a GPU index the node lacks,
        before changing anything."""
        self._check_indices(injections)
        now = self._clock()
        with self._lock:
            transient: dict[int, dict[_FaultKey, float]] = {}
            for injection in injections:
                for gpu in self._targets(injection):
                    key = (injection.kind, injection.xid)
                    if injection.kind is FaultKind.RESET:
                        self._latched.pop(gpu, None)
                        transient.pop(gpu, None)
                    elif is_fatal(injection):
                        self._latched.setdefault(gpu, {}).setdefault(key, now)
                    else:
                        began = self._transient.get(gpu, {}).get(key, now)
                        transient.setdefault(gpu, {})[key] = began
            self._transient = transient
            self._changed()

    def apply_annotation(self, text: str) -> None:
        """Apply a node's fault-injection annotation if it changed since the
        last call; a value that does not parse is logged and leaves the
        faults as they were."""
        if text == self._annotation:
            return
        self._annotation = text
        try:
            self.apply(parse_injections(text))
        except ValueError as err:
            log.warning("node %s: ignoring %s=%r: %s", self.node_name,
                        ANNOTATION_INJECT_FAULT, text, err)

    def inject(self, injection: Injection) -> None:
        """Add one fault, keeping those already injected."""
        self._check_indices([injection])
        now = self._clock()
        with self._lock:
            for gpu in self._targets(injection):
                if injection.kind is FaultKind.RESET:
                    self._latched.pop(gpu, None)
                    self._transient.pop(gpu, None)
                    continue
                faults = self._latched if is_fatal(injection) else self._transient
                faults.setdefault(gpu, {}).setdefault((injection.kind, injection.xid), now)
            self._changed()

    def clear_transient(self) -> None:
        with self._lock:
            self._transient = {}
            self._changed()

    def read(self) -> list[GpuReading]:
        with self._lock:
            if self._readings is None:
                self._readings = [
                    reading
                    for index in range(self.gpu_count)
                    if (reading := self._reading(index)) is not None
                ]
            return self._readings

    def close(self) -> None:
        """Nothing to release: the fake holds no device."""

    def _changed(self) -> None:
        self._readings = None
        self._version += 1

    def _check_indices(self, injections: Iterable[Injection]) -> None:
        for injection in injections:
            if injection.gpu is not None and injection.gpu >= self.gpu_count:
                raise ValueError(
                    f"{injection}: node {self.node_name} has GPUs 0-{self.gpu_count - 1}"
                )

    def _targets(self, injection: Injection) -> Iterable[int]:
        return range(self.gpu_count) if injection.gpu is None else (injection.gpu,)

    def _reading(self, index: int) -> GpuReading | None:
        faults = {**self._latched.get(index, {}), **self._transient.get(index, {})}
        if not faults:
            return self._healthy[index]
        kinds = {kind for kind, _ in faults}
        if FaultKind.GONE in kinds:
            return None
        xid_events = tuple(sorted(
            (XidEvent(xid if kind is FaultKind.XID else _XID_OF_FAULT[kind], began)
             for (kind, xid), began in faults.items()
             if kind is FaultKind.XID or kind in _XID_OF_FAULT),
            key=lambda event: event.at,
        ))
        xids = {event.xid for event in xid_events}
        reading = dataclasses.replace(self._healthy[index], xid_events=xid_events)
        if _GPU_LOST_XID in xids:
            return _lost(reading)
        if _DOUBLE_BIT_ECC_XID in xids:
            # Hopper remaps the row behind a double-bit error at the next reset.
            dbe = sum(1 for event in xid_events if event.xid == _DOUBLE_BIT_ECC_XID)
            reading = dataclasses.replace(
                reading, ecc_dbe_volatile=dbe, ecc_dbe_aggregate=dbe,
                remapped_rows_uncorrectable=dbe, row_remap_pending=True,
            )
        if _ROW_REMAP_PENDING_XID in xids:
            reading = dataclasses.replace(reading, row_remap_pending=True)
        if _ROW_REMAP_FAILURE_XID in xids:
            reading = dataclasses.replace(reading, row_remap_failure=True)
        if FaultKind.OVER_TEMPERATURE in kinds:
            reading = dataclasses.replace(
                reading,
                temperature_c=self.profile.temperature_limit_c + _OVER_TEMPERATURE_MARGIN_C,
                thermal_slowdown=True,
            )
        return reading

    def _healthy_reading(self, index: int) -> GpuReading:
        profile = self.profile
        return GpuReading(
            index=index,
            uuid=fake_gpu_uuid(self.node_name, index),
            name=profile.product_name,
            pci_bus_id=fake_pci_bus_id(index),
            temperature_c=profile.idle_temperature_c,
            slowdown_temperature_c=profile.temperature_limit_c,
            power_usage_w=profile.idle_power_usage_mw / 1000,
            power_limit_w=profile.power_limit_mw / 1000,
            fb_total_mib=profile.memory_total_mib,
            fb_used_mib=profile.idle_memory_used_mib,
            fb_free_mib=profile.memory_total_mib - profile.idle_memory_used_mib,
            gpu_util_percent=0,
            mem_util_percent=0,
            sm_clock_mhz=profile.sm_clock_max_mhz,
            mem_clock_mhz=profile.mem_clock_max_mhz,
            ecc_enabled=profile.ecc_mode[0] == 1,
            ecc_sbe_volatile=0,
            ecc_dbe_volatile=0,
            ecc_sbe_aggregate=0,
            ecc_dbe_aggregate=0,
            remapped_rows_correctable=0,
            remapped_rows_uncorrectable=0,
        )


def _lost(reading: GpuReading) -> GpuReading:
    """What NVML gives for a GPU it lost: its identity and its XIDs, no telemetry."""
    return GpuReading(
        index=reading.index,
        uuid=reading.uuid,
        name=reading.name,
        pci_bus_id=reading.pci_bus_id,
        reachable=False,
        xid_events=reading.xid_events,
    )
