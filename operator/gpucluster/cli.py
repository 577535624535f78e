"""The `gpucluster` command."""

from __future__ import annotations

import argparse
import sys

from gpucluster import __version__, plan_cli, runner
from gpucluster.agent import cli as agent_cli
from gpucluster.sim import cli as sim_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpucluster",
        description="Operator, node agent and tools for NVIDIA H100/H200 training clusters.",
    )
    parser.add_argument("--version", action="version", version=f"gpucluster {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    runner.add_parser(sub)
    agent_cli.add_agent_parser(sub)
    agent_cli.add_device_plugin_parser(sub)
    sim_cli.add_parser(sub)
    plan_cli.add_parser(sub)
    dev = sub.add_parser("dev-cluster", help="the local control plane with KWOK GPU nodes",
                         add_help=False)
    dev.set_defaults(func=None)
    crds = sub.add_parser("crds", help="write (or --check) crds/ from the API models",
                          add_help=False)
    crds.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # These two hand their arguments on whole to their own parsers.
    if argv[:1] == ["dev-cluster"]:
        from gpucluster import devcluster
        return devcluster.main(argv[1:])
    if argv[:1] == ["crds"]:
        from gpucluster.api import crdgen
        return crdgen.main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
