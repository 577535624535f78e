"""Kubernetes timestamps (RFC 3339, UTC, whole seconds) to and from epoch seconds."""

from __future__ import annotations

import datetime
import time


def rfc3339(epoch: float | None = None) -> str:
    """The timestamp of `epoch`, or of now."""
    moment = time.time() if epoch is None else epoch
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(timestamp: str) -> float:
    return datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
