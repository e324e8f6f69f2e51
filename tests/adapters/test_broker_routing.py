"""Tasks reach only their site's queue; JSON only (real RabbitMQ)."""

from __future__ import annotations

import json

import pytest
from kombu import Connection

from fednnunet.adapters.broker import (
    SITE_TASKS,
    check_broker,
    declare_topology,
    make_celery,
    site_task_queue,
)
from fednnunet.errors import ServiceUnreachable
from fednnunet.messages import ExperimentOptions, SiteTask

pytestmark = pytest.mark.integration


def _drain(settings, queue_name):
    bodies = []
    with Connection(settings.broker_url) as conn:
        simple = conn.SimpleQueue(
            queue_name, no_ack=True, queue_opts={"durable": True, "no_declare": True}
        )
        while True:
            try:
                msg = simple.get(timeout=0.5)
            except simple.Empty:
                break
            bodies.append((msg.content_type, msg.body))
        simple.close()
    return bodies


def test_site_task_goes_to_its_own_queue_only(stack, unique_id):
    a, b = unique_id("ra"), unique_id("rb")
    declare_topology(stack, [a, b])
    app = make_celery(stack, "client")
    task = SiteTask(
        experiment_id="exp-route",
        site_id=a,
        phase="train",
        round=1,
        options=ExperimentOptions(configuration="2d", fold=0),
    )
    app.send_task(
        SITE_TASKS["train"], args=[task.model_dump(mode="json")], queue=site_task_queue(a)
    )
    got_a, got_b = _drain(stack, f"site.{a}"), _drain(stack, f"site.{b}")
    assert len(got_a) == 1 and got_b == []
    content_type, body = got_a[0]
    assert content_type == "application/json"
    args = json.loads(body)[0]
    assert SiteTask.model_validate(args[0]).site_id == a
    with Connection(stack.broker_url) as conn:
        ch = conn.channel()
        for s in (a, b):
            ch.queue_delete(f"site.{s}")


def test_pickle_is_not_accepted_by_workers(stack):
    for role in ("site", "coordinator"):
        app = make_celery(stack, role, site_id="x")
        assert app.conf.accept_content == ["json"]
        assert app.conf.task_serializer == "json"


def test_unreachable_broker_is_one_line(stack):
    with pytest.raises(ServiceUnreachable) as err:
        check_broker(
            stack.model_copy(update={"broker_url": "amqp://guest:guest@127.0.0.1:1//"}), timeout_s=1
        )
    assert "RabbitMQ unreachable at amqp://***@127.0.0.1:1//" in str(err.value)
