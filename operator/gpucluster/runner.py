"""`gpucluster run`: the operator process, Kopf underneath."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

import kopf
import prometheus_client

from gpucluster import names

LOG_FORMATS = {"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL,
               "json": kopf.LogFormat.JSON}


class _QuietTimers(logging.Filter):
    """The admission and resync timers succeed every second or so; logging
    each success would bury everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Timer ") and message.endswith(" succeeded."))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress and diff-base live in annotations of our own prefix, so the
    # generated status schema never has to carry Kopf's bookkeeping.
    settings.persistence.finalizer = names.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.GROUP, key="last-handled-configuration")
    # Our handlers post their own Events (Normal and Warning); Kopf's log
    # lines stay in the log (posting.loggers is off by default).
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 32


@kopf.on.probe(id="indexes")
def indexes_ready(**_: Any) -> bool:
    return True


def add_parser(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run the operator (Kopf) against the current cluster")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="serve TrainingJobs only in these namespaces (globs allowed; "
                            "repeatable); TrainingClusters are cluster-scoped and always served")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="serve TrainingJobs in every namespace (the default)")
    run.add_argument("--log-format", choices=sorted(LOG_FORMATS), default="plain")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.add_argument("--metrics-port", type=int, default=8080,
                     help="Prometheus /metrics port, 0 to disable (default: %(default)s)")
    run.add_argument("--liveness-port", type=int, default=8081,
                     help="liveness probe port serving /healthz (default: %(default)s)")
    run.add_argument("--peering", default=None,
                     help="Kopf peering name: replicas sharing it elect one active operator")
    run.add_argument("--priority", type=int, default=None,
                     help="Kopf peering priority: the highest of the replicas alive is active, the "
                          "others wait. Default: the start time in milliseconds, so the newest replica "
                          "leads (a rolling update hands over to the new version) and replicas never tie "
                          "(Kopf pauses every replica of a tie)")
    run.set_defaults(func=run_operator)


def run_operator(args: argparse.Namespace) -> int:
    # Imported for their decorators: this registers every handler and index.
    from gpucluster import handlers  # noqa: F401
    from gpucluster.handlers.state import OperatorState

    kopf.configure(verbose=args.verbose, log_format=LOG_FORMATS[args.log_format])
    logging.getLogger("kopf.objects").addFilter(_QuietTimers())
    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    asyncio.run(kopf.operator(
        clusterwide=True,
        liveness_endpoint=liveness,
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority if args.priority is not None else time.time_ns() // 1_000_000,
        memo=kopf.Memo(state=OperatorState(served_namespaces=tuple(args.namespace))),
    ))
    return 0
