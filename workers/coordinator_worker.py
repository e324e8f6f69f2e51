"""Coordinator process: a Celery worker on queue ``coordinator`` plus a ticker and
a progress consumer, all wiring :class:`fednnunet.coordinator.service.Coordinator`."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from celery import Celery

from fednnunet.adapters.broker import (
    CANCEL_TASK,
    REPORT_TASK,
    SITE_TASKS,
    START_TASK,
    ProgressConsumer,
    declare_topology,
    make_celery,
    site_task_queue,
)
from fednnunet.adapters.redis_state import RedisState
from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.coordinator.service import Coordinator
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

    @app.task(name=REPORT_TASK, acks_late=True, ignore_result=True)
    def site_report(payload: dict) -> None:
        coordinator.on_report(SiteReport.model_validate(payload))

    @app.task(name=START_TASK, acks_late=True, ignore_result=True)
    def start_experiment(spec: dict) -> None:
        coordinator.start(parse_spec(spec))

    @app.task(name=CANCEL_TASK, acks_late=True, ignore_result=True)
    def cancel_experiment(experiment_id: str) -> None:
        coordinator.cancel(experiment_id)

    return app, coordinator


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
    ProgressConsumer(settings, coordinator.redis.record_progress).start()
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
            "coordinator",
            "--hostname",
            "coordinator@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            loglevel,
        ]
    )
