"""The pool planner: table cases and properties over random pools."""

from __future__ import annotations

import dataclasses

from gpucluster.planning.pools import (
    ObservedNode,
    PoolProvider,
    PoolShape,
    StaticCandidate,
    block_of,
    count_pool,
    node_name,
    ordinal_of,
    plan_pool,
    rack_of,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def shape(desired: int, provider: PoolProvider = PoolProvider.KWOK) -> PoolShape:
    return PoolShape(cluster="colossus", name="h100", provider=provider, desired_nodes=desired,
                     gpus_per_node=8, nodes_per_rack=4, racks_per_block=2)


def owned(*ordinals: int, busy: tuple[int, ...] = ()) -> list[ObservedNode]:
    return [ObservedNode(name=node_name("colossus", "h100", o), pool="h100", ordinal=o,
                         busy=o in busy) for o in ordinals]


def test_names_and_topology_follow_the_ordinal() -> None:
    s = shape(0)
    assert node_name("colossus", "h100", 17) == "colossus-h100-00017"
    assert ordinal_of("colossus", "h100", "colossus-h100-00017") == 17
    assert ordinal_of("colossus", "h100", "colossus-h200-00017") is None
    assert ordinal_of("colossus", "h100", "colossus-h100-17") is None
    assert (rack_of(s, 0), rack_of(s, 3), rack_of(s, 4)) == ("r0000", "r0000", "r0001")
    assert (block_of(s, 7), block_of(s, 8)) == ("b000", "b001")


def test_scale_up_fills_the_lowest_free_ordinals() -> None:
    plan = plan_pool(shape(5), owned(0, 2, 3))
    assert [n.ordinal for n in plan.create] == [1, 4]
    assert plan.create[0].name == "colossus-h100-00001"
    assert (plan.create[1].rack, plan.create[1].block) == ("r0001", "b000")


def test_scale_down_deletes_empty_nodes_and_drains_busy_ones_only_when_needed() -> None:
    plan = plan_pool(shape(2), owned(0, 1, 2, 3, busy=(2, 3)))
    assert set(plan.delete) == {"colossus-h100-00000", "colossus-h100-00001"}
    assert plan.drain == ()
    plan = plan_pool(shape(1), owned(0, 1, 2, busy=(1, 2)))
    assert plan.delete == ("colossus-h100-00000",)
    assert plan.drain == ("colossus-h100-00002",)


def test_broken_nodes_go_first() -> None:
    nodes = owned(0, 1, 2)
    nodes[0] = dataclasses.replace(nodes[0], ready=False)
    assert plan_pool(shape(2), nodes).delete == ("colossus-h100-00000",)


def test_draining_nodes_are_uncordoned_when_scale_down_is_withdrawn() -> None:
    nodes = owned(0, 1, busy=(1,))
    nodes[1] = dataclasses.replace(nodes[1], draining=True)
    assert plan_pool(shape(2), nodes).undrain == ("colossus-h100-00001",)
    # The empty node leaves instead, so the busy one need not drain any more.
    plan = plan_pool(shape(1), nodes)
    assert (plan.delete, plan.undrain) == (("colossus-h100-00000",), ("colossus-h100-00001",))
    assert plan_pool(shape(0), nodes).drain == ("colossus-h100-00001",)


def test_static_pool_adopts_unclaimed_nodes_and_never_deletes() -> None:
    s = shape(2, PoolProvider.STATIC)
    candidates = [StaticCandidate("gpu-b"), StaticCandidate("gpu-a"), StaticCandidate("gpu-c")]
    plan = plan_pool(s, [], candidates)
    assert [n.name for n in plan.adopt] == ["gpu-a", "gpu-b"]
    held = [ObservedNode(name=n, pool="h100", ordinal=i) for i, n in enumerate(["gpu-a", "gpu-b"])]
    plan = plan_pool(dataclasses.replace(s, desired_nodes=0), held, candidates)
    assert plan.delete == () and set(plan.release) == {"gpu-a", "gpu-b"}


def test_static_nodes_claimed_by_another_cluster_are_a_conflict_and_change_nothing() -> None:
    s = shape(2, PoolProvider.STATIC)
    plan = plan_pool(s, [], [StaticCandidate("gpu-a", claimed_by="other"), StaticCandidate("gpu-b")])
    assert plan.conflicts == ("gpu-a",)
    assert plan.empty


def test_counts() -> None:
    nodes = owned(0, 1, 2)
    nodes[0] = dataclasses.replace(nodes[0], ready=False)
    nodes[1] = dataclasses.replace(nodes[1], gpu_healthy=False)
    counts = count_pool(shape(4), nodes)
    assert (counts.nodes, counts.ready_nodes, counts.healthy_nodes) == (3, 2, 1)
    assert (counts.desired_gpus, counts.ready_gpus, counts.healthy_gpus) == (32, 16, 8)


observed_nodes = st.lists(
    st.builds(lambda o, busy, ready, healthy, draining: ObservedNode(
        name=node_name("colossus", "h100", o), pool="h100", ordinal=o, busy=busy, ready=ready,
        gpu_healthy=healthy, draining=draining and busy),
        st.integers(0, 60), st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    max_size=40, unique_by=lambda n: n.ordinal)


@settings(max_examples=300, deadline=None)
@given(nodes=observed_nodes, desired=st.integers(0, 50))
def test_kwok_plan_converges_in_one_step(nodes: list[ObservedNode], desired: int) -> None:
    plan = plan_pool(shape(desired), nodes)
    # Drained nodes leave once their pods are evicted; everything else at once.
    assert len(nodes) + len(plan.create) - len(plan.delete) - len(plan.drain) == desired
    names = [n.name for n in nodes] + [c.name for c in plan.create]
    assert len(names) == len(set(names)), "a created node duplicates an existing one"
    remaining = {n.name for n in nodes} - set(plan.delete) - set(plan.drain)
    settled = [n for n in nodes if n.name in remaining] + [
        ObservedNode(name=c.name, pool="h100", ordinal=c.ordinal) for c in plan.create]
    if all(not n.busy for n in nodes):
        assert plan_pool(shape(desired), settled).empty


@settings(max_examples=300, deadline=None)
@given(nodes=observed_nodes, desired=st.integers(0, 50))
def test_never_a_busy_node_while_an_empty_one_stays(nodes: list[ObservedNode], desired: int) -> None:
    plan = plan_pool(shape(desired), nodes)
    removed = set(plan.delete) | set(plan.drain)
    busy_removed = any(n.busy and n.name in removed for n in nodes)
    empty_kept = any(not n.busy and n.name not in removed for n in nodes)
    assert not (busy_removed and empty_kept)
    assert all(not n.busy for n in nodes if n.name in plan.delete), "deleted a busy node"


@settings(max_examples=300, deadline=None)
@given(nodes=observed_nodes, desired=st.integers(0, 50),
       extra=st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f"]), unique=True))
def test_static_pool_never_deletes_an_adopted_node(
        nodes: list[ObservedNode], desired: int, extra: list[str]) -> None:
    s = shape(desired, PoolProvider.STATIC)
    candidates = [StaticCandidate(n.name, "colossus") for n in nodes] + [
        StaticCandidate(f"free-{x}") for x in extra]
    plan = plan_pool(s, nodes, candidates)
    assert plan.delete == () and plan.create == ()
    adopted = len(nodes) + len(plan.adopt) - len(plan.release) - len(plan.drain)
    assert adopted == min(desired, len(nodes) + len(extra))
