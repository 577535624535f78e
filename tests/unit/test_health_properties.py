"""Properties of the GPU health verdict over generated readings."""

from __future__ import annotations

import random

from gpucluster.planning.health import (
    CONDITION_REASON_PATTERN,
    FATAL_REASONS,
    REASON_HEALTHY,
    TRANSIENT_REASONS,
    XID_CATALOGUE,
    GpuReading,
    HealthPolicy,
    XidClass,
    XidEvent,
    node_verdict,
)
from hypothesis import given, settings
from hypothesis import strategies as st

NOW = 1_800_000_000.0
WINDOW_S = 600.0
POLICY = HealthPolicy(transient_xid_window_s=WINDOW_S)

FATAL_XIDS = sorted(x for x, info in XID_CATALOGUE.items() if info.kind is XidClass.FATAL)
APPLICATION_XIDS = sorted(
    x for x, info in XID_CATALOGUE.items() if info.kind is XidClass.APPLICATION
)

xid_events = st.lists(
    st.builds(XidEvent, st.integers(1, 200), st.floats(NOW - 10 * WINDOW_S, NOW)), max_size=3
).map(tuple)


@st.composite
def readings(draw: st.DrawFn, index: int) -> GpuReading:
    return GpuReading(
        index=index,
        uuid=f"GPU-{index:08x}-1111-2222-3333-444444444444",
        name="NVIDIA H200",
        reachable=draw(st.booleans()),
        temperature_c=draw(st.none() | st.integers(20, 100)),
        slowdown_temperature_c=draw(st.none() | st.just(87)),
        thermal_slowdown=draw(st.booleans()),
        ecc_dbe_volatile=draw(st.none() | st.integers(0, 3)),
        row_remap_pending=draw(st.booleans()),
        row_remap_failure=draw(st.booleans()),
        xid_events=draw(xid_events),
    )


@st.composite
def nodes(draw: st.DrawFn) -> tuple[list[GpuReading], int]:
    expected = draw(st.integers(1, 8))
    present = draw(st.sets(st.integers(0, expected - 1)))
    return [draw(readings(index)) for index in sorted(present)], expected


@settings(max_examples=300, deadline=None)
@given(nodes())
def test_counts_status_and_reason_agree(node: tuple[list[GpuReading], int]) -> None:
    gpus, expected = node
    verdict = node_verdict(gpus, expected_gpus=expected, now=NOW, policy=POLICY)
    assert verdict.total_gpus == expected
    assert verdict.healthy_gpus + len(verdict.unhealthy_indices) == expected
    assert verdict.healthy == (verdict.healthy_gpus == expected)
    assert CONDITION_REASON_PATTERN.match(verdict.reason)
    if verdict.healthy:
        assert verdict.reason == REASON_HEALTHY
    else:
        assert verdict.reason in FATAL_REASONS | TRANSIENT_REASONS
        # Fatal wins: the reason is fatal exactly when some GPU is fatal.
        assert (verdict.reason in FATAL_REASONS) == any(g.fatal for g in verdict.gpus)
        for gpu in verdict.gpus:
            if not gpu.healthy:
                assert f"GPU {gpu.index} (" in verdict.message


@settings(max_examples=200, deadline=None)
@given(nodes(), st.randoms(use_true_random=False))
def test_the_order_of_readings_does_not_matter(
    node: tuple[list[GpuReading], int], rng: random.Random
) -> None:
    gpus, expected = node
    shuffled = list(gpus)
    rng.shuffle(shuffled)
    assert node_verdict(gpus, expected_gpus=expected, now=NOW, policy=POLICY) == node_verdict(
        shuffled, expected_gpus=expected, now=NOW, policy=POLICY
    )


@settings(max_examples=200, deadline=None)
@given(nodes(), st.sampled_from(FATAL_XIDS), st.floats(0, 365 * 86400.0))
def test_a_fatal_xid_of_any_age_makes_the_node_unhealthy(
    node: tuple[list[GpuReading], int], code: int, age_s: float
) -> None:
    gpus, expected = node
    victim = GpuReading(index=expected, uuid="GPU-victim", name="NVIDIA H200",
                        xid_events=(XidEvent(code, NOW - age_s),))
    verdict = node_verdict([*gpus, victim], expected_gpus=expected, now=NOW, policy=POLICY)
    assert not verdict.healthy
    assert verdict.reason in FATAL_REASONS
    assert expected in verdict.unhealthy_indices


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.lists(st.sampled_from(APPLICATION_XIDS), max_size=5),
       st.lists(st.integers(1, 200), max_size=5))
def test_only_application_xids_or_old_transient_ones_leave_a_node_healthy(
    count: int, application: list[int], other: list[int]
) -> None:
    old = [x for x in other if XID_CATALOGUE.get(x) is None
           or XID_CATALOGUE[x].kind is not XidClass.FATAL]
    events = tuple(XidEvent(x, NOW) for x in application) + tuple(
        XidEvent(x, NOW - WINDOW_S - 1) for x in old
    )
    gpus = [GpuReading(index=i, uuid=f"GPU-{i}", name="NVIDIA H200", xid_events=events)
            for i in range(count)]
    assert node_verdict(gpus, expected_gpus=count, now=NOW, policy=POLICY).healthy
