"""Pieces shared by every gpucluster resource."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# Kubernetes' label syntax (IsQualifiedName, IsValidLabelValue) for CEL's
# matches, spelt so that a CEL string literal needs no escapes: "[.]", not "\.".
MAX_PREFIX = 253
MAX_NAME = 63
MAX_QUALIFIED_NAME = MAX_PREFIX + 1 + MAX_NAME
_NAME = f"[A-Za-z0-9]([-A-Za-z0-9_.]{{0,{MAX_NAME - 2}}}[A-Za-z0-9])?"
_DNS_SUBDOMAIN = "[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
DNS_SUBDOMAIN_PATTERN = f"^{_DNS_SUBDOMAIN}$"
# A label value that is not empty (an instance type name, say).
NONEMPTY_LABEL_VALUE_PATTERN = f"^{_NAME}$"
QUALIFIED_NAME_FIX = (
    f"use an optional DNS-subdomain prefix of at most {MAX_PREFIX} characters and '/', then a name of at "
    f"most {MAX_NAME} characters: letters, digits, '-', '_' or '.', beginning and ending with a letter or "
    "digit (e.g. example.com/team)")
LABEL_VALUE_FIX = (f"use at most {MAX_NAME} characters: letters, digits, '-', '_' or '.', beginning and "
                   "ending with a letter or digit, or leave it empty")


def qualified_name_rule(var: str) -> str:
    """CEL: `var` is a qualified name (a label or taint key). The size test
    comes first, so that a huge string is refused before the regex runs."""
    return (f"{var}.size() <= {MAX_QUALIFIED_NAME} && {var}.matches('^({_DNS_SUBDOMAIN}/)?{_NAME}$') "
            f"&& {var}.indexOf('/') <= {MAX_PREFIX}")


def cel_quoted(cel: str) -> str:
    """CEL that renders the string `cel` in double quotes, as Kubernetes shows values."""
    return f"'\"' + {cel} + '\"'"


def label_keys_validation() -> JsonDict:
    """x-kubernetes-validations of a map of labels: every key is a qualified
    name. A map's keys take no schema of their own, so this is CEL on the map.
    The message names the first key at fault: the API server's cost estimate
    refuses a join of them all."""
    rule = qualified_name_rule("k")
    return {"x-kubernetes-validations": [{
        "rule": f"self.all(k, {rule})",
        "message": f"every key must be a qualified name: {QUALIFIED_NAME_FIX}",
        "messageExpression": f"'key ' + {cel_quoted(f'self.filter(k, !({rule}))[0]')} "
                             f"+ \" is not a qualified name: {QUALIFIED_NAME_FIX}\"",
    }]}


# A label value (and a taint value): the pattern's message would show only
# the regex, so CEL says what to write instead.
LabelValue = Annotated[str, Field(max_length=MAX_NAME, json_schema_extra={"x-kubernetes-validations": [{
    "rule": f"self.matches('^({_NAME})?$')",
    "message": f"not a label value: {LABEL_VALUE_FIX}",
    "messageExpression": f"{cel_quoted('self')} + \" is not a label value: {LABEL_VALUE_FIX}\"",
}]})]


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
    key: str = Field(
        description="Taint key, a qualified name, e.g. dedicated or example.com/dedicated.",
        min_length=1, max_length=MAX_QUALIFIED_NAME,
        json_schema_extra={"x-kubernetes-validations": [{
            "rule": qualified_name_rule("self"),
            "message": f"not a qualified name: {QUALIFIED_NAME_FIX}",
            "messageExpression": f"{cel_quoted('self')} + \" is not a qualified name: {QUALIFIED_NAME_FIX}\"",
        }]})
    value: LabelValue = Field(default="", description="Taint value, a label value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        description="What the taint does to pods that do not tolerate it."
    )
