"""Site worker: Celery tasks on queue ``site.<id>`` that only wire SiteService.

Runs with the solo pool (nnU-Net starts its own processes; prefork children are
daemonic and cannot) and the spawn start method (fork-based pools inside
nnU-Net would inherit Celery's signal handlers and hang).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

from celery import Celery
from celery.signals import worker_ready
from celery.worker.request import Request
from pydantic import ValidationError

from fednnunet.adapters.broker import (
    REPORT_TASK,
    RESULTS_EXCHANGE,
    SITE_TASKS,
    ProgressPublisher,
    broker_user,
    coordinator_queue,
    make_celery,
)
from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.errors import FedError
from fednnunet.keys import COORDINATOR_QUEUE
from fednnunet.messages import SiteReport, SiteTask
from fednnunet.nnunet.backend import load_backend
from fednnunet.phases import Phase
from fednnunet.settings import Settings
from fednnunet.site.service import SiteService

log = logging.getLogger(__name__)


class AckOnReceipt(Request):
    """Acknowledge a site task before it runs, for real.

    Celery's ``acks_late=False`` only *schedules* the ack on the worker's event loop,
    which the solo pool blocks until the task returns: a training round stayed
    unacked for its whole duration, so RabbitMQ's consumer_timeout killed the
    channel and redelivered it, and a SIGKILLed worker's task came back too.
    Writing the ack frame here (same thread as the event loop) sends it at once.
    """

    def acknowledge(self) -> None:
        if not self.acknowledged:
            self.message.ack_log_error(log, self._connection_errors)
            self.acknowledged = True


def send_report(app: Celery, report: SiteReport, user_id: str) -> None:
    # Explicit exchange: a site may not publish to the default exchange (it could reach
    # any queue by name). user_id: the coordinator believes only the broker-validated
    # sender, so the report must say who we are (RabbitMQ checks it).
    app.send_task(
        REPORT_TASK,
        args=[report.model_dump(mode="json")],
        queue=coordinator_queue(no_declare=True),
        exchange=RESULTS_EXCHANGE.name,
        routing_key=COORDINATOR_QUEUE,
        user_id=user_id,
    )


def validated_task(payload: object, phase: Phase, settings: Settings) -> SiteTask | SiteReport:
    """The task, or (when it fails validation) a non-retryable refusal to send back.

    A site checks what the coordinator asks before running it: names that become paths
    are plain names, counts are bounded. A refusal names the experiment only when that
    part of the task was valid (the report would be ignored otherwise).
    """
    try:
        return SiteTask.model_validate(payload)
    except ValidationError as err:
        raw = payload if isinstance(payload, dict) else {}
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors()[:5]
        )
        try:
            return SiteReport(
                experiment_id=str(raw.get("experiment_id", "")),
                site_id=str(settings.site_id),
                phase=phase,
                round=int(raw.get("round", 0)),
                attempt=int(raw.get("attempt", 1)),
                ok=False,
                retryable=False,
                error=f"task refused by the site: {problems}",
            )
        except (ValidationError, TypeError, ValueError):
            log.error("unanswerable task refused: %s", problems)
            raise FedError(f"task refused: {problems}") from None


def default_egress_log(settings: Settings) -> Path:
    """Where hospital IT audits what left the site: one JSON line per uploaded object."""
    if settings.egress_log:
        return Path(settings.egress_log)
    base = os.environ.get("nnUNet_results") or str(Path.home())
    return Path(base) / f"fednnunet_egress_{settings.site_id}.jsonl"


def default_cache_dir(settings: Settings) -> Path:
    """Verified copies of the global weights this site loaded (one per experiment), so a
    restarted or redelivered task never downloads them again."""
    base = os.environ.get("nnUNet_results") or str(Path.home() / ".cache")
    return Path(base) / ".fednnunet_cache" / str(settings.site_id)


def build_site_app(settings: Settings, service: SiteService | None = None) -> Celery:
    """The Celery app of one site; ``service`` may be injected (tests, benchmarks)."""
    app = make_celery(settings, "site", settings.site_id)
    user = broker_user(settings)
    backend = service.backend if service is not None else load_backend(settings)
    state: dict[str, SiteService] = {}

    def get_service() -> SiteService:
        if "svc" not in state:
            state["svc"] = service or SiteService(
                settings,
                ArtifactStore(
                    settings,
                    egress_log=str(default_egress_log(settings)),
                    cache_dir=default_cache_dir(settings),
                ),
                progress=ProgressPublisher(settings, settings.site_id or "?"),
                backend=backend,
            )
        return state["svc"]

    def start_heartbeats(**_: object) -> None:
        # Warm up (import nnU-Net) before the first idle beat, so that "ready" (to a
        # watcher of beats) means warm; then idle beats from the start: a task lost
        # before its first heartbeat is re-sent.
        backend.warm_up()
        get_service()

    worker_ready.connect(start_heartbeats, weak=False)

    def make_task(phase: Phase, name: str) -> None:
        @app.task(name=name, acks_late=False, ignore_result=True, Request=AckOnReceipt)
        def _task(payload: dict) -> None:  # noqa: ARG001 - one closure per phase
            task = validated_task(payload, phase, settings)
            if isinstance(task, SiteReport):  # refused before anything ran
                send_report(app, task, user)
                return
            log.info(
                "site %s: %s round %s of %s (attempt %s)",
                task.site_id,
                task.phase,
                task.round,
                task.experiment_id,
                task.attempt,
            )
            service = get_service()
            report = service.handle(task, defer_writes=True)
            send_report(app, report, user)
            service.run_deferred()  # before the next task: the checkpoint, the record

    for phase, name in SITE_TASKS.items():
        make_task(phase, name)
    return app


def worker_argv(settings: Settings, loglevel: str = "INFO") -> list[str]:
    return [
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "--queues",
        f"site.{settings.site_id}",
        "--hostname",
        f"site-{settings.site_id}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel",
        loglevel,
    ]


def run_site_worker(settings: Settings, loglevel: str = "INFO") -> None:
    multiprocessing.set_start_method("spawn", force=True)
    app = build_site_app(settings)
    app.worker_main(worker_argv(settings, loglevel))
