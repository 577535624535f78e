"""crds/ is generated from the models: drift fails, and every field is documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from gpucluster.api import cluster, crdgen

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_committed_crds_match_the_models(tmp_path: Path) -> None:
    for crd in crdgen.CRDS:
        committed = (crdgen.CRD_DIR / crd.file_name).read_text()
        assert committed == crdgen.render(crd), (
            f"{crd.file_name} drifted from the models; run `python -m gpucluster.api.crdgen`")
    assert crdgen.main(["--check"]) == 0


def _undocumented(schema: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, sub in (schema.get("properties") or {}).items():
        here = f"{path}.{name}"
        if name not in ("apiVersion", "kind", "metadata") and not sub.get("description"):
            missing.append(here)
        missing += _undocumented(sub, here)
        if sub.get("type") == "array":
            missing += _undocumented(sub.get("items", {}), f"{here}[]")
    return missing


@pytest.mark.parametrize("crd", crdgen.CRDS, ids=lambda c: c.kind)
def test_every_field_has_a_description(crd: crdgen.CRDSpec) -> None:
    schema = crdgen.openapi_schema(crd.model)
    assert _undocumented(schema["properties"]["spec"], "spec") == []


def _loose_any_of(schema: Any, path: str) -> list[str]:
    """anyOf is structural only as Kubernetes' int-or-string."""
    if isinstance(schema, list):
        return [bad for i, item in enumerate(schema) for bad in _loose_any_of(item, f"{path}[{i}]")]
    if not isinstance(schema, dict):
        return []
    bad = [path] if "anyOf" in schema and not schema.get("x-kubernetes-int-or-string") else []
    return bad + [b for key, value in schema.items() for b in _loose_any_of(value, f"{path}.{key}")]


@pytest.mark.parametrize("crd", crdgen.CRDS, ids=lambda c: c.kind)
def test_schema_is_structural(crd: crdgen.CRDSpec) -> None:
    manifest = crdgen.crd_manifest(crd)
    text = yaml.safe_dump(manifest)
    for forbidden in ("$ref", "$defs", "title:", "additionalProperties: false", "additionalProperties: true"):
        assert forbidden not in text
    assert _loose_any_of(manifest, "crd") == []


def test_examples_parse_with_the_models() -> None:
    doc = yaml.safe_load((EXAMPLES / "colossus.yaml").read_text())
    parsed = cluster.TrainingCluster.model_validate({"spec": doc["spec"]})
    assert [p.name for p in parsed.spec.pools] == ["h100", "h200"]
    assert parsed.spec.pools[1].gpusPerNode == 8
