"""KWOK shards: every node falls to exactly one KWOK controller."""

from __future__ import annotations

import argparse
import re

import pytest
from gpucluster import devcluster, names
from gpucluster.kube.nodes import kwok_shard_of

SET_TERM = re.compile(r"^(?P<key>\S+) (?P<op>in|notin) \((?P<values>[^)]*)\)$")


def matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes' meaning of the set-based terms the selectors use: `notin`
    also matches a node without the label."""
    if not selector:
        return True
    term = SET_TERM.match(selector)
    assert term, f"not a single set-based term: {selector!r}"
    inside = labels.get(term["key"]) in term["values"].split(",")
    return inside if term["op"] == "in" else not inside


@pytest.mark.parametrize("shards", range(1, names.KWOK_SHARD_BUCKETS + 1))
def test_each_bucket_and_unlabelled_nodes_have_exactly_one_controller(shards: int) -> None:
    selectors = devcluster.kwok_shard_selectors(shards)
    assert len(selectors) == len(devcluster.kwok_components(shards)) == shards
    nodes = [{}] + [{names.LABEL_KWOK_SHARD: str(b)} for b in range(names.KWOK_SHARD_BUCKETS)]
    owners = [[i for i, s in enumerate(selectors) if matches(s, labels)] for labels in nodes]
    assert all(len(o) == 1 for o in owners), owners
    assert owners[0] == [0]
    # Buckets are shared out evenly.
    counts = [sum(o == [i] for o in owners[1:]) for i in range(shards)]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("shards", [0, -1, names.KWOK_SHARD_BUCKETS + 1])
def test_shard_counts_outside_the_buckets_are_refused(shards: int) -> None:
    with pytest.raises(ValueError, match="kwok_shards must be from 1 to 16"):
        devcluster.kwok_shard_selectors(shards)


def test_buckets_are_stable_and_spread() -> None:
    node_names = [f"colossus-h100-{i:05d}" for i in range(16_000)]
    buckets = [kwok_shard_of(n) for n in node_names]
    assert buckets == [kwok_shard_of(n) for n in node_names]
    counts = [buckets.count(str(b)) for b in range(names.KWOK_SHARD_BUCKETS)]
    assert min(counts) > 900 and max(counts) < 1100, counts


def test_the_command_line_refuses_shard_counts_outside_the_buckets() -> None:
    assert devcluster.kwok_shard_count("4") == 4
    for text in ("0", "17", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="a whole number from 1 to 16"):
            devcluster.kwok_shard_count(text)
