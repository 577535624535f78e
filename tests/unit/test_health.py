"""The GPU health verdict, case by case: the XID table and each fault source."""

from __future__ import annotations

import dataclasses

import pytest
from gpucluster.planning.health import (
    CONDITION_REASON_PATTERN,
    FATAL_REASONS,
    REASON_HEALTHY,
    TRANSIENT_REASONS,
    XID_CATALOGUE,
    GpuReading,
    HealthPolicy,
    Severity,
    XidClass,
    XidEvent,
    assess_gpu,
    classify_xid,
    node_verdict,
    reason_is_fatal,
)

NOW = 1_800_000_000.0
POLICY = HealthPolicy(transient_xid_window_s=600)


def gpu(index: int = 0, **changes: object) -> GpuReading:
    base = GpuReading(
        index=index, uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000",
        name="NVIDIA H100 80GB HBM3", temperature_c=40, slowdown_temperature_c=87,
        ecc_enabled=True, ecc_dbe_volatile=0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def node(*readings: GpuReading, expected: int = 8):
    present = {reading.index for reading in readings}
    full = [*readings, *(gpu(i) for i in range(expected) if i not in present)]
    return node_verdict(full, expected_gpus=expected, now=NOW, policy=POLICY)


def xid(code: int, age_s: float = 0.0) -> tuple[XidEvent, ...]:
    return (XidEvent(code, NOW - age_s),)


@pytest.mark.parametrize(("code", "kind", "reason"), [
    (48, XidClass.FATAL, "DoubleBitECCError"),
    (79, XidClass.FATAL, "GPUFellOffBus"),
    (94, XidClass.TRANSIENT, "ContainedECCError"),
    (95, XidClass.FATAL, "UncontainedECCError"),
    (63, XidClass.TRANSIENT, "RowRemapPending"),
    (64, XidClass.FATAL, "RowRemapFailure"),
    (92, XidClass.TRANSIENT, "HighSingleBitECCRate"),
    (74, XidClass.FATAL, "NVLinkError"),
    (13, XidClass.APPLICATION, ""),
    (31, XidClass.APPLICATION, ""),
    (43, XidClass.APPLICATION, ""),
    (45, XidClass.APPLICATION, ""),
    (68, XidClass.APPLICATION, ""),
])
def test_xid_table(code: int, kind: XidClass, reason: str) -> None:
    info = classify_xid(code)
    assert (info.kind, info.reason) == (kind, reason)


def test_an_xid_not_in_the_table_is_transient() -> None:
    info = classify_xid(999)
    assert info.kind is XidClass.TRANSIENT
    assert info.reason == "XIDError"


def test_every_reason_is_a_valid_condition_reason_of_one_severity() -> None:
    reasons = FATAL_REASONS | TRANSIENT_REASONS | {REASON_HEALTHY}
    assert all(CONDITION_REASON_PATTERN.match(reason) for reason in reasons)
    assert not FATAL_REASONS & TRANSIENT_REASONS
    for info in XID_CATALOGUE.values():
        assert (info.reason in FATAL_REASONS) == (info.kind is XidClass.FATAL)


def test_all_healthy() -> None:
    verdict = node()
    assert verdict.healthy and verdict.condition_status == "True"
    assert verdict.reason == REASON_HEALTHY
    assert verdict.message == "all 8 GPUs healthy"
    assert (verdict.healthy_gpus, verdict.total_gpus) == (8, 8)
    assert verdict.unhealthy_indices == ()


def test_fallen_off_the_bus_names_the_gpu_and_the_xid() -> None:
    verdict = node(gpu(3, xid_events=xid(79), reachable=False))
    assert not verdict.healthy and verdict.condition_status == "False"
    assert verdict.reason == "GPUFellOffBus"
    assert reason_is_fatal(verdict.reason)
    assert verdict.healthy_gpus == 7
    assert verdict.unhealthy_indices == (3,)
    assert "GPU 3 (GPU-00000003-0000-0000-0000-000000000000) fatal" in verdict.message
    assert "XID 79 (GPU has fallen off the bus)" in verdict.message
    assert "not reachable through NVML" in verdict.message


def test_a_double_bit_error_counted_once_whether_seen_as_xid_or_counter() -> None:
    faults = assess_gpu(gpu(xid_events=xid(48), ecc_dbe_volatile=1), NOW, POLICY).faults
    assert [fault.reason for fault in faults] == ["DoubleBitECCError"]
    from_counter = assess_gpu(gpu(ecc_dbe_volatile=2), NOW, POLICY).faults
    assert [(f.reason, f.severity) for f in from_counter] == [
        ("DoubleBitECCError", Severity.FATAL)
    ]


def test_row_remapping() -> None:
    assert node(gpu(1, row_remap_failure=True)).reason == "RowRemapFailure"
    pending = node(gpu(1, row_remap_pending=True))
    assert pending.reason == "RowRemapPending"
    assert not reason_is_fatal(pending.reason)


def test_over_temperature_by_threshold_or_by_slowdown() -> None:
    hot = node(gpu(2, temperature_c=90))
    assert hot.reason == "GPUOverTemperature"
    assert "90 C, slowdown at 87 C" in hot.message
    assert node(gpu(2, temperature_c=60, thermal_slowdown=True)).reason == "GPUOverTemperature"
    assert node(gpu(2, temperature_c=86)).healthy


def test_application_xids_leave_the_gpu_healthy() -> None:
    events = tuple(XidEvent(code, NOW) for code in (13, 31, 43, 45, 68))
    assert node(gpu(0, xid_events=events)).healthy


def test_a_transient_xid_ages_out_and_a_fatal_one_does_not() -> None:
    assert node(gpu(0, xid_events=xid(94, age_s=60))).reason == "ContainedECCError"
    assert node(gpu(0, xid_events=xid(94, age_s=601))).healthy
    assert node(gpu(0, xid_events=xid(95, age_s=86400))).reason == "UncontainedECCError"


def test_a_gpu_the_driver_no_longer_lists_is_missing() -> None:
    readings = [gpu(i) for i in range(8) if i != 5]
    verdict = node_verdict(readings, expected_gpus=8, now=NOW,
                           known_uuids={5: "GPU-55555555-0000-0000-0000-000000000000"})
    assert verdict.reason == "GPUMissing"
    assert verdict.unhealthy_indices == (5,)
    assert "GPU 5 (GPU-55555555-0000-0000-0000-000000000000) fatal" in verdict.message
    anonymous = node_verdict(readings, expected_gpus=8, now=NOW)
    assert "GPU 5 (UUID unknown)" in anonymous.message


def test_the_worst_fault_gives_the_reason_and_every_unhealthy_gpu_is_named() -> None:
    verdict = node(gpu(0, temperature_c=95), gpu(6, xid_events=xid(95)), gpu(7, xid_events=xid(94)))
    assert verdict.reason == "UncontainedECCError"
    assert verdict.unhealthy_indices == (0, 6, 7)
    assert verdict.message.startswith("3 of 8 GPUs unhealthy: GPU 0 ")
    for index in (0, 6, 7):
        assert f"GPU {index} (" in verdict.message


def test_among_transient_faults_the_lowest_gpu_gives_the_reason() -> None:
    verdict = node(gpu(4, xid_events=xid(94)), gpu(2, row_remap_pending=True))
    assert verdict.reason == "RowRemapPending"


def test_readings_beyond_the_expected_count_still_count() -> None:
    verdict = node_verdict([gpu(i) for i in range(9)], expected_gpus=8, now=NOW)
    assert verdict.total_gpus == 9 and verdict.healthy


def test_last_xid_is_the_most_recent() -> None:
    reading = gpu(xid_events=(XidEvent(79, NOW), XidEvent(13, NOW - 5)))
    assert reading.last_xid == 79
    assert gpu().last_xid == 0
