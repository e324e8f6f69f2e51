"""Every user mistake gets one clear line (exit code 2), not a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fednnunet.cli.main import app

runner = CliRunner()


def _run(args, env=None):
    result = runner.invoke(app, args, env=env or {})
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    return result.exit_code, text


def test_bad_spec_lists_every_problem(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "sites: [a, A, a]\nconfiguration: 4d\nfold: 7\nrounds: 0\nmethod: x\nquorum: 9\nbogus: 1\n"
    )
    code, out = _run(["experiment", "start", str(spec)])
    assert code == 2
    assert "Traceback" not in out
    for needle in (
        "invalid experiment spec",
        "sites",
        "configuration",
        "fold",
        "rounds",
        "method",
        "bogus",
    ):
        assert needle in out, needle


def test_unknown_train_args_are_named(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("sites: [a]\ntrain_args: ['--frobnicate']\n")
    code, out = _run(["experiment", "start", str(spec)])
    assert code == 2 and "--frobnicate" in out


def test_missing_spec_file_and_bad_yaml(tmp_path):
    code, out = _run(["experiment", "start", str(tmp_path / "nope.yaml")])
    assert code == 2 and "spec file not found" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [a\n")
    code, out = _run(["experiment", "start", str(bad)])
    assert code == 2 and "not valid YAML" in out


def test_worker_without_nnunet_env_vars():
    code, out = _run(
        ["worker", "--site", "a", "--dataset-id", "1"],
        env={"nnUNet_raw": "", "nnUNet_preprocessed": "", "nnUNet_results": ""},
    )
    assert code == 2
    assert "nnU-Net environment variable(s) not set: nnUNet_raw, nnUNet_preprocessed" in out


@pytest.mark.integration
def test_unreachable_services_named_with_url(tmp_path):
    env = {
        "nnUNet_raw": str(tmp_path),
        "nnUNet_preprocessed": str(tmp_path),
        "nnUNet_results": str(tmp_path),
    }
    code, out = _run(
        [
            "worker",
            "--site",
            "a",
            "--dataset-id",
            "1",
            "--broker-url",
            "amqp://guest:guest@127.0.0.1:1//",
        ],
        env=env,
    )
    assert code == 2 and "RabbitMQ unreachable at amqp://***@127.0.0.1:1//" in out
    code, out = _run(["experiment", "status", "x", "--redis-url", "redis://127.0.0.1:1/0"])
    assert code == 2 and "Redis unreachable at redis://127.0.0.1:1/0" in out
    code, out = _run(["coordinator", "--s3-endpoint", "127.0.0.1:1"])
    assert code == 2 and "S3 unreachable at http://127.0.0.1:1" in out


@pytest.mark.integration
def test_status_of_unknown_experiment(stack):
    code, out = _run(["experiment", "status", "no-such-exp"])
    assert code == 2 and "no experiment 'no-such-exp'" in out


@pytest.mark.integration
def test_watch_waits_for_the_coordinator_and_says_why_it_stopped(stack, unique_id):
    """`start --watch`: a refused start ends at once with the coordinator's reason; with no
    coordinator, one line after the accept timeout (not a bare 'no experiment')."""
    from fednnunet.adapters.redis_state import RedisState
    from fednnunet.cli.main import _wait_until_accepted
    from fednnunet.errors import FedError

    exp = unique_id("watch-")
    with pytest.raises(FedError, match="no coordinator took it within 1 s"):
        _wait_until_accepted(stack, exp, timeout_s=1.0)
    RedisState.from_settings(stack).record_refusal(exp, "start", "start from non-operator x", "x")
    with pytest.raises(FedError, match="refused to start .*non-operator x"):
        _wait_until_accepted(stack, exp, timeout_s=60.0)
