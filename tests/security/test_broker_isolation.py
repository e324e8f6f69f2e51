"""Per-site RabbitMQ users on the real local broker: exactly the rights a site needs.

Each test module run gets its own vhost and two random sites, provisioned with
``rabbitmqctl`` by the same code as production (``provision_broker`` pieces), and
removes them afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from fednnunet.deploy import provisioning as prov

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl (root)"),
]

REPO = Path(__file__).resolve().parents[2]
ACCESS_REFUSED, PRECONDITION_FAILED = 403, 406


class Env:
    def __init__(self, vhost: str, site_a: str, site_b: str, seed: str):
        self.vhost, self.a, self.b, self.seed = vhost, site_a, site_b, seed

    def params(self, user: str, password: str) -> pika.ConnectionParameters:
        creds = pika.PlainCredentials(user, password)
        return pika.ConnectionParameters("127.0.0.1", 5672, self.vhost, creds)

    def site_conn(self, site: str) -> pika.BlockingConnection:
        return pika.BlockingConnection(self.params(*prov.site_amqp_credentials(site, self.seed)))

    def admin_conn(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self.params("guest", "guest"))

    def site_url(self, site: str) -> str:
        user, pw = prov.site_amqp_credentials(site, self.seed)
        return prov.broker_url(user, pw, vhost=self.vhost)


@pytest.fixture(scope="module")
def env():
    tag = secrets.token_hex(3)
    e = Env(f"fednnunet-test-{tag}", f"ta{tag}", f"tb{tag}", secrets.token_hex(8))
    ctl = "rabbitmqctl"
    prov.ensure_vhost(e.vhost, ctl)
    subprocess.run([ctl, "set_permissions", "-p", e.vhost, "guest", ".*", ".*", ".*"], check=True)  # noqa: S603 - broker admin tool, fixed argv
    try:
        for site in (e.a, e.b):
            user, pw = prov.site_amqp_credentials(site, e.seed)
            topic = prov.site_topic_permission(site)
            prov.ensure_user(user, pw, prov.site_permissions(site), e.vhost, "", ctl, topic)
        with e.admin_conn() as conn:
            prov.declare_topology(conn.channel(), [e.a, e.b])
        yield e
    finally:
        for site in (e.a, e.b):
            prov.delete_user(prov.site_user(site), ctl)
        subprocess.run([ctl, "delete_vhost", e.vhost], capture_output=True)  # noqa: S603 - broker admin tool, fixed argv


def _admin_publish(env: Env, exchange: str, key: str, body: bytes) -> None:
    with env.admin_conn() as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(exchange, key, body, pika.BasicProperties(delivery_mode=2))


def _admin_get(env: Env, queue: str, timeout: float = 10.0, log: Path | None = None):
    """Next message on ``queue`` as (properties, body), polling up to ``timeout`` s.

    Gives up early once ``log`` (a worker's output) shows a refusal.
    """
    deadline = time.monotonic() + timeout
    with env.admin_conn() as conn:
        ch = conn.channel()
        while time.monotonic() < deadline:
            if log is not None and "ACCESS_REFUSED" in log.read_text(errors="replace"):
                raise AssertionError("worker was refused by the broker")
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is not None:
                return props, body
            time.sleep(0.1)
    raise AssertionError(f"nothing arrived on {queue} within {timeout}s")


def _refused(env: Env, site: str, action) -> int:
    with env.site_conn(site) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(ChannelClosedByBroker) as ei:
            action(ch)
        return ei.value.reply_code


def test_regexes_are_exact():
    p = prov.site_permissions("901")
    assert (p.configure, p.write, p.read) == (
        "^$",
        r"^(fednnunet\.results|fednnunet\.progress)$",
        r"^(site\.901)$",
    )


def test_site_consumes_own_queue(env):
    _admin_publish(env, prov.TASKS_EXCHANGE, f"site.{env.a}", b"task-for-a")
    with env.site_conn(env.a) as conn:
        ch = conn.channel()
        # passive declare (what a no_declare consumer may do to check the queue) needs no right
        ch.queue_declare(f"site.{env.a}", passive=True)
        body = None
        for _ in range(50):
            method, _, body = ch.basic_get(f"site.{env.a}")
            if method is not None:
                ch.basic_ack(method.delivery_tag)
                break
            time.sleep(0.1)
        assert body == b"task-for-a"


def test_site_publishes_results_and_progress(env):
    with env.site_conn(env.a) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        user = prov.site_user(env.a)
        # user_id is checked by RabbitMQ against the login: the coordinator can trust it.
        props = pika.BasicProperties(user_id=user, delivery_mode=2)
        ch.basic_publish(prov.RESULTS_EXCHANGE, "coordinator", b"report-a", props)
        ch.basic_publish(prov.PROGRESS_EXCHANGE, f"exp1.{env.a}.heartbeat", b"hb")
    props, body = _admin_get(env, "coordinator")
    assert body == b"report-a" and props.user_id == prov.site_user(env.a)


def test_site_cannot_consume_other_site_queue(env):
    code = _refused(env, env.a, lambda ch: ch.basic_get(f"site.{env.b}"))
    assert code == ACCESS_REFUSED
    code = _refused(env, env.a, lambda ch: ch.basic_consume(f"site.{env.b}", lambda *a: None))
    assert code == ACCESS_REFUSED


def test_site_cannot_consume_coordinator_queue(env):
    assert _refused(env, env.a, lambda ch: ch.basic_get("coordinator")) == ACCESS_REFUSED


def test_site_cannot_publish_tasks(env):
    code = _refused(
        env, env.a, lambda ch: ch.basic_publish(prov.TASKS_EXCHANGE, f"site.{env.b}", b"evil")
    )
    assert code == ACCESS_REFUSED
    # The default exchange routes by queue name: writing to it would reach any queue.
    code = _refused(env, env.a, lambda ch: ch.basic_publish("", f"site.{env.b}", b"evil"))
    assert code == ACCESS_REFUSED


def test_site_cannot_change_topology(env):
    a, b = env.a, env.b
    assert _refused(env, a, lambda ch: ch.queue_declare(f"site.{a}.spy")) == ACCESS_REFUSED
    code = _refused(
        env, a, lambda ch: ch.queue_bind(f"site.{a}", prov.TASKS_EXCHANGE, routing_key=f"site.{b}")
    )
    assert code == ACCESS_REFUSED
    code = _refused(env, a, lambda ch: ch.exchange_declare(prov.TASKS_EXCHANGE, "fanout"))
    assert code in (ACCESS_REFUSED, PRECONDITION_FAILED)
    assert _refused(env, a, lambda ch: ch.queue_purge(f"site.{b}")) == ACCESS_REFUSED
    assert _refused(env, a, lambda ch: ch.queue_delete("coordinator")) == ACCESS_REFUSED


def test_site_cannot_impersonate_another_site(env):
    a, b = env.a, env.b
    code = _refused(
        env, a, lambda ch: ch.basic_publish(prov.PROGRESS_EXCHANGE, f"exp1.{b}.heartbeat", b"x")
    )
    assert code == ACCESS_REFUSED  # topic permission: progress keys carry the own site id
    props = pika.BasicProperties(user_id=prov.site_user(b))
    code = _refused(
        env, a, lambda ch: ch.basic_publish(prov.RESULTS_EXCHANGE, "coordinator", b"x", props)
    )
    assert code == PRECONDITION_FAILED  # forged user_id


def test_wrong_password_cannot_connect(env):
    user, _ = prov.site_amqp_credentials(env.a, env.seed)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(env.params(user, "wrong"))


WORKER_APP = textwrap.dedent(
    """
    import os

    from celery import Celery
    from kombu import Exchange, Queue

    SITE = os.environ["T_SITE"]
    app = Celery("sitetest", broker=os.environ["T_BROKER"])
    tasks = Exchange("fednnunet.tasks", type="direct", no_declare=True)
    results = Exchange("fednnunet.results", type="direct", no_declare=True)
    # no_declare: a site has no configure right; the coordinator declared the topology.
    to_coordinator = Queue("coordinator", results, routing_key="coordinator", no_declare=True)
    app.conf.update(
        task_queues=[Queue(f"site.{SITE}", tasks, routing_key=f"site.{SITE}", no_declare=True)],
        task_create_missing_queues=False,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # Publisher confirms: a refused publish raises instead of vanishing.
        broker_transport_options={"confirm_publish": True},
    )

    @app.task(name="site.ping")
    def ping(token):
        # Reply through the restricted connection to the coordinator queue.
        app.send_task(
            "coordinator.report",
            args=[SITE, token],
            # All three needed: with only queue= Celery publishes through amq.default
            # (refused: writing there would reach every queue by name).
            queue=to_coordinator,
            exchange="fednnunet.results",
            routing_key="coordinator",
            ignore_result=True,
        )
        return token
    """
)


def test_celery_worker_with_site_credentials(env, tmp_path):
    """A Celery worker logged in as the site consumes its queue and can reply."""
    (tmp_path / "sitetest.py").write_text(WORKER_APP)
    worker_env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "T_SITE": env.a,
        "T_BROKER": env.site_url(env.a),
    }
    cmd = [sys.executable, "-m", "celery", "-A", "sitetest", "worker", "--pool", "solo"]
    cmd += ["-Q", f"site.{env.a}", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    cmd += ["--loglevel", "INFO", "-n", f"{env.a}@test"]
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=worker_env, stdout=out, stderr=subprocess.STDOUT)  # noqa: S603 - own interpreter, argv list, no shell
    try:
        # The coordinator (admin) dispatches with a Celery app of its own.
        from celery import Celery

        admin = Celery("coord", broker=f"amqp://guest:guest@127.0.0.1:5672/{env.vhost}")
        admin.conf.task_ignore_result = True
        token = secrets.token_hex(4)
        admin.send_task(
            "site.ping", args=[token], exchange=prov.TASKS_EXCHANGE, routing_key=f"site.{env.a}"
        )
        props, body = _admin_get(env, "coordinator", timeout=60, log=log)
        assert props.headers["task"] == "coordinator.report"
        args = json.loads(body)[0]
        assert args == [env.a, token]
    except BaseException:
        print(log.read_text())
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "ACCESS_REFUSED" not in text, text


PROJECT_WORKER = textwrap.dedent(
    """
    import os
    import sys

    from fednnunet.adapters.broker import broker_user, make_celery
    from fednnunet.messages import SiteReport
    from fednnunet.settings import get_settings
    from fednnunet.workers.site_worker import send_report, worker_argv

    SITE = os.environ["T_SITE"]
    settings = get_settings(broker_url=os.environ["T_BROKER"], site_id=SITE)
    app = make_celery(settings, "site", SITE)
    app.conf.broker_transport_options = {"confirm_publish": True}

    @app.task(name="site.ping")
    def ping(token):
        report = SiteReport(experiment_id=token, site_id=SITE, phase="fingerprint", ok=True)
        send_report(app, report, broker_user(settings))

    if __name__ == "__main__":
        app.worker_main(worker_argv(settings, "INFO"))
    """
)


def test_project_site_app_with_site_credentials(env, tmp_path):
    """The project's own site Celery config works under the restricted site user."""
    (tmp_path / "projsite.py").write_text(PROJECT_WORKER)
    worker_env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}:{REPO}",
        "T_SITE": env.a,
        "T_BROKER": env.site_url(env.a),
    }
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - own interpreter, argv list, no shell
            [sys.executable, str(tmp_path / "projsite.py")],
            env=worker_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        from celery import Celery

        admin = Celery("coord", broker=f"amqp://guest:guest@127.0.0.1:5672/{env.vhost}")
        token = f"exp{secrets.token_hex(3)}"
        admin.send_task(
            "site.ping", args=[token], exchange=prov.TASKS_EXCHANGE, routing_key=f"site.{env.a}"
        )
        props, body = _admin_get(env, "coordinator", timeout=60, log=log)
        report = json.loads(body)[0][0]
        assert report["experiment_id"] == token and report["site_id"] == env.a
    except AssertionError:
        text = log.read_text()
        print(text)
        for needle, fix in KNOWN_TOO_WIDE_CALLS.items():
            if needle in text:
                pytest.xfail(f"project code needs a right a site must not have: {fix}")
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "ACCESS_REFUSED" not in log.read_text()


# Refusals caused by the project's Celery usage (not by too-tight permissions), and their fix.
KNOWN_TOO_WIDE_CALLS = {
    "'fednnunet.tasks' in vhost": (
        "make_celery(role='site') declares its queue; use site_task_queue(site_id, no_declare=True)"
    ),
    "'amq.default' in vhost": (
        "send_task(queue=...) alone publishes via amq.default; also pass "
        "exchange='fednnunet.results', routing_key='coordinator'"
    ),
}
