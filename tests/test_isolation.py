"""The suite's own services: another clone's stack and the user's experiments stay apart."""

from __future__ import annotations

import os

import pytest
import redis

from fednnunet.adapters.redis_state import RedisState
from fednnunet.messages import ExperimentOptions
from tests.support.private_stack import TEST_PREFIX, rabbitmqctl_usable

pytestmark = pytest.mark.integration


def test_session_uses_its_own_namespace_vhost_and_s3(stack):
    assert stack.redis_namespace.startswith(TEST_PREFIX)
    assert os.environ["FEDNNUNET_REDIS_NAMESPACE"] == stack.redis_namespace  # sub-processes
    assert os.environ["FEDNNUNET_S3_ENDPOINT"] == stack.s3_endpoint
    assert stack.s3_endpoint != "127.0.0.1:8333"  # the development stack's port
    if rabbitmqctl_usable():
        assert stack.broker_url.endswith("/" + TEST_PREFIX + stack.redis_namespace[-6:])
        assert os.environ["FEDNNUNET_BROKER_URL"] == stack.broker_url


def test_experiments_of_the_suite_are_invisible_in_another_namespace(stack, unique_id):
    from fednnunet.core import state_machine as sm

    mine = RedisState.from_settings(stack)
    other = RedisState(stack.redis_url, namespace=unique_id("user-ns-"))
    exp = sm.new_experiment(
        unique_id("iso-"), ["901"], ExperimentOptions(method="asym", rounds=1, quorum=1), 0.0
    )
    assert mine.create(exp)
    try:
        assert exp.experiment_id in mine.experiments()
        assert exp.experiment_id not in other.experiments()
    finally:
        client = redis.Redis.from_url(stack.redis_url)
        for key in client.scan_iter(f"{mine.ns}:*{exp.experiment_id}*"):
            client.delete(key)
        client.srem(f"{mine.ns}:experiments", exp.experiment_id)


def test_without_rabbitmqctl_the_configured_vhost_is_used_and_said(monkeypatch):
    from tests.support import private_stack

    monkeypatch.setattr(private_stack, "rabbitmqctl_usable", lambda: False)
    services = private_stack.SessionServices.new()
    services.open_vhost()
    assert services.vhost is None
    assert services.notes and "configured broker URL" in services.notes[0]
    url = "amqp://guest:guest@127.0.0.1:5672//"
    assert "FEDNNUNET_BROKER_URL" not in services.env(url)  # the configured one stays


def test_vhost_goes_into_the_broker_url():
    from tests.support.private_stack import with_vhost

    assert with_vhost("amqp://u:p@h:5672//", "t-1") == "amqp://u:p@h:5672/t-1"
    assert with_vhost("amqps://u:p@h:5671/old", "t-2") == "amqps://u:p@h:5671/t-2"
