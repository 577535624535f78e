"""The Dockerfile, without a Docker engine (none on these machines): hadolint
passes it, and it builds the image the Helm chart expects. hack/kind-e2e.sh
builds and runs it where Docker is."""

from __future__ import annotations

import argparse
import fnmatch
import re
import tomllib
from pathlib import Path

import yaml

from .tools import REPO_ROOT, hadolint, run

DOCKERFILE = REPO_ROOT / "Dockerfile"
CHART = REPO_ROOT / "helm" / "gpucluster"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.MULTILINE)
            if not m.group(0).lstrip().startswith("#")]


def test_hadolint_passes() -> None:
    # Any finding, down to style, fails: the few deliberate exceptions are
    # `# hadolint ignore=` comments in the Dockerfile, each with its reason.
    result = run(hadolint(), "--failure-threshold=style", str(DOCKERFILE), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_stages_on_python_311_slim() -> None:
    steps = instructions()
    base = next(args for kind, args in steps if kind == "ARG" and args.startswith("PYTHON_IMAGE="))
    assert base == "PYTHON_IMAGE=python:3.11-slim"
    stages = [args for kind, args in steps if kind == "FROM"]
    assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    build = " ".join(args for kind, args in steps if kind == "RUN")
    assert 'pip wheel --no-cache-dir --wheel-dir /wheels ".[nvml]"' in build
    assert '--no-index --find-links=/wheels "gpucluster[nvml]"' in build


def test_runs_as_the_chart_non_root_user_with_the_gpucluster_entrypoint() -> None:
    steps = instructions()
    final = steps[max(i for i, (kind, _) in enumerate(steps) if kind == "FROM"):]
    user = [args for kind, args in final if kind == "USER"]
    assert user == ["10001:10001"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for component in ("operator", "agent"):
        assert values[component]["podSecurityContext"]["runAsUser"] == 10001
    assert [args for kind, args in final if kind == "ENTRYPOINT"] == ['["gpucluster"]']


def test_oci_labels() -> None:
    labels = " ".join(args for kind, args in instructions() if kind == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def chart_commands() -> dict[str, str]:
    """The `gpucluster` subcommand each of the chart's workloads runs."""
    found = {}
    for path in (CHART / "templates").glob("*.yaml"):
        match = re.search(r"^\s*args:\s*\n\s*- ([a-z-]+)\s*$", path.read_text(), re.MULTILINE)
        if match:
            found[path.name] = match.group(1)
    return found


def test_the_image_runs_every_command_the_chart_gives_it() -> None:
    from gpucluster.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = chart_commands()
    assert set(commands.values()) == {"run", "agent", "device-plugin"}
    assert set(commands.values()) <= set(subparsers.choices)


def package_data_globs() -> list[str]:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return list(pyproject["tool"]["setuptools"]["package-data"]["gpucluster"])


def test_the_wheel_carries_every_data_file_the_package_reads() -> None:
    # The image installs the wheel: a file left out of package-data (the GPU
    # profiles once were) is missing there, not in the editable install.
    package = REPO_ROOT / "operator" / "gpucluster"
    data = [p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and p.suffix not in {".py", ".pyc", ".pyi"} and "__pycache__" not in p.parts]
    globs = package_data_globs()
    assert [f for f in data if not any(fnmatch.fnmatch(f, g) for g in globs)] == []


def test_dockerignore_lets_in_what_the_build_copies() -> None:
    copied = [args.split()[0] for kind, args in instructions() if kind == "COPY" and "--from" not in args]
    allowed = [line[1:].rstrip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for source in copied:
        assert source.rstrip("/") in allowed, source
    assert Path(REPO_ROOT / "pyproject.toml").exists()
