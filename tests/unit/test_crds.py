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


def test_schema_is_structural() -> None:
    text = yaml.safe_dump(crdgen.crd_manifest(crdgen.CRDS[0]))
    for forbidden in ("$ref", "$defs", "anyOf", "title:", "additionalProperties: false"):
        assert forbidden not in text


def test_examples_parse_with_the_models() -> None:
    doc = yaml.safe_load((EXAMPLES / "colossus.yaml").read_text())
    parsed = cluster.TrainingCluster.model_validate({"spec": doc["spec"]})
    assert [p.name for p in parsed.spec.pools] == ["h100", "h200"]
    assert parsed.spec.pools[1].gpusPerNode == 8
