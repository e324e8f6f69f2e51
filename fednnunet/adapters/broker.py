"""RabbitMQ through Celery (tasks, reports) and pika (transient progress events).

Topology::

    fednnunet.tasks    (direct)  --site.<id>-->   queue site.<id>    (one site worker)
    fednnunet.results  (direct)  --coordinator--> queue coordinator  (coordinator)
    fednnunet.control  (direct)  --coordinator.control--> queue coordinator.control (operators)
    fednnunet.progress (topic)   --<exp>.<site>.<kind>--> exclusive queues (coordinator, watch)

Every message carries the AMQP ``user_id`` of its sender's broker user, which
RabbitMQ validates (a publish claiming another user closes the channel). The
coordinator takes a sender's identity from that property, never from the body.
Sites may write to ``fednnunet.results`` and ``fednnunet.progress`` only, so start
and cancel requests (``fednnunet.control``) come from operators alone.

Site tasks are acknowledged on receipt: a training round outlives the broker
heartbeat and RabbitMQ's consumer timeout, and a late ack would make the broker
redeliver (or kill) it. Lost work is re-dispatched by the coordinator, which
watches heartbeats; every task is idempotent, so a second delivery is a no-op.
Coordinator tasks are short and acknowledged late (redelivered if it dies).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import pika
from celery import Celery
from kombu import Connection, Exchange, Queue

from fednnunet.errors import ServiceUnreachable
from fednnunet.keys import (
    CONTROL_EXCHANGE,
    CONTROL_QUEUE,
    COORDINATOR_QUEUE,
    IDLE_EXPERIMENT,
    PROGRESS_EXCHANGE,
    progress_routing_key,
    site_queue,
)
from fednnunet.messages import ProgressEvent
from fednnunet.phases import Phase
from fednnunet.settings import Settings

log = logging.getLogger(__name__)

TASKS_EXCHANGE = Exchange("fednnunet.tasks", type="direct", durable=True)
RESULTS_EXCHANGE = Exchange("fednnunet.results", type="direct", durable=True)
CONTROL = Exchange(CONTROL_EXCHANGE, type="direct", durable=True)

MAX_PROGRESS_BYTES = 64 << 10  # a progress event is a few hundred bytes

# The Celery task of each phase (names a site's log shows).
SITE_TASKS = {
    Phase.FINGERPRINT: "fednnunet.site.extract_fingerprint",
    Phase.PLAN: "fednnunet.site.plan_and_preprocess",
    Phase.TRAIN: "fednnunet.site.train_round",
    Phase.EVALUATE: "fednnunet.site.evaluate_global",
    Phase.VALIDATE: "fednnunet.site.validate",
}
REPORT_TASK = "fednnunet.coordinator.site_report"
START_TASK = "fednnunet.coordinator.start_experiment"
CANCEL_TASK = "fednnunet.coordinator.cancel_experiment"


def site_task_queue(site_id: str, no_declare: bool = False) -> Queue:
    name = site_queue(site_id)
    return Queue(name, TASKS_EXCHANGE, routing_key=name, durable=True, no_declare=no_declare)


def coordinator_queue(no_declare: bool = False) -> Queue:
    return Queue(
        COORDINATOR_QUEUE,
        RESULTS_EXCHANGE,
        routing_key=COORDINATOR_QUEUE,
        durable=True,
        no_declare=no_declare,
    )


def control_queue(no_declare: bool = False) -> Queue:
    return Queue(
        CONTROL_QUEUE, CONTROL, routing_key=CONTROL_QUEUE, durable=True, no_declare=no_declare
    )


def broker_user(settings: Settings) -> str:
    """The broker user this process authenticates as (the AMQP ``user_id`` it must send)."""
    return unquote(urlsplit(settings.broker_url).username or "guest")


def message_sender(properties: dict | None) -> str | None:
    """The broker-validated sender of a received message (None if it did not say)."""
    user = (properties or {}).get("user_id")
    if isinstance(user, bytes):
        user = user.decode("utf-8", "replace")
    return user or None


def send_control(settings: Settings, task_name: str, args: list) -> None:
    """Publish a start/cancel request on the operators' exchange, signed with our user."""
    app = make_celery(settings, "client")
    app.send_task(
        task_name,
        args=args,
        queue=control_queue(no_declare=True),
        exchange=CONTROL.name,
        routing_key=CONTROL_QUEUE,
        user_id=broker_user(settings),
    )


def broker_ca_file(settings: Settings) -> str | None:
    """FEDNNUNET_BROKER_CA_FILE, else the S3 CA file (one private CA per federation)."""
    return os.environ.get("FEDNNUNET_BROKER_CA_FILE") or settings.s3_ca_file or None


def _ssl_options(settings: Settings) -> dict | None:
    """py-amqp TLS options for amqps:// (None for amqp://).

    ``server_hostname: None`` makes kombu fill in the URL's host, which turns on
    hostname checking: without it py-amqp accepts any certificate the CA signed.
    """
    if not settings.broker_url.startswith("amqps://"):
        return None
    opts: dict = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
    ca = broker_ca_file(settings)
    if ca:
        opts["ca_certs"] = ca
    return opts


def make_celery(settings: Settings, role: str, site_id: str | None = None) -> Celery:
    """Celery app for 'site', 'coordinator' or 'client' (CLI, sends only). JSON only."""
    app = Celery("fednnunet", broker=settings.broker_url, set_as_current=False)
    conf: dict = dict(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_create_missing_queues=False,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_channel_error_retry=True,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 60,
            "interval_start": 0.5,
            "interval_step": 1.0,
            "interval_max": 5.0,
        },
        task_default_queue=COORDINATOR_QUEUE,
        task_default_exchange=RESULTS_EXCHANGE.name,
        task_default_routing_key=COORDINATOR_QUEUE,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    if role == "site":
        if not site_id:
            raise ValueError("a site worker needs a site id")
        # The main thread is busy training for minutes and the solo pool sends no
        # heartbeats meanwhile: disable them (TCP keepalive still detects dead peers).
        # Least privilege: a site never declares anything (its queue is declared by the
        # coordinator or provisioning) and publishes only to fednnunet.results/progress.
        conf.update(
            task_queues=[site_task_queue(site_id, no_declare=True)],
            task_acks_late=False,
            broker_heartbeat=0,
            broker_transport_options={"confirm_publish": True},
        )
    elif role == "coordinator":
        conf.update(
            task_queues=[coordinator_queue(), control_queue()],
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            broker_heartbeat=30,
        )
    else:
        conf.update(
            task_queues=[control_queue(no_declare=True)],
            broker_heartbeat=0,
            broker_transport_options={"confirm_publish": True},
        )
    ssl_opts = _ssl_options(settings)
    if ssl_opts:
        conf["broker_use_ssl"] = ssl_opts
    app.conf.update(conf)
    return app


def check_broker(settings: Settings, timeout_s: float = 5.0) -> None:
    try:
        with Connection(
            settings.broker_url, connect_timeout=timeout_s, ssl=_ssl_options(settings) or False
        ) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001
        raise ServiceUnreachable(
            "RabbitMQ", _redact(settings.broker_url), _failure_detail(exc)
        ) from exc


def _failure_detail(exc: BaseException) -> str:
    """The exception's type name, or what TLS refused (a wrong CA is not an outage)."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, ssl.SSLCertVerificationError):
            return (
                f"TLS verification failed: {e.verify_message or e.reason}; check "
                "FEDNNUNET_BROKER_CA_FILE and the host name in the certificate"
            )
        if isinstance(e, ssl.SSLError):
            return f"TLS handshake failed: {e.reason or e}"
        e = e.__cause__ or e.__context__
    return type(exc).__name__


def _redact(url: str) -> str:
    from fednnunet.settings import redact_url

    return redact_url(url)


def declare_topology(settings: Settings, sites: list[str]) -> None:
    """Exchanges, the coordinator queue and every site queue (before any publish).

    A message published to a direct exchange with no bound queue is dropped, so
    site queues must exist before the first task, even if a worker is not up yet.
    """
    with Connection(settings.broker_url, ssl=_ssl_options(settings) or False) as conn:
        channel = conn.channel()
        for exch in (TASKS_EXCHANGE, RESULTS_EXCHANGE):
            exch(channel).declare()
        Exchange(PROGRESS_EXCHANGE, type="topic", durable=True)(channel).declare()
        CONTROL(channel).declare()
        coordinator_queue()(channel).declare()
        control_queue()(channel).declare()
        for site in sites:
            site_task_queue(site)(channel).declare()


# ------------------------------------------------------------------ progress
def _pika_params(settings: Settings) -> pika.URLParameters:
    url = settings.broker_url
    if url.endswith("//"):  # kombu spells the default vhost "//"; pika wants "/%2F"
        url = url[:-1] + "%2F"
    params = pika.URLParameters(url)
    if params.ssl_options is not None:
        # pika's amqps default trusts only the system CAs: use the federation's CA.
        ctx = ssl.create_default_context(cafile=broker_ca_file(settings))
        params.ssl_options = pika.SSLOptions(ctx, server_hostname=params.host)
    params.heartbeat = 30
    params.blocked_connection_timeout = 30
    params.connection_attempts = 1
    params.socket_timeout = 5
    return params


class ProgressPublisher:
    """Publishes progress events from a background thread that owns its connection.

    Progress is best effort (a lost event costs nothing); the thread also sends a
    heartbeat every ``interval_s`` while a task is active, so the coordinator can
    tell a slow site from a dead one.
    """

    def __init__(self, settings: Settings, site_id: str, interval_s: float | None = None) -> None:
        self.settings = settings
        self.site_id = site_id
        self.user_id = broker_user(settings)
        self.interval_s = interval_s or settings.heartbeat_interval_s
        self._events: queue.Queue[ProgressEvent] = queue.Queue(maxsize=1000)
        self._active: ProgressEvent | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fednnunet-progress", daemon=True)
        self._thread.start()

    def begin(self, experiment_id: str, phase: Phase, round_: int) -> None:
        with self._lock:
            self._active = ProgressEvent(
                experiment_id=experiment_id,
                site_id=self.site_id,
                kind="heartbeat",
                phase=phase,
                round=round_,
            )
        self.heartbeat()

    def end(self) -> None:
        with self._lock:
            self._active = None

    def heartbeat(self) -> None:
        """Beat for the active task, or an idle beat: the worker is alive with nothing to do.

        An idle beat after a task was dispatched to this site means the task was lost
        (e.g. the worker died right after acknowledging it): the coordinator re-sends it.
        """
        with self._lock:
            if self._active is not None:
                event = self._active.model_copy(update={"time": time.time()})
            else:
                event = ProgressEvent(
                    experiment_id=IDLE_EXPERIMENT,
                    site_id=self.site_id,
                    kind="heartbeat",
                    time=time.time(),
                )
        self.publish(event)

    def publish(self, event: ProgressEvent) -> None:
        if not event.time:
            event = event.model_copy(update={"time": time.time()})
        try:
            self._events.put_nowait(event)
        except queue.Full:
            pass

    def progress(self, **fields: object) -> None:
        with self._lock:
            base = self._active
        if base is not None:
            self.publish(
                base.model_copy(update={"kind": "progress", "time": time.time(), **fields})
            )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        conn = channel = None
        next_beat = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            try:
                if conn is None or conn.is_closed:
                    conn = pika.BlockingConnection(_pika_params(self.settings))
                    channel = conn.channel()
                timeout = max(0.0, next_beat - time.monotonic())
                try:
                    event = self._events.get(timeout=min(timeout, 0.5))
                except queue.Empty:
                    event = None
                if event is not None:
                    channel.basic_publish(
                        PROGRESS_EXCHANGE,
                        progress_routing_key(event.experiment_id, event.site_id, event.kind),
                        event.model_dump_json().encode(),
                        pika.BasicProperties(
                            content_type="application/json",
                            delivery_mode=1,
                            user_id=self.user_id,
                        ),
                    )
                conn.process_data_events(time_limit=0)
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.interval_s
                    self.heartbeat()
            except Exception as exc:  # noqa: BLE001 - best effort, reconnect
                log.debug("progress publisher: %s", exc)
                conn = None
                self._stop.wait(1.0)
        if conn is not None and conn.is_open:
            conn.close()


class ProgressConsumer:
    """Consumes every progress event (exclusive queue) and hands it to a callback.

    The callback gets the event, its routing key and its broker-validated sender, so
    that it can take the site from the routing key and the sender, not the body.
    """

    def __init__(
        self,
        settings: Settings,
        on_event: Callable[[ProgressEvent, str, str | None], None],
        binding_key: str = "#",
    ) -> None:
        self.settings = settings
        self.on_event = on_event
        self.binding_key = binding_key
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fednnunet-progress-in", daemon=True)

    def start(self) -> ProgressConsumer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = pika.BlockingConnection(_pika_params(self.settings))
                ch = conn.channel()
                ch.exchange_declare(PROGRESS_EXCHANGE, exchange_type="topic", durable=True)
                q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
                ch.queue_bind(q, PROGRESS_EXCHANGE, routing_key=self.binding_key)
                while not self._stop.is_set():
                    for method, props, body in ch.consume(q, auto_ack=True, inactivity_timeout=0.5):
                        if body is None or self._stop.is_set():
                            break
                        try:
                            if len(body) > MAX_PROGRESS_BYTES:
                                raise ValueError(f"{len(body)}-byte event")
                            self.on_event(
                                ProgressEvent.model_validate(json.loads(body)),
                                method.routing_key,
                                getattr(props, "user_id", None),
                            )
                        except Exception as exc:  # noqa: BLE001 - bad event: drop it
                            log.warning("dropped progress event: %s", exc)
                conn.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("progress consumer: %s", exc)
                self._stop.wait(1.0)
