"""planning.hostlist: Slurm's notation, checked by expanding it back."""

from __future__ import annotations

import re

from gpucluster.planning.hostlist import hostlist
from hypothesis import given
from hypothesis import strategies as st


def expand(text: str) -> set[str]:
    names: set[str] = set()
    for part in re.findall(r"[^,\[]+\[[^\]]*\]|[^,]+", text):
        bracketed = re.fullmatch(r"(.*)\[(.*)\]", part)
        if bracketed is None:
            names.add(part)
            continue
        prefix, ranges = bracketed.groups()
        for run in ranges.split(","):
            first, _, last = run.partition("-")
            width = len(first)
            names.update(f"{prefix}{n:0{width}d}" for n in range(int(first), int(last or first) + 1))
    return names


def test_examples() -> None:
    assert hostlist(["h100-0003", "h100-0001", "h100-0002", "h100-0000", "h100-0007"]) == "h100-[0000-0003,0007]"
    assert hostlist(["h100-0001", "h100-0001"]) == "h100-0001"
    assert hostlist(["b-1", "a-01", "a-02", "gpu"]) == "gpu,a-[01-02],b-1"
    assert hostlist([]) == ""


@given(st.lists(st.tuples(st.sampled_from(["jobs-h100-", "jobs-h200-", "n"]), st.integers(0, 60)), max_size=40))
def test_expands_back_to_the_same_names(nodes: list[tuple[str, int]]) -> None:
    names = {f"{prefix}{number:04d}" for prefix, number in nodes}
    assert expand(hostlist(names)) == names
