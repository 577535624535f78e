"""The fake backend and the fault-injection annotation it takes."""

from __future__ import annotations

import pytest
from gpucluster.agent.fake import FakeGpuSet, fake_gpu_uuid
from gpucluster.agent.gpu_profile import H100_80GB_HBM3, H200_141GB, load_profile
from gpucluster.agent.injection import (
    ANNOTATION_INJECT_FAULT,
    FaultKind,
    Injection,
    InjectionSyntaxError,
    format_injections,
    parse_injections,
)
from gpucluster.planning.health import node_verdict
from hypothesis import given
from hypothesis import strategies as st


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def gpus(clock: Clock) -> FakeGpuSet:
    return FakeGpuSet(load_profile(H100_80GB_HBM3), "gpu-node-7", clock=clock)


def verdict(gpus: FakeGpuSet, clock: Clock):
    return node_verdict(gpus.read(), expected_gpus=gpus.expected_gpus, now=clock(),
                        known_uuids=gpus.uuids)


# -- the annotation's syntax ------------------------------------------------

def test_parse_the_documented_forms() -> None:
    assert parse_injections("gpu=3,xid=79") == (Injection(3, FaultKind.XID, 79),)
    assert parse_injections(" gpu=0 , fault=overtemp ; gpu=all,xid=94 ;") == (
        Injection(0, FaultKind.OVER_TEMPERATURE),
        Injection(None, FaultKind.XID, 94),
    )
    assert parse_injections("fault=dbe,gpu=2") == (Injection(2, FaultKind.DOUBLE_BIT_ECC),)
    for name in ("dbe", "row-remap-failure", "overtemp", "gone", "reset"):
        assert parse_injections(f"gpu=1,fault={name}")[0].kind.value == name
    assert parse_injections("") == ()


@pytest.mark.parametrize("text", [
    "xid=79", "gpu=3", "gpu=3,xid=79,fault=dbe", "gpu=3,fault=melt", "gpu=-1,xid=79",
    "gpu=3,xid=0", "gpu=3,xid=abc", "gpu=3,gpu=4,xid=79", "gpu=3,colour=red,xid=1",
    "gpu=3;xid=79", "gpu=3,xid", "gpu=3,fault=xid",
])
def test_reject_malformed(text: str) -> None:
    with pytest.raises(InjectionSyntaxError):
        parse_injections(text)


injections = st.builds(
    Injection,
    st.none() | st.integers(0, 7),
    st.sampled_from([k for k in FaultKind if k is not FaultKind.XID]),
) | st.builds(lambda gpu, xid: Injection(gpu, FaultKind.XID, xid),
              st.none() | st.integers(0, 7), st.integers(1, 200))


@given(st.lists(injections, max_size=5).map(tuple))
def test_format_and_parse_round_trip(values: tuple[Injection, ...]) -> None:
    assert parse_injections(format_injections(values)) == values


# -- the fake GPUs ------------------------------------------------------------

def test_a_healthy_set_reads_the_profile(gpus: FakeGpuSet, clock: Clock) -> None:
    readings = gpus.read()
    assert [r.index for r in readings] == list(range(8))
    first = readings[0]
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert first.fb_total_mib == 81559
    assert first.fb_used_mib + first.fb_free_mib == 81559
    assert (first.sm_clock_mhz, first.mem_clock_mhz) == (1980, 2619)
    assert first.power_limit_w == 700
    assert first.ecc_enabled and first.ecc_dbe_volatile == 0
    assert verdict(gpus, clock).healthy


def test_uuids_are_nvml_shaped_deterministic_and_distinct() -> None:
    uuid = fake_gpu_uuid("gpu-node-7", 3)
    assert uuid == fake_gpu_uuid("gpu-node-7", 3)
    assert uuid.startswith("GPU-") and len(uuid) == len("GPU-00000000-1111-2222-3333-444444444444")
    assert len({fake_gpu_uuid(f"n{n}", i) for n in range(50) for i in range(8)}) == 400


@pytest.mark.parametrize(("text", "reason"), [
    ("gpu=3,xid=48", "DoubleBitECCError"),
    ("gpu=3,xid=79", "GPUFellOffBus"),
    ("gpu=3,xid=94", "ContainedECCError"),
    ("gpu=3,xid=95", "UncontainedECCError"),
    ("gpu=3,fault=dbe", "DoubleBitECCError"),
    ("gpu=3,fault=row-remap-failure", "RowRemapFailure"),
    ("gpu=3,fault=overtemp", "GPUOverTemperature"),
    ("gpu=3,fault=gone", "GPUMissing"),
])
def test_each_fault_gives_its_reason(gpus: FakeGpuSet, clock: Clock, text: str,
                                     reason: str) -> None:
    gpus.apply(parse_injections(text))
    result = verdict(gpus, clock)
    assert result.reason == reason
    assert result.unhealthy_indices == (3,)
    assert f"GPU 3 ({fake_gpu_uuid('gpu-node-7', 3)})" in result.message


def test_faults_show_in_the_readings(gpus: FakeGpuSet) -> None:
    gpus.apply(parse_injections(
        "gpu=0,fault=dbe;gpu=1,xid=79;gpu=2,fault=overtemp;gpu=4,fault=gone"
    ))
    by_index = {r.index: r for r in gpus.read()}
    assert by_index[0].ecc_dbe_volatile == 1 and by_index[0].last_xid == 48
    assert by_index[0].row_remap_pending
    assert not by_index[1].reachable and by_index[1].temperature_c is None
    assert by_index[1].last_xid == 79
    assert by_index[2].thermal_slowdown and by_index[2].temperature_c == 90
    assert 4 not in by_index


def test_clearing_the_annotation_ends_transient_faults_only(gpus: FakeGpuSet,
                                                            clock: Clock) -> None:
    gpus.apply(parse_injections("gpu=0,fault=overtemp;gpu=5,xid=79;gpu=6,xid=94"))
    assert verdict(gpus, clock).unhealthy_indices == (0, 5, 6)
    gpus.apply(())
    after = verdict(gpus, clock)
    assert after.unhealthy_indices == (5,)
    assert after.reason == "GPUFellOffBus"


def test_a_reset_clears_fatal_faults(gpus: FakeGpuSet, clock: Clock) -> None:
    gpus.apply(parse_injections("gpu=5,xid=79;gpu=6,fault=dbe"))
    gpus.apply(parse_injections("gpu=5,fault=reset"))
    assert verdict(gpus, clock).unhealthy_indices == (6,)
    gpus.apply(parse_injections("gpu=all,fault=reset"))
    assert verdict(gpus, clock).healthy


def test_a_transient_xid_kept_in_the_annotation_ages_out(gpus: FakeGpuSet,
                                                         clock: Clock) -> None:
    gpus.apply(parse_injections("gpu=2,xid=94"))
    clock.now += 60
    gpus.apply(parse_injections("gpu=2,xid=94;gpu=3,fault=overtemp"))  # 94 keeps its time
    assert verdict(gpus, clock).unhealthy_indices == (2, 3)
    clock.now += 600
    assert verdict(gpus, clock).unhealthy_indices == (3,)


def test_inject_adds_and_apply_annotation_applies_changes_only(gpus: FakeGpuSet,
                                                               clock: Clock) -> None:
    gpus.inject(Injection(1, FaultKind.XID, 95))
    gpus.inject(Injection(2, FaultKind.OVER_TEMPERATURE))
    assert verdict(gpus, clock).unhealthy_indices == (1, 2)
    gpus.clear_transient()
    assert verdict(gpus, clock).unhealthy_indices == (1,)

    gpus.apply_annotation("gpu=0,fault=gone")
    version = gpus.version
    gpus.apply_annotation("gpu=0,fault=gone")  # unchanged: nothing happens
    assert gpus.version == version
    gpus.apply_annotation("gpu=0,fault=nonsense")  # logged, faults unchanged
    assert gpus.version == version
    assert verdict(gpus, clock).unhealthy_indices == (0, 1)


def test_an_index_beyond_the_node_is_refused_whole(gpus: FakeGpuSet) -> None:
    with pytest.raises(ValueError, match="GPUs 0-7"):
        gpus.apply(parse_injections("gpu=1,fault=overtemp;gpu=8,xid=79"))
    assert all(reading.temperature_c == 39 for reading in gpus.read())


def test_readings_are_shared_until_faults_change(gpus: FakeGpuSet) -> None:
    first = gpus.read()
    assert gpus.read() is first
    gpus.inject(Injection(0, FaultKind.OVER_TEMPERATURE))
    second = gpus.read()
    assert second is not first
    assert second[1] is first[1]  # untouched GPUs keep their reading object


def test_an_h200_node(clock: Clock) -> None:
    gpus = FakeGpuSet(load_profile(H200_141GB), "h200-node", gpu_count=4, clock=clock)
    assert [r.fb_total_mib for r in gpus.read()] == [143771] * 4
    assert verdict(gpus, clock).message == "all 4 GPUs healthy"


def test_the_annotation_name() -> None:
    assert ANNOTATION_INJECT_FAULT == "gpucluster.dev/inject-fault"
