"""Coordinator process: a Celery worker on queue ``coordinator`` plus a ticker and
a progress consumer, all wiring :class:`fednnunet.coordinator.service.Coordinator`."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from celery import Celery

from fednnunet.adapters.broker import (
    CANCEL_TASK,
    CONTROL,
    REPORT_TASK,
    SITE_TASKS,
    START_TASK,
    ProgressConsumer,
    declare_topology,
    make_celery,
    message_sender,
    site_task_queue,
)
from fednnunet.adapters.redis_state import RedisState
from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.coordinator.service import Coordinator
from fednnunet.errors import FedError
from fednnunet.keys import CONTROL_QUEUE, COORDINATOR_QUEUE
from fednnunet.messages import SiteReport, SiteTask
from fednnunet.settings import Settings
from fednnunet.spec import parse_spec

log = logging.getLogger(__name__)
REPORT_THREADS = 4


class TaskSender:
    """Publishes site tasks; declares a site's queue before its first task."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self._declared: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, task: SiteTask) -> None:
        with self._lock:
            if task.site_id not in self._declared:
                declare_topology(self.settings, [task.site_id])
                self._declared.add(task.site_id)
            self.app.send_task(
                SITE_TASKS[task.phase],
                args=[task.model_dump(mode="json")],
                queue=site_task_queue(task.site_id),
            )


def build_coordinator(
    settings: Settings, cache_dir: Path | None = None
) -> tuple[Celery, Coordinator]:
    app = make_celery(settings, "coordinator")
    cache = cache_dir or Path.home() / ".cache" / "fednnunet" / "coordinator"
    coordinator = Coordinator(
        settings,
        RedisState.from_settings(settings),
        ArtifactStore(settings, cache_dir=cache),
        TaskSender(app, settings),
        render_plots=settings.plots,
        plot_every_s=settings.plot_every_s,
    )

    # Every handler takes the sender from the broker-validated AMQP user_id ("" when the
    # message has none, which nothing trusts); a message that fails validation is
    # refused and counted, never retried (acks_late redelivers only on worker loss).
    def sender_of(task) -> str:  # noqa: ANN001 - a bound Celery task
        return message_sender(task.request.properties) or ""

    def from_control_queue(task) -> bool:  # noqa: ANN001
        return (task.request.delivery_info or {}).get("exchange") == CONTROL.name

    @app.task(name=REPORT_TASK, bind=True, acks_late=True, ignore_result=True)
    def site_report(self, payload: dict) -> None:
        try:
            report = SiteReport.model_validate(payload)
        except Exception as exc:  # noqa: BLE001 - malformed: refuse, do not crash
            coordinator.refuse(None, "malformed-report", _one_line(exc), sender_of(self))
            return
        coordinator.on_report(report, sender_of(self))

    @app.task(name=START_TASK, bind=True, acks_late=True, ignore_result=True)
    def start_experiment(self, spec: dict) -> None:
        sender = sender_of(self)
        if not from_control_queue(self):
            coordinator.refuse(None, "start", "start request outside the control queue", sender)
            return
        try:
            parsed = parse_spec(spec)
        except Exception as exc:  # noqa: BLE001
            coordinator.refuse(None, "start", f"invalid spec: {_one_line(exc)}", sender)
            return
        try:
            coordinator.start(parsed, sender)
        except FedError as exc:  # e.g. a site without a bucket: say why, do not retry
            coordinator.refuse(parsed.experiment_id, "start", _one_line(exc), sender)

    @app.task(name=CANCEL_TASK, bind=True, acks_late=True, ignore_result=True)
    def cancel_experiment(self, experiment_id: str) -> None:
        sender = sender_of(self)
        if not from_control_queue(self) or not isinstance(experiment_id, str):
            coordinator.refuse(None, "cancel", "cancel request outside the control queue", sender)
            return
        coordinator.cancel(experiment_id[:64], sender)

    return app, coordinator


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


class Ticker(threading.Thread):
    def __init__(self, coordinator: Coordinator, interval_s: float) -> None:
        super().__init__(name="fednnunet-ticker", daemon=True)
        self.coordinator, self.interval_s = coordinator, interval_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                self.coordinator.tick()
            except Exception:  # noqa: BLE001 - keep ticking through transient faults
                log.exception("tick failed")


def run_coordinator(settings: Settings, tick_s: float = 2.0, loglevel: str = "INFO") -> None:
    declare_topology(settings, [])
    app, coordinator = build_coordinator(settings)
    ProgressConsumer(
        settings, lambda event, key, user: coordinator.on_progress(event, key, user or "")
    ).start()
    Ticker(coordinator, tick_s).start()
    app.worker_main(
        [
            "worker",
            # Threads: the reports of a round arrive together, and each is downloaded and
            # verified outside the experiment lock, so they download concurrently.
            "--pool",
            "threads",
            "--concurrency",
            str(REPORT_THREADS),
            "--queues",
            f"{COORDINATOR_QUEUE},{CONTROL_QUEUE}",
            "--hostname",
            "coordinator@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            loglevel,
        ]
    )
