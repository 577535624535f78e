"""The remediation budget: properties over random pools and storms."""

from __future__ import annotations

from gpucluster.planning.remediation import (
    NodeHealth,
    RemediationBudget,
    UnseenWrites,
    overlay_unseen_writes,
    plan_remediation,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def test_percent_budget_rounds_down_but_never_to_zero() -> None:
    assert RemediationBudget("10%").unavailable_allowed(100) == 10
    assert RemediationBudget("10%").unavailable_allowed(5) == 1
    assert RemediationBudget("0%").unavailable_allowed(50) == 0
    assert RemediationBudget(3).unavailable_allowed(2) == 3


def test_fatal_goes_before_transient_and_the_rest_waits() -> None:
    nodes = [NodeHealth("a", gpu_healthy=False, fault_reason="GPUOverTemperature"),
             NodeHealth("b", gpu_healthy=False, fault_reason="XIDFallenOffBus", fatal=True),
             NodeHealth("c")]
    plan = plan_remediation(nodes, 3, RemediationBudget(1), [], 0.0, can_replace=True)
    assert plan.quarantine == ("b",) and plan.waiting == ("a",) and plan.budget_exhausted


def test_quarantined_fatal_nodes_are_drained_then_replaced_and_recovered_ones_released() -> None:
    nodes = [NodeHealth("busy", gpu_healthy=False, fatal=True, quarantined=True, busy=True),
             NodeHealth("empty", gpu_healthy=False, fatal=True, quarantined=True),
             NodeHealth("cooled", quarantined=True)]
    plan = plan_remediation(nodes, 3, RemediationBudget(3), [], 0.0, can_replace=True)
    assert (plan.drain, plan.replace, plan.release) == (("busy",), ("empty",), ("cooled",))
    static = plan_remediation(nodes, 3, RemediationBudget(3), [], 0.0, can_replace=False)
    assert static.replace == (), "a static node waits for a person"


def test_rate_window_limits_new_quarantines() -> None:
    nodes = [NodeHealth(f"n{i}", gpu_healthy=False, fatal=True) for i in range(5)]
    budget = RemediationBudget(5, max_per_window=2, window_seconds=60)
    assert len(plan_remediation(nodes, 5, budget, [100.0], 120.0, True).quarantine) == 1
    assert len(plan_remediation(nodes, 5, budget, [100.0], 200.0, True).quarantine) == 2


pools = st.lists(st.builds(NodeHealth, name=st.uuids().map(str), ready=st.booleans(),
                           gpu_healthy=st.booleans(), fatal=st.booleans(), quarantined=st.booleans(),
                           busy=st.booleans()), max_size=30)


@settings(max_examples=400, deadline=None)
@given(nodes=pools, extra_desired=st.integers(0, 5), budget=st.sampled_from([0, 1, 3, "5%", "50%"]),
       per_window=st.integers(0, 3), can_replace=st.booleans())
def test_the_plain_healthy_nodes_only_need_counting(nodes: list[NodeHealth], extra_desired: int,
                                                   budget: int | str, per_window: int, can_replace: bool) -> None:
    """The operator passes only the nodes a pass may act on, the count of
    all, and of those left out that are not Ready: the plan is the one over
    every node."""
    policy = RemediationBudget(budget, max_per_window=per_window, window_seconds=300)
    desired = len(nodes) + extra_desired
    looked_at = [n for n in nodes if not n.gpu_healthy or n.quarantined]
    not_ready = sum(1 for n in nodes if n not in looked_at and not n.ready)
    assert plan_remediation(looked_at, desired, policy, [900.0], 1000.0, can_replace, present_nodes=len(nodes),
                            unlisted_not_ready=not_ready) == plan_remediation(nodes, desired, policy, [900.0],
                                                                              1000.0, can_replace)


@settings(max_examples=400, deadline=None)
@given(nodes=pools, extra_desired=st.integers(0, 5), budget=st.one_of(st.integers(0, 10), st.sampled_from(
    ["0%", "5%", "10%", "25%", "50%", "100%"])), window=st.lists(st.floats(0, 1000), max_size=10),
       per_window=st.integers(0, 10))
def test_never_more_out_than_the_budget_allows(nodes: list[NodeHealth], extra_desired: int,
                                              budget: int | str, window: list[float], per_window: int) -> None:
    desired = len(nodes) + extra_desired
    policy = RemediationBudget(budget, max_per_window=per_window, window_seconds=300)
    plan = plan_remediation(nodes, desired, policy, window, 1000.0, can_replace=True)
    already_out = sum(1 for n in nodes if n.quarantined) - len(plan.release) + sum(
        1 for n in nodes if not n.ready and not n.quarantined) + extra_desired
    limit = policy.unavailable_allowed(desired)
    if plan.quarantine:
        assert already_out + len(plan.quarantine) <= limit
    if per_window:
        assert len(plan.quarantine) <= max(0, per_window - sum(1 for t in window if 1000.0 - t < 300))
    by_name = {n.name: n for n in nodes}
    assert all(not by_name[n].gpu_healthy and not by_name[n].quarantined for n in plan.quarantine)
    assert all(by_name[n].gpu_healthy for n in plan.release)
    assert all(not by_name[n].busy for n in plan.replace), "a busy node is drained before replacement"
    assert set(plan.quarantine).isdisjoint(plan.waiting)


def test_a_quarantine_the_index_has_not_shown_is_not_planned_or_counted_twice() -> None:
    faulty = NodeHealth("a", gpu_healthy=False, fault_reason="XIDFallenOffBus", fatal=True)
    budget = RemediationBudget(1, max_per_window=1)
    first = plan_remediation([faulty], 1, budget, [], 100.0, can_replace=False)
    assert first.quarantine == ("a",)
    # The next pass runs before the node's watch event: the index still says
    # "not quarantined", the write says otherwise.
    unseen = UnseenWrites(quarantine={"a": (True, 100.0)})
    nodes, still = overlay_unseen_writes([faulty], unseen, 101.0, ttl_seconds=120)
    second = plan_remediation(nodes, 1, budget, [100.0], 101.0, can_replace=False)
    assert second.quarantine == () and not second.budget_exhausted
    assert still == unseen


def test_an_unseen_write_ends_when_the_index_shows_it_or_it_goes_stale() -> None:
    unseen = UnseenWrites(quarantine={"shown": (True, 0.0), "stale": (True, 0.0), "pending": (False, 90.0)},
                          deleted={"gone": 0.0, "still-listed": 90.0})
    nodes = [NodeHealth("shown", quarantined=True), NodeHealth("stale"),
             NodeHealth("pending", quarantined=True), NodeHealth("still-listed", quarantined=True)]
    corrected, still = overlay_unseen_writes(nodes, unseen, 121.0, ttl_seconds=120)
    assert {n.name: n.quarantined for n in corrected} == {"shown": True, "stale": False, "pending": False}
    assert still == UnseenWrites(quarantine={"pending": (False, 90.0)}, deleted={"still-listed": 90.0})
