"""Karpenter pools' planning: the NodePool's shape, NodeClaims read back,
and the scale-down that picks its own victims, driven against a small model
of Karpenter's static capacity controllers (v1.14: pkg/controllers/static)."""

from __future__ import annotations

import dataclasses

from gpucluster import names
from gpucluster.planning.karpenter import (
    ClaimCounts,
    KarpenterPlan,
    NodeClassRef,
    NodePoolTemplate,
    ObservedClaim,
    ObservedNodePool,
    count_claims,
    nodepool_current,
    nodepool_manifest,
    observe_claim,
    observe_nodepool,
    plan_karpenter_pool,
    plan_labels,
    provider_topology,
    provisioning_summary,
)
from gpucluster.planning.pools import ObservedNode, PoolProvider, PoolShape
from hypothesis import given, settings
from hypothesis import strategies as st


def shape(desired: int) -> PoolShape:
    return PoolShape(cluster="colossus", name="h100", provider=PoolProvider.KARPENTER, desired_nodes=desired,
                     gpus_per_node=8, nodes_per_rack=2, racks_per_block=2)


TEMPLATE = NodePoolTemplate(
    cluster="colossus", pool="h100", node_class=NodeClassRef("karpenter.k8s.aws", "EC2NodeClass", "gpu"),
    instance_types=("p5.48xlarge",), labels={"team": "llm", names.LABEL_POOL: "h100"},
    taints=[{"key": "dedicated", "value": "training", "effect": "NoSchedule"}], drift_budget=2)


def test_the_nodepool_is_fixed_size_never_consolidated_and_has_room_for_replacements() -> None:
    body = nodepool_manifest(TEMPLATE, replicas=4, node_limit=6)
    assert body["metadata"]["name"] == "colossus-h100"
    spec = body["spec"]
    assert (spec["replicas"], spec["limits"]) == (4, {"nodes": "6"})
    assert spec["disruption"]["budgets"] == [{"nodes": "0", "reasons": ["Empty", "Underutilized"]},
                                             {"nodes": "2", "reasons": ["Drifted"]}]
    template = spec["template"]
    assert template["metadata"]["labels"] == {"gpucluster.dev/pool": "h100", "team": "llm"}
    assert template["spec"]["requirements"] == [
        {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["p5.48xlarge"]}]
    assert template["spec"]["nodeClassRef"] == {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass",
                                                "name": "gpu"}
    assert template["spec"]["taints"] == [{"key": "dedicated", "value": "training", "effect": "NoSchedule"}]
    assert template["spec"]["expireAfter"] == "Never"


def test_the_applied_digest_says_when_a_write_can_be_skipped() -> None:
    body = nodepool_manifest(TEMPLATE, replicas=4, node_limit=6)
    applied = body["metadata"]["annotations"][names.ANNOTATION_NODEPOOL_APPLIED]
    assert nodepool_manifest(TEMPLATE, replicas=4, node_limit=6) == body, "the same inputs, the same body"
    assert nodepool_manifest(TEMPLATE, replicas=5, node_limit=6)["metadata"]["annotations"] != {
        names.ANNOTATION_NODEPOOL_APPLIED: applied}
    read_back = {**body, "spec": {**body["spec"], "limits": {"nodes": "6"}},
                 "status": {"conditions": [{"type": "Ready", "status": "False", "message": "NodeClassNotFound"}]}}
    observed = observe_nodepool(read_back)
    assert observed == ObservedNodePool(replicas=4, node_limit=6, applied=applied, ready="False",
                                        message="NodeClassNotFound")
    assert nodepool_current(observed, body)
    assert not nodepool_current(dataclasses.replace(observed, replicas=7), body), "a hand edit is undone"
    assert not nodepool_current(None, body)
    assert observe_nodepool(None) is None


def claim_object(name: str, *stages: str, launch: tuple[str, str, str] | None = None,
                 deleting: bool = False, node: str = "") -> dict[str, object]:
    conditions = [{"type": s, "status": "True", "reason": s} for s in stages]
    if launch:
        conditions.append({"type": "Launched", "status": launch[0], "reason": launch[1], "message": launch[2]})
    meta: dict[str, object] = {"name": name, "labels": {names.LABEL_POOL: "h100"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"nodeName": node, "conditions": conditions}}


def test_claims_are_read_by_stage_and_a_failed_launch_says_why() -> None:
    ready = observe_claim(claim_object("h100-a", "Launched", "Registered", "Initialized", "Ready",
                                       node="n1"), created=10)
    assert (ready.pool, ready.node, ready.ready, ready.launch_failure, ready.stage) == ("h100", "n1", True, "",
                                                                                        "Ready")
    waiting = observe_claim(claim_object("h100-b", launch=("Unknown", "AwaitingReconciliation", "")), 10)
    assert (waiting.launched, waiting.launch_failure, waiting.stage) == (False, "", "not Launched")
    failed = observe_claim(claim_object("h100-c", launch=("Unknown", "LaunchFailed", "no capacity")), 10)
    assert failed.launch_failure == "LaunchFailed: no capacity"
    registered = observe_claim(claim_object("h100-d", "Launched", "Registered", deleting=True), 10)
    assert (registered.stage, registered.deleting) == ("Registered, not Initialized", True)


def test_counts_name_slow_and_failed_claims_but_not_those_leaving() -> None:
    claims = [
        ObservedClaim("a", "h100", created=0, launched=True, registered=True, initialized=True, ready=True),
        ObservedClaim("b", "h100", created=0, launched=True),
        ObservedClaim("c", "h100", created=95),
        ObservedClaim("d", "h100", created=0, launch_failure="LaunchFailed: x"),
        ObservedClaim("e", "h100", created=0, deleting=True),
    ]
    counts = count_claims(claims, now=100, slow_after=60)
    assert (counts.claims, counts.launched, counts.registered, counts.initialized, counts.ready) == (5, 2, 1, 1, 1)
    assert [c.name for c in counts.slow] == ["b"]
    assert [c.name for c in counts.failed] == ["d"]
    assert provisioning_summary([counts, ClaimCounts(launched=1, ready=1)], desired=6) == \
        "3/6 launched, 1 registered, 1 initialized, 2 ready"
    assert provisioning_summary([], desired=0) == ""


def test_block_and_rack_come_from_aws_network_layers_where_present() -> None:
    assert provider_topology({names.LABEL_AWS_NETWORK_LAYER_2: "nn-2", names.LABEL_AWS_NETWORK_LAYER_3: "nn-3",
                              "topology.k8s.aws/network-node-layer-1": "nn-1"}) == ("nn-2", "nn-3")
    assert provider_topology({names.LABEL_AWS_NETWORK_LAYER_3: "nn-3"}) is None
    aws = ObservedNode(name="i-2", pool="h100", ordinal=-1, provider_topology=("nn-2", "nn-3"))
    plain = ObservedNode(name="i-1", pool="h100", ordinal=-1)
    labelled = ObservedNode(name="i-0", pool="h100", ordinal=0, block="b000", rack="r0000")
    plan = {n.name: (n.ordinal, n.block, n.rack) for n in plan_labels(shape(3), [aws, plain, labelled])}
    assert plan == {"i-1": (1, "b000", "r0000"), "i-2": (2, "nn-2", "nn-3")}


def claim(name: str, node: str = "", deleting: bool = False) -> ObservedClaim:
    return ObservedClaim(name=name, pool="h100", node=node, deleting=deleting, launched=bool(node))


def node(name: str, ordinal: int, busy: bool = False, draining: bool = False) -> ObservedNode:
    return ObservedNode(name=name, pool="h100", ordinal=ordinal, busy=busy, draining=draining,
                        block="b000", rack=f"r{ordinal // 2:04d}")


def test_scale_down_holds_first_then_deletes_the_chosen_claims_then_lowers_replicas() -> None:
    claims = [claim("c0", "n0"), claim("c1", "n1"), claim("c2", "n2"), claim("c3")]
    nodes = [node("n0", 0, busy=True), node("n1", 1), node("n2", 2, busy=True)]
    steady = ObservedNodePool(replicas=4, node_limit=5, applied="")
    first = plan_karpenter_pool(shape(2), 1, steady, claims, nodes)
    # The unlaunched claim and the empty node go; nothing is deleted before the hold is seen.
    assert (first.replicas, first.node_limit) == (4, 2), "Karpenter held: no launch under the limit"
    assert (first.drain, first.delete_claims) == (("n1",), ())
    held = ObservedNodePool(replicas=4, node_limit=2, applied="")
    second = plan_karpenter_pool(shape(2), 1, held, claims, [node("n0", 0, True), node("n1", 1, draining=True),
                                                             node("n2", 2, True)])
    assert (second.drain, second.delete_claims) == (("n1",), ("c1", "c3"))
    leaving = [claim("c0", "n0"), claim("c1", "n1", deleting=True), claim("c2", "n2"), claim("c3", deleting=True)]
    third = plan_karpenter_pool(shape(2), 1, held, leaving, nodes)
    assert (third.replicas, third.node_limit, third.delete_claims) == (4, 2, ())
    done = plan_karpenter_pool(shape(2), 1, held, leaving[::2], [nodes[0], nodes[2]])
    assert (done.replicas, done.node_limit) == (2, 3)


def test_a_busy_node_is_drained_before_its_claim_goes_and_uncordoned_if_no_longer_wanted() -> None:
    claims = [claim("c0", "n0"), claim("c1", "n1")]
    busy = [node("n0", 0, busy=True), node("n1", 1, busy=True)]
    held = ObservedNodePool(replicas=2, node_limit=1, applied="")
    plan = plan_karpenter_pool(shape(1), 1, held, claims, busy)
    assert (plan.drain, plan.delete_claims) == (("n1",), ())
    emptied = [busy[0], node("n1", 1, draining=True)]
    assert plan_karpenter_pool(shape(1), 1, held, claims, emptied).delete_claims == ("c1",)
    withdrawn = plan_karpenter_pool(shape(2), 1, held, claims, [busy[0], node("n1", 1, True, draining=True)])
    assert (withdrawn.undrain, withdrawn.drain, withdrawn.replicas, withdrawn.node_limit) == (("n1",), (), 2, 3)


@dataclasses.dataclass
class Node:
    ordinal: int = -1
    block: str = ""
    rack: str = ""
    busy: bool = False
    draining: bool = False


@dataclasses.dataclass
class World:
    """The operator's pool and a model of Karpenter's static controllers:
    provisioning launches up to replicas within limits.nodes (claims being
    deleted count against the limit), deprovisioning removes claims of its
    own choice when there are more active ones than replicas."""

    desired: int
    surge: int
    replicas: int | None = None
    limit: int = 0
    claims: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)  # name -> (node, deleting)
    nodes: dict[str, Node] = dataclasses.field(default_factory=dict)
    made: int = 0
    victims: set[str] = dataclasses.field(default_factory=set)

    def observe(self) -> tuple[ObservedNodePool | None, list[ObservedClaim], list[ObservedNode]]:
        pool = None if self.replicas is None else ObservedNodePool(self.replicas, self.limit, "")
        claims = [ObservedClaim(name, "h100", node=n, deleting=d) for name, (n, d) in sorted(self.claims.items())]
        nodes = [ObservedNode(name=name, pool="h100", ordinal=n.ordinal, busy=n.busy, draining=n.draining,
                              block=n.block, rack=n.rack) for name, n in sorted(self.nodes.items())]
        return pool, claims, nodes

    def operator(self) -> KarpenterPlan:
        pool, claims, nodes = self.observe()
        plan = plan_karpenter_pool(shape(self.desired), self.surge, pool, claims, nodes)
        chosen = set(plan.drain) | {self.claims[c][0] for c in plan.delete_claims}
        busy_chosen = any(self.nodes[n].busy for n in chosen if n in self.nodes)
        empty_kept = any(not n.busy for name, n in self.nodes.items() if name not in chosen
                         and any(c[0] == name and not c[1] for c in self.claims.values()))
        assert not (busy_chosen and empty_kept), "a busy node chosen while an empty one stays"
        self.replicas, self.limit = plan.replicas, plan.node_limit
        for name in plan.drain:
            self.nodes[name].draining = True
        for name in plan.delete_claims:
            node_name, _ = self.claims[name]
            assert not (node_name in self.nodes and self.nodes[node_name].busy), "deleted a busy node's claim"
            self.claims[name] = (node_name, True)
            self.victims.add(name)
        for name in plan.undrain:
            self.nodes[name].draining = False
        for label in plan.label:
            node = self.nodes[label.name]
            node.ordinal, node.block, node.rack = label.ordinal, label.block, label.rack
        return plan

    def counts(self) -> tuple[int, int]:
        deleting = sum(d for _, d in self.claims.values())
        return len(self.claims) - deleting, deleting

    def karpenter_provisions(self) -> None:
        active, deleting = self.counts()
        if self.replicas is None or active >= self.replicas:
            return
        for _ in range(max(0, min(self.replicas - active, self.limit - active - deleting))):
            self.made += 1
            self.claims[f"c{self.made:03d}"] = ("", False)

    def karpenter_deprovisions(self) -> None:
        active, _ = self.counts()
        assert self.replicas is None or active <= self.replicas, \
            f"Karpenter would pick {active - self.replicas} victims itself"

    def launch(self, index: int) -> None:
        pending = sorted(c for c, (n, d) in self.claims.items() if not n and not d)
        if pending:
            name = pending[index % len(pending)]
            self.claims[name] = (f"node-{name}", False)
            self.nodes[f"node-{name}"] = Node()

    def terminate(self, index: int) -> None:
        leaving = sorted(c for c, (_, d) in self.claims.items() if d)
        if leaving:
            name = leaving[index % len(leaving)]
            self.nodes.pop(self.claims.pop(name)[0], None)

    def evictions_finish(self) -> None:
        for n in self.nodes.values():
            if n.draining:
                n.busy = False

    def gang(self, index: int) -> None:
        free = sorted(name for name, n in self.nodes.items() if not n.draining and not n.busy)
        if free:
            self.nodes[free[index % len(free)]].busy = True

    def remediation_replaces(self, index: int) -> None:
        live = sorted(c for c, (n, d) in self.claims.items() if n and not d and not self.nodes[n].busy)
        if live:
            name = live[index % len(live)]
            self.claims[name] = (self.claims[name][0], True)


ACTIONS = ("operator", "provision", "deprovision", "launch", "terminate", "evict", "gang", "resize", "remediate")


@settings(max_examples=400, deadline=None)
@given(start=st.integers(0, 8), surge=st.integers(1, 3),
       steps=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 12)), max_size=80))
def test_karpenter_never_picks_a_victim_and_the_pool_converges(
        start: int, surge: int, steps: list[tuple[str, int]]) -> None:
    world = World(desired=start, surge=surge)
    for action, arg in steps:
        if action == "operator":
            world.operator()
        elif action == "provision":
            world.karpenter_provisions()
        elif action == "deprovision":
            world.karpenter_deprovisions()
        elif action == "launch":
            world.launch(arg)
        elif action == "terminate":
            world.terminate(arg)
        elif action == "evict":
            world.evictions_finish()
        elif action == "gang":
            world.gang(arg)
        elif action == "resize":
            world.desired = arg % 9
        else:
            world.remediation_replaces(arg)
    # Then the world settles: pods drain, claims launch, Karpenter finishes.
    for _ in range(12):
        world.evictions_finish()
        world.operator()
        world.karpenter_deprovisions()
        world.karpenter_provisions()
        for i in range(len(world.claims)):
            world.launch(i)
            world.terminate(0)
    world.operator()
    plan = world.operator()
    assert world.counts() == (world.desired, 0)
    assert (plan.replicas, plan.node_limit) == (world.desired, world.desired + surge)
    assert plan.drain == plan.delete_claims == plan.undrain == plan.label == ()
    ordinals = [n.ordinal for n in world.nodes.values()]
    assert len(set(ordinals)) == len(ordinals) == world.desired and min(ordinals, default=0) >= 0, \
        "every node numbered, none twice"
