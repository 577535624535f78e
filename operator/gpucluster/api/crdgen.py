"""Generates the CRD manifests in crds/ from the pydantic models: the models
are the one source of truth for the schema, CEL rules and descriptions.

    python -m gpucluster.api.crdgen            # write crds/
    python -m gpucluster.api.crdgen --check    # exit 1 when crds/ drifted
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from gpucluster import names

from . import cluster, job

CRD_DIR = Path(__file__).resolve().parents[3] / "crds"
# Keywords of JSON Schema that a Kubernetes structural schema does not take.
_DROPPED_KEYWORDS = {"title", "$defs"}


@dataclass(frozen=True)
class CRDSpec:
    model: type[BaseModel]
    kind: str
    plural: str
    short_names: list[str]
    scope: str
    printer_columns: list[dict[str, Any]] = field(default_factory=list)

    @property
    def file_name(self) -> str:
        return f"{names.GROUP}_{self.plural}.yaml"


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """Resolves $ref, folds Optional (anyOf with null) into the plain type, and
    drops keywords the API server rejects."""
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = defs[schema["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _inline(merged, defs)
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            if rest.get("default", "") is None:
                del rest["default"]
            return _inline({**options[0], **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROPPED_KEYWORDS:
            continue
        if key == "additionalProperties" and isinstance(value, bool):
            # Structural schemas prune unknown fields instead (kubectl's strict
            # field validation reports them), and keep them where
            # x-kubernetes-preserve-unknown-fields says so.
            continue
        if key == "description":
            out[key] = " ".join(value.split())
            continue
        if key in ("properties",):
            out[key] = {name: _inline(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _inline(value, defs)
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _inline(raw, raw.get("$defs", {}))
    schema["properties"] = {
        "apiVersion": {"type": "string", "description": "API version of this object."},
        "kind": {"type": "string", "description": "Kind of this object."},
        "metadata": {"type": "object"},
        **schema["properties"],
    }
    schema.pop("additionalProperties", None)
    return schema


def crd_manifest(crd: CRDSpec) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{crd.plural}.{names.GROUP}"},
        "spec": {
            "group": names.GROUP,
            "scope": crd.scope,
            "names": {
                "kind": crd.kind,
                "listKind": f"{crd.kind}List",
                "plural": crd.plural,
                "singular": crd.kind.lower(),
                "shortNames": crd.short_names,
                "categories": ["gpucluster"],
            },
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": crd.printer_columns,
                    "schema": {"openAPIV3Schema": openapi_schema(crd.model)},
                }
            ],
        },
    }


CRDS = [
    CRDSpec(
        model=cluster.TrainingCluster,
        kind=cluster.KIND,
        plural=cluster.PLURAL,
        short_names=["tc"],
        scope="Cluster",
        printer_columns=[
            {"name": "Pools", "type": "string", "jsonPath": ".status.poolNames"},
            {"name": "Nodes", "type": "string", "jsonPath": ".status.nodes",
             "description": "Ready/desired nodes"},
            {"name": "GPUs", "type": "integer", "jsonPath": ".status.readyGPUs",
             "description": "GPUs on ready nodes"},
            {"name": "Healthy", "type": "integer", "jsonPath": ".status.healthyGPUs",
             "description": "GPUs on healthy nodes", "priority": 1},
            {"name": "Provisioning", "type": "string", "jsonPath": ".status.provisioning",
             "description": "karpenter pools' NodeClaims by launch stage"},
            {"name": "Ready", "type": "string",
             "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    ),
    CRDSpec(
        model=job.TrainingJob,
        kind=job.KIND,
        plural=job.PLURAL,
        short_names=["tj"],
        scope="Namespaced",
        printer_columns=[
            {"name": "Cluster", "type": "string", "jsonPath": ".spec.cluster"},
            {"name": "Pool", "type": "string", "jsonPath": ".status.pool"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Workers", "type": "string", "jsonPath": ".status.workersReady",
             "description": "Running/total workers"},
            {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus"},
            {"name": "Queue", "type": "integer", "jsonPath": ".status.queuePosition",
             "description": "Position among waiting jobs"},
            {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
            {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
            {"name": "Starts By", "type": "string", "jsonPath": ".status.startsBy", "priority": 1,
             "description": "The head's latest start, from run-time limits"},
            {"name": "Nodes", "type": "string", "jsonPath": ".status.nodeList", "priority": 1,
             "description": "The gang's nodes in hostlist notation"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    ),
]


def render(crd: CRDSpec) -> str:
    header = "# Generated by `python -m gpucluster.api.crdgen` from operator/gpucluster/api/. Do not edit.\n"
    return header + yaml.safe_dump(crd_manifest(crd), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if crds/ differs from the models")
    parser.add_argument("--out", type=Path, default=CRD_DIR)
    args = parser.parse_args(argv)
    drifted = []
    for crd in CRDS:
        path = args.out / crd.file_name
        text = render(crd)
        if args.check:
            if not path.exists() or path.read_text() != text:
                drifted.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if drifted:
        print("CRDs drifted from the models; run `python -m gpucluster.api.crdgen`: "
              + ", ".join(drifted), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
