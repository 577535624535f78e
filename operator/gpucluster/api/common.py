"""Pieces shared by every gpucluster resource."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class CamelModel(BaseModel):
    """Field names are the camelCase Kubernetes spells; unknown fields are an
    error, so a typo in a manifest is caught, not silently dropped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Condition(CamelModel):
    type: str = Field(description="Condition type, e.g. Ready, Progressing, Degraded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word saying why the condition is as it is.")
    message: str = Field(default="", description="What happened, for a person to read.")
    lastTransitionTime: str = Field(description="When status last changed (RFC 3339).")
    observedGeneration: int = Field(
        default=0, description="The metadata.generation of the spec this condition was set for."
    )


class Taint(CamelModel):
    key: str = Field(description="Taint key, e.g. dedicated.", min_length=1, max_length=253)
    value: str = Field(default="", description="Taint value.", max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        description="What the taint does to pods that do not tolerate it."
    )
