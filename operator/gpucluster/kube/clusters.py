"""TrainingCluster objects as the handlers read them."""

from __future__ import annotations

from typing import Any

import kubernetes

from gpucluster import names
from gpucluster.api import cluster as api

from .client import call, custom, status_of


async def read_cluster(name: str) -> Any:
    """The TrainingCluster as the API server has it now, or None once gone."""
    try:
        return await call(custom().get_cluster_custom_object, names.GROUP, names.VERSION, api.PLURAL, name)
    except kubernetes.client.ApiException as err:
        if status_of(err) == 404:
            return None
        raise
