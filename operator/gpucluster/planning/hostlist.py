"""Node names in Slurm's hostlist notation, as HPC people read them:
`h100-[0000-0003,0007],h200-0001`. A gang's nodes are mostly consecutive, so
`kubectl get tj -o wide` stays one short column whatever the gang's size."""

from __future__ import annotations

import re
from collections.abc import Iterable

_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def hostlist(names: Iterable[str]) -> str:
    """The distinct names, grouped by prefix and number width, with runs of
    consecutive numbers as ranges."""
    groups: dict[tuple[str, int], list[int]] = {}
    plain: list[str] = []
    for name in sorted(set(names)):
        numbered = _NUMBERED.match(name)
        if numbered is None:
            plain.append(name)
        else:
            prefix, digits = numbered.groups()
            groups.setdefault((prefix, len(digits)), []).append(int(digits))
    parts = list(plain)
    for (prefix, width), numbers in sorted(groups.items()):
        numbers.sort()
        runs: list[str] = []
        start = previous = numbers[0]
        for number in [*numbers[1:], None]:
            if number is not None and number == previous + 1:
                previous = number
                continue
            runs.append(f"{start:0{width}d}" if start == previous else f"{start:0{width}d}-{previous:0{width}d}")
            if number is not None:
                start = previous = number
        single = len(numbers) == 1
        parts.append(f"{prefix}{runs[0]}" if single else f"{prefix}[{','.join(runs)}]")
    return ",".join(parts)
