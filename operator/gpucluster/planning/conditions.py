"""Kubernetes-style status conditions, merged so that lastTransitionTime
moves only when a condition's status does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConditionUpdate:
    type: str
    status: bool
    reason: str
    message: str = ""


def _status_word(status: bool) -> str:
    return "True" if status else "False"


def merge_conditions(
    previous: Sequence[Mapping[str, Any]],
    updates: Sequence[ConditionUpdate],
    now: str,
    generation: int,
) -> list[dict[str, Any]]:
    """Conditions after `updates`, in the order of `updates`, then any
    previous ones not updated. A condition whose status is unchanged keeps
    its lastTransitionTime."""
    by_type = {c["type"]: c for c in previous}
    merged: list[dict[str, Any]] = []
    for update in updates:
        old = by_type.pop(update.type, None)
        status = _status_word(update.status)
        changed = old is None or old.get("status") != status
        merged.append({
            "type": update.type,
            "status": status,
            "reason": update.reason,
            "message": update.message,
            "lastTransitionTime": now if changed or old is None
            else old.get("lastTransitionTime", now),
            "observedGeneration": generation,
        })
    merged.extend(dict(c) for c in by_type.values())
    return merged
