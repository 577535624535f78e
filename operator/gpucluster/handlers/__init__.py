"""Kopf handlers; importing this package registers all of them."""

from . import cluster, indexes, jobs, karpenter, remediation, state  # noqa: F401
