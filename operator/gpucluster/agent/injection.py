"""The fault-injection annotation: how tests, benches and people give a fake
node's GPUs a fault with kubectl.

    kubectl annotate node NODE gpucluster.dev/inject-fault='gpu=3,xid=79'
    kubectl annotate node NODE gpucluster.dev/inject-fault='gpu=0,fault=overtemp;gpu=5,xid=94'
    kubectl annotate node NODE gpucluster.dev/inject-fault-      # clears transient faults

Syntax: entries separated by `;`, each a comma-separated set of `key=value`:

    gpu=<index>|all       which GPU (required)
    xid=<number>          the GPU reports this XID
    fault=<name>          or one of the named faults:
        dbe                 a double-bit ECC error (counts in the ECC counters, raises XID 48)
        row-remap-failure   row remapping failed (raises XID 64)
        overtemp            over its slowdown temperature, clocks thermally slowed
        gone                the driver no longer lists the GPU
        reset               a GPU reset: clears every fault of the GPU, fatal ones too

Exactly one of `xid` and `fault` per entry. Whitespace is ignored.

The annotation states which faults are injected now. A transient fault lasts
while its entry is there; a fatal one (per planning.health: dbe,
row-remap-failure, gone and the fatal XIDs) stays after the entry goes, as on
a real board, until a `reset` entry or until the node is recreated.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpucluster.names import ANNOTATION_INJECT_FAULT

# Belongs in names.py with the other annotations (owned elsewhere); kept here
# until it moves there.


class FaultKind(enum.Enum):
    XID = "xid"
    DOUBLE_BIT_ECC = "dbe"
    ROW_REMAP_FAILURE = "row-remap-failure"
    OVER_TEMPERATURE = "overtemp"
    GONE = "gone"
    RESET = "reset"


@dataclass(frozen=True)
class Injection:
    gpu: int | None  # None: every GPU of the node
    kind: FaultKind
    xid: int = 0  # only for FaultKind.XID

    def __str__(self) -> str:
        target = "all" if self.gpu is None else str(self.gpu)
        what = f"xid={self.xid}" if self.kind is FaultKind.XID else f"fault={self.kind.value}"
        return f"gpu={target},{what}"


class InjectionSyntaxError(ValueError):
    pass


def parse_injections(text: str) -> tuple[Injection, ...]:
    """The injections an annotation value asks for, in order; "" asks for none."""
    return tuple(_parse_entry(entry) for entry in text.split(";") if entry.strip())


def injection_annotation(node: Mapping[str, Any]) -> str:
    """A Node's fault-injection annotation, "" when it has none."""
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(ANNOTATION_INJECT_FAULT, ""))


def format_injections(injections: tuple[Injection, ...]) -> str:
    return ";".join(str(injection) for injection in injections)


def _parse_entry(entry: str) -> Injection:
    fields: dict[str, str] = {}
    for pair in entry.split(","):
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not key or not value:
            raise InjectionSyntaxError(f"{entry.strip()!r}: expected key=value, got {pair!r}")
        if key in fields:
            raise InjectionSyntaxError(f"{entry.strip()!r}: {key} given twice")
        fields[key] = value
    unknown = set(fields) - {"gpu", "xid", "fault"}
    if unknown:
        raise InjectionSyntaxError(f"{entry.strip()!r}: unknown keys {sorted(unknown)}")
    if "gpu" not in fields:
        raise InjectionSyntaxError(f"{entry.strip()!r}: gpu=<index>|all is required")
    if ("xid" in fields) == ("fault" in fields):
        raise InjectionSyntaxError(f"{entry.strip()!r}: give exactly one of xid= and fault=")
    gpu = None if fields["gpu"] == "all" else _number(entry, "gpu", fields["gpu"], minimum=0)
    if "xid" in fields:
        return Injection(gpu, FaultKind.XID, _number(entry, "xid", fields["xid"], minimum=1))
    try:
        kind = FaultKind(fields["fault"])
    except ValueError:
        names = ", ".join(kind.value for kind in FaultKind if kind is not FaultKind.XID)
        raise InjectionSyntaxError(
            f"{entry.strip()!r}: unknown fault {fields['fault']!r}; known: {names}"
        ) from None
    if kind is FaultKind.XID:
        raise InjectionSyntaxError(f"{entry.strip()!r}: write xid=<number>, not fault=xid")
    return Injection(gpu, kind)


def _number(entry: str, key: str, value: str, minimum: int) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < minimum:
        raise InjectionSyntaxError(
            f"{entry.strip()!r}: {key} must be a whole number >= {minimum}, got {value!r}"
        )
    return int(value)
