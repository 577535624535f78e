"""GPU health verdicts: what the node agent read from its GPUs in, the node's
`GPUHealthy` verdict out. Pure: no I/O, no clock (the caller passes `now`).

Two severities of fault, decided per GPU:

* fatal: the GPU must not get work again until it is reset or replaced
  (double-bit ECC, fallen off the bus, uncontained ECC, a failed row remap...).
  Remediation acts on these.
* transient: the GPU can keep or resume its work without a person; the fault
  clears by itself (the temperature falls, the application that hit a
  contained ECC error restarts) or at the next GPU reset (a pending row remap).
  The GPU counts as unhealthy while the fault lasts, so no new work lands on
  it, but nothing needs replacing.

XIDs are events, not states. A fatal XID keeps the GPU unhealthy for as long as
the reader remembers it (the agent's lifetime: a reset reboots the node and
the agent with it); a transient XID counts for `HealthPolicy.transient_xid_window_s`
after it happened. XIDs that report a fault of the application, not of the GPU,
never make a GPU unhealthy.

The XID table below is NVIDIA's, cited per entry:
[catalogue] https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html
  (the Xid catalogue for Ampere and newer, with each XID's immediate action:
  RESTART_APP, RESET_GPU, ...);
[memory] https://docs.nvidia.com/deploy/a100-gpu-mem-error-mgmt/
  (ECC, row remapping and contained/uncontained errors on Ampere and newer);
[device-plugin] NVIDIA/k8s-device-plugin, internal/rm/health.go: the XIDs the
  device plugin treats as application errors that leave the GPU healthy.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


class Severity(enum.Enum):
    TRANSIENT = "transient"
    FATAL = "fatal"


class XidClass(enum.Enum):
    """What an XID says about the GPU that reported it."""

    APPLICATION = "application"  # the program faulted; the GPU is fine
    TRANSIENT = "transient"
    FATAL = "fatal"


@dataclass(frozen=True)
class XidInfo:
    xid: int
    meaning: str
    kind: XidClass
    # The GPUHealthy reason this XID gives when it is the node's worst fault;
    # empty for application XIDs, which are never a fault of the GPU.
    reason: str = ""


def _xid_table(*entries: XidInfo) -> Mapping[int, XidInfo]:
    return {entry.xid: entry for entry in entries}


XID_CATALOGUE: Mapping[int, XidInfo] = _xid_table(
    # Application errors [device-plugin]; the catalogue's action is RESTART_APP.
    XidInfo(13, "graphics engine exception", XidClass.APPLICATION),
    XidInfo(31, "GPU memory page fault", XidClass.APPLICATION),
    XidInfo(43, "GPU stopped processing", XidClass.APPLICATION),
    XidInfo(45, "preemptive cleanup after previous errors", XidClass.APPLICATION),
    XidInfo(68, "video processor exception", XidClass.APPLICATION),
    # Memory errors [memory], [catalogue].
    XidInfo(48, "double-bit ECC error", XidClass.FATAL, "DoubleBitECCError"),
    XidInfo(63, "row remapping recorded, pending a GPU reset", XidClass.TRANSIENT,
            "RowRemapPending"),
    XidInfo(64, "row remapping failed", XidClass.FATAL, "RowRemapFailure"),
    XidInfo(92, "high single-bit ECC error rate", XidClass.TRANSIENT,
            "HighSingleBitECCRate"),
    # Contained: only the application that touched the bad memory is killed.
    XidInfo(94, "contained ECC error", XidClass.TRANSIENT, "ContainedECCError"),
    # Uncontained: every application on the GPU is affected; the GPU needs a reset.
    XidInfo(95, "uncontained ECC error", XidClass.FATAL, "UncontainedECCError"),
    # Interconnect, bus and firmware [catalogue]: RESET_GPU or worse.
    XidInfo(62, "internal micro-controller halt", XidClass.FATAL, "MicrocontrollerHalt"),
    XidInfo(74, "NVLink error", XidClass.FATAL, "NVLinkError"),
    XidInfo(79, "GPU has fallen off the bus", XidClass.FATAL, "GPUFellOffBus"),
    XidInfo(119, "GSP RPC timeout", XidClass.FATAL, "GSPError"),
    XidInfo(120, "GSP error", XidClass.FATAL, "GSPError"),
)


def classify_xid(xid: int) -> XidInfo:
    """The table's entry for an XID. An XID the table does not list is
    transient: a person sees it on the node, remediation does not act on it."""
    known = XID_CATALOGUE.get(xid)
    if known is not None:
        return known
    return XidInfo(xid, "not in gpucluster's XID table", XidClass.TRANSIENT, REASON_UNKNOWN_XID)


# Condition reasons written besides the XID ones.
REASON_HEALTHY = "GPUsHealthy"
REASON_UNKNOWN_XID = "XIDError"
REASON_GPU_LOST = "GPULost"
REASON_GPU_MISSING = "GPUMissing"
REASON_OVER_TEMPERATURE = "GPUOverTemperature"
REASON_DOUBLE_BIT_ECC = "DoubleBitECCError"
REASON_ROW_REMAP_FAILURE = "RowRemapFailure"
REASON_ROW_REMAP_PENDING = "RowRemapPending"

FATAL_REASONS: frozenset[str] = frozenset(
    {REASON_GPU_LOST, REASON_GPU_MISSING, REASON_DOUBLE_BIT_ECC, REASON_ROW_REMAP_FAILURE}
    | {info.reason for info in XID_CATALOGUE.values() if info.kind is XidClass.FATAL}
)
TRANSIENT_REASONS: frozenset[str] = frozenset(
    {REASON_OVER_TEMPERATURE, REASON_ROW_REMAP_PENDING, REASON_UNKNOWN_XID}
    | {info.reason for info in XID_CATALOGUE.values() if info.kind is XidClass.TRANSIENT}
)

# The form Kubernetes requires of a metav1.Condition reason; node conditions are
# not validated, but consumers may copy the reason into one that is.
CONDITION_REASON_PATTERN = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class XidEvent:
    xid: int
    at: float  # seconds since the epoch


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML (or the fake backend) reports it at one moment.

    Figures a board does not support are None. `reachable` is False when the
    driver still lists the GPU but can no longer talk to it (NVML answers
    GPU_IS_LOST); a GPU the driver no longer lists has no reading at all.
    """

    index: int
    uuid: str
    name: str
    pci_bus_id: str = ""
    # The N of /dev/nvidiaN; None where it is unknown and equal to the index.
    device_minor: int | None = None
    reachable: bool = True
    temperature_c: int | None = None
    # The temperature at which the board starts slowing its clocks.
    slowdown_temperature_c: int | None = None
    # NVML's clock event reasons report a hardware or software thermal slowdown.
    thermal_slowdown: bool = False
    power_usage_w: float | None = None
    power_limit_w: float | None = None
    fb_total_mib: int | None = None
    fb_used_mib: int | None = None
    fb_free_mib: int | None = None
    gpu_util_percent: int | None = None
    mem_util_percent: int | None = None
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    ecc_enabled: bool | None = None
    ecc_sbe_volatile: int | None = None
    ecc_dbe_volatile: int | None = None
    ecc_sbe_aggregate: int | None = None
    ecc_dbe_aggregate: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    row_remap_pending: bool = False
    row_remap_failure: bool = False
    xid_events: tuple[XidEvent, ...] = ()

    @property
    def last_xid(self) -> int:
        """The most recent XID, 0 when there was none (dcgm-exporter's XID_ERRORS)."""
        if not self.xid_events:
            return 0
        return max(self.xid_events, key=lambda event: event.at).xid


@dataclass(frozen=True)
class HealthPolicy:
    # How long a transient XID keeps its GPU unhealthy after it happened.
    transient_xid_window_s: float = 600.0


@dataclass(frozen=True)
class GpuFault:
    reason: str
    severity: Severity
    detail: str


@dataclass(frozen=True)
class GpuAssessment:
    index: int
    uuid: str  # empty when the GPU is missing and its UUID unknown
    faults: tuple[GpuFault, ...] = ()

    @property
    def healthy(self) -> bool:
        return not self.faults

    @property
    def fatal(self) -> bool:
        return any(fault.severity is Severity.FATAL for fault in self.faults)


@dataclass(frozen=True)
class NodeVerdict:
    """What the agent writes: the GPUHealthy condition and the GPU counts."""

    healthy: bool
    reason: str
    message: str
    healthy_gpus: int
    total_gpus: int
    gpus: tuple[GpuAssessment, ...]

    @property
    def condition_status(self) -> str:
        return "True" if self.healthy else "False"

    @property
    def unhealthy_indices(self) -> tuple[int, ...]:
        return tuple(gpu.index for gpu in self.gpus if not gpu.healthy)


def assess_gpu(reading: GpuReading, now: float, policy: HealthPolicy) -> GpuAssessment:
    """Every fault one GPU shows now, fatal ones first, one per reason."""
    # XIDs first: they name the fault best (XID 79 says why the GPU is lost).
    faults = list(_xid_faults(reading.xid_events, now, policy))
    if not reading.reachable:
        faults.append(GpuFault(REASON_GPU_LOST, Severity.FATAL, "not reachable through NVML"))
    if reading.ecc_dbe_volatile:
        faults.append(GpuFault(
            REASON_DOUBLE_BIT_ECC, Severity.FATAL,
            f"{reading.ecc_dbe_volatile} double-bit ECC errors since the driver loaded",
        ))
    if reading.row_remap_failure:
        faults.append(GpuFault(
            REASON_ROW_REMAP_FAILURE, Severity.FATAL, "row remapping failed: no spare rows",
        ))
    if reading.row_remap_pending:
        faults.append(GpuFault(
            REASON_ROW_REMAP_PENDING, Severity.TRANSIENT,
            "row remapping pending: needs a GPU reset",
        ))
    if _over_temperature(reading):
        faults.append(GpuFault(
            REASON_OVER_TEMPERATURE, Severity.TRANSIENT, _temperature_detail(reading),
        ))
    return GpuAssessment(reading.index, reading.uuid, _worst_first(_one_per_reason(faults)))


def node_verdict(
    readings: Sequence[GpuReading],
    *,
    expected_gpus: int,
    now: float,
    policy: HealthPolicy | None = None,
    known_uuids: Mapping[int, str] | None = None,
) -> NodeVerdict:
    """The node's GPUHealthy verdict from the readings of all its GPUs.

    `expected_gpus` is how many GPUs the node has (its GPU count label, or
    what the agent found at start): a GPU index below it without a reading is
    a GPU the driver no longer sees, which is fatal. `known_uuids` names such
    a GPU by the UUID it had when it was last seen.
    """
    policy = policy or HealthPolicy()
    known_uuids = known_uuids or {}
    by_index = {reading.index: reading for reading in readings}
    total = max([expected_gpus, *(index + 1 for index in by_index)])
    gpus = tuple(
        assess_gpu(by_index[index], now, policy)
        if index in by_index
        else _missing_gpu(index, known_uuids.get(index, ""))
        for index in range(total)
    )
    unhealthy = [gpu for gpu in gpus if not gpu.healthy]
    healthy_gpus = total - len(unhealthy)
    if not unhealthy:
        return NodeVerdict(
            True, REASON_HEALTHY, f"all {total} GPUs healthy", healthy_gpus, total, gpus
        )
    # The node's reason is its worst fault: fatal before transient, then the
    # lowest GPU index, so remediation reads the severity from the reason alone.
    worst = min(unhealthy, key=lambda gpu: (not gpu.fatal, gpu.index))
    message = f"{len(unhealthy)} of {total} GPUs unhealthy: " + "; ".join(
        _describe(gpu) for gpu in unhealthy
    )
    return NodeVerdict(False, worst.faults[0].reason, message, healthy_gpus, total, gpus)


def reason_is_fatal(reason: str) -> bool:
    return reason in FATAL_REASONS


def _xid_faults(
    events: Iterable[XidEvent], now: float, policy: HealthPolicy
) -> Iterable[GpuFault]:
    for event in sorted(events, key=lambda e: e.at, reverse=True):
        info = classify_xid(event.xid)
        if info.kind is XidClass.APPLICATION:
            continue
        if info.kind is XidClass.TRANSIENT and now - event.at > policy.transient_xid_window_s:
            continue
        severity = Severity.FATAL if info.kind is XidClass.FATAL else Severity.TRANSIENT
        yield GpuFault(info.reason, severity, f"XID {event.xid} ({info.meaning})")


def _over_temperature(reading: GpuReading) -> bool:
    if reading.thermal_slowdown:
        return True
    return (
        reading.temperature_c is not None
        and reading.slowdown_temperature_c is not None
        and reading.temperature_c >= reading.slowdown_temperature_c
    )


def _temperature_detail(reading: GpuReading) -> str:
    if reading.temperature_c is None:
        return "thermal slowdown"
    if reading.slowdown_temperature_c is None:
        return f"thermal slowdown at {reading.temperature_c} C"
    return (
        f"{reading.temperature_c} C, slowdown at {reading.slowdown_temperature_c} C"
    )


def _one_per_reason(faults: Iterable[GpuFault]) -> list[GpuFault]:
    # XID 48 and the DBE counter describe the same error: report it once,
    # keeping the first (the XID, which names itself).
    seen: set[str] = set()
    unique = []
    for fault in faults:
        if fault.reason not in seen:
            seen.add(fault.reason)
            unique.append(fault)
    return unique


def _worst_first(faults: list[GpuFault]) -> tuple[GpuFault, ...]:
    return tuple(sorted(faults, key=lambda fault: fault.severity is not Severity.FATAL))


def _missing_gpu(index: int, uuid: str) -> GpuAssessment:
    return GpuAssessment(index, uuid, (
        GpuFault(REASON_GPU_MISSING, Severity.FATAL, "not listed by the driver"),
    ))


def _describe(gpu: GpuAssessment) -> str:
    severity = "fatal" if gpu.fatal else "transient"
    details = ", ".join(fault.detail for fault in gpu.faults)
    return f"GPU {gpu.index} ({gpu.uuid or 'UUID unknown'}) {severity}: {details}"
