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
# The exit status of a replica that peering paused after it led (EX_TEMPFAIL):
# nothing failed, and it is to be started again, as a standby.
EXIT_LEAD_LOST = 75


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


def add_parser(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run the operator (Kopf) against the current cluster")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="serve TrainingJobs only in these namespaces (globs allowed; "
                            "repeatable); TrainingClusters are cluster-scoped and always served")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="serve TrainingJobs in every namespace (the default)")
    run.add_argument("--log-format", choices=sorted(LOG_FORMATS), default="full")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.add_argument("--metrics-port", type=int, default=8080,
                     help="Prometheus /metrics port, 0 to disable (default: %(default)s)")
    run.add_argument("--liveness-port", type=int, default=8081,
                     help="liveness probe port serving /healthz (default: %(default)s)")
    run.add_argument("--peering", default=None,
                     help="Kopf peering name: replicas sharing it elect one active operator")
    run.add_argument("--priority", type=int, default=None,
                     help="Kopf peering priority: the highest of the replicas alive is active, the "
                          "others wait. Default: minus the start time in milliseconds, so the oldest "
                          "replica leads and a new one never pauses a live leader (it stands by until "
                          "the leader exits or dies), replicas never tie (Kopf pauses every replica of "
                          "a tie), and any explicit priority >= 0 outranks them all")
    run.add_argument("--peering-lifetime", type=int, default=6, metavar="SECONDS",
                     help="how long a replica's keep-alive in the peering object counts: a standby "
                          "takes over between min(lifetime-1, 5) and lifetime seconds after the active "
                          "replica dies. Kopf renews it every max(1, lifetime - 5..10) s, so below 11 s "
                          "each replica patches the peering object every 1-5 s (default: %(default)s, "
                          "once a second)")
    run.set_defaults(func=run_operator)


def peering_settings(lifetime: int) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.peering.lifetime = lifetime
    # One keep-alive a second would otherwise be a debug line a second.
    settings.peering.stealth = True
    return settings


def run_operator(args: argparse.Namespace) -> int:
    # Imported for their decorators: this registers every handler and index.
    from gpucluster import handlers  # noqa: F401
    from gpucluster.handlers.state import OperatorState
    from gpucluster.kube import client

    state = OperatorState(served_namespaces=tuple(args.namespace))
    # The client's API classes build a validator per method when first made:
    # a second of CPU, paid here rather than by a standby as it takes over.
    client.core()
    client.custom()

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
        priority=args.priority if args.priority is not None else -(time.time_ns() // 1_000_000),
        settings=peering_settings(args.peering_lifetime),
        memo=kopf.Memo(state=state),
        stop_flag=state.lead_lost,
    ))
    return EXIT_LEAD_LOST if state.lead_lost.is_set() else 0
