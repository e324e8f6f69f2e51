"""One test per attack, through the real broker and S3, against a production-mode
coordinator: each is refused with a logged one-line reason, and the honest sites'
experiment still finishes with every round's global equal to an independent FedAvg of
exactly the accepted updates (or fails with a clear reason where going on is wrong).
"""

from __future__ import annotations

import json

import pika
import pytest
import torch

from fednnunet.adapters.broker import coordinator_queue
from fednnunet.adapters.weights_codec import encode_weights
from tests.adversarial.harness import (
    HONEST,
    Evil,
    assert_rounds_are_honest_fedavg,
    honestly,
    refusals,
    run_experiment,
)
from tests.support.standin import build_state

pytestmark = pytest.mark.integration


def _tiny(seed: int = 0) -> dict[str, torch.Tensor]:
    return build_state("tiny", seed)


def _excluded_from(state, site: str, rounds: set[int]) -> None:
    for record in state.history:
        if record.round in rounds:
            assert site not in record.participants, (record.round, record.participants)
            assert site in record.quarantined or site in record.late, record


def _crafted_update_attack(make_update, from_round: int = 2):
    """From ``from_round`` on, evil's real update object *is* the crafted one."""

    def attack(evil: Evil, task, honest) -> None:
        if task.phase != "train" or task.round < from_round:
            evil.send(honest())
            return
        ref = evil.put(task, make_update(evil, task))
        report = {
            "experiment_id": task.experiment_id,
            "site_id": evil.site,
            "phase": "train",
            "round": task.round,
            "attempt": task.attempt,
            "ok": True,
            "artifact": ref.model_dump(),
            "num_cases": evil.service._session(task).num_training_cases(),
        }
        evil.send(report)

    return attack


def test_honest_run_matches_the_independent_fedavg(consortium):
    """The baseline of every attack below: all three sites honest, nothing refused."""
    state, evil = run_experiment(consortium, honestly)
    assert state.phase == "done", state.error
    assert all(len(r.participants) == 3 and not r.quarantined for r in state.history)
    assert_rounds_are_honest_fedavg(consortium, state)
    assert refusals(consortium, state.experiment_id) == {}


# ---------------------------------------------------------------- identity
def test_forged_reports_heartbeats_start_and_cancel_are_refused(consortium):
    c = consortium
    a = c.site_id("a")
    forged: dict[str, object] = {}

    def attack(evil: Evil, task, honest) -> None:
        report = honest()
        if task.phase == "train" and task.round == 2 and "done" not in forged:
            forged["done"] = True
            # 1. A report in site a's name (a's real one must still count).
            evil.send(report.model_copy(update={"site_id": a, "num_cases": 10**4}))
            # 2. A start and a cancel through the only exchange evil may write to.
            for name, args in (
                ("fednnunet.coordinator.cancel_experiment", [task.experiment_id]),
                ("fednnunet.coordinator.start_experiment", [{"sites": [evil.site]}]),
            ):
                evil.app.send_task(
                    name, args=args, exchange="fednnunet.results", routing_key="coordinator",
                    user_id=evil.user, queue=coordinator_queue(no_declare=True),
                )  # fmt: skip
            # 3. A heartbeat for a under evil's own routing key (the broker lets it pass).
            with pika.BlockingConnection(_params(evil)) as conn:
                ch = conn.channel()
                body = json.dumps(
                    {"experiment_id": task.experiment_id, "site_id": a, "kind": "heartbeat"}
                ).encode()
                props = pika.BasicProperties(user_id=evil.user)
                ch.basic_publish(
                    "fednnunet.progress", f"{task.experiment_id}.{evil.site}.heartbeat", body, props
                )
                # 4. Under a's routing key: RabbitMQ's topic permission refuses it.
                with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
                    ch.confirm_delivery()
                    ch.basic_publish(
                        "fednnunet.progress", f"{task.experiment_id}.{a}.heartbeat", body, props
                    )
                assert err.value.reply_code == 403
            # 5. The control exchange (start/cancel) is closed to sites.
            with pika.BlockingConnection(_params(evil)) as conn:
                ch = conn.channel()
                ch.confirm_delivery()
                with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
                    ch.basic_publish("fednnunet.control", "coordinator.control", b"{}", props)
                assert err.value.reply_code == 403
        evil.send(report)

    state, evil = run_experiment(c, attack)
    assert state.phase == "done", state.error
    assert all(a in r.participants and evil.site in r.participants for r in state.history)
    assert_rounds_are_honest_fedavg(c, state)
    counts = refusals(c, state.experiment_id)
    assert counts.get("forged", 0) >= 1 and counts.get("forged-progress", 0) == 0
    glob = refusals(c, None)
    assert glob.get("cancel", 0) >= 1 and glob.get("start", 0) >= 1
    assert glob.get("bad-progress", 0) >= 1


def _params(evil: Evil) -> pika.ConnectionParameters:
    from urllib.parse import unquote, urlsplit

    url = urlsplit(evil.settings.broker_url)
    creds = pika.PlainCredentials(unquote(url.username), unquote(url.password))
    return pika.ConnectionParameters(url.hostname, url.port, unquote(url.path[1:]), creds)


# ---------------------------------------------------------------- references
def test_foreign_bucket_and_key_and_oversized_objects_are_refused(consortium):
    c = consortium
    a = c.site_id("a")

    def attack(evil: Evil, task, honest) -> None:
        report = honest()
        if task.phase == "train" and task.round == 2:
            # a's update (same experiment, round, phase) in a's bucket.
            foreign = report.artifact.model_copy(
                update={
                    "bucket": report.artifact.bucket.replace(evil.site, a),
                    "key": report.artifact.key.replace(evil.site, a),
                }
            )
            evil.send(report.model_copy(update={"artifact": foreign}))
            return
        if task.phase == "train" and task.round == 3:
            # Evil's real key, but the object is 8 MB while the report claims the honest size.
            evil.store.client.remove_object(evil.bucket, report.artifact.key)
            evil.store.put_bytes(evil.bucket, report.artifact.key, b"\0" * (8 << 20))
            evil.send(report)
            return
        evil.send(report)

    state, evil = run_experiment(c, attack, max_attempts=1)
    assert state.phase == "done", state.error
    _excluded_from(state, evil.site, {2, 3})
    assert_rounds_are_honest_fedavg(c, state)
    counts = refusals(c, state.experiment_id)
    assert counts.get("foreign-object", 0) + counts.get("bad-report", 0) >= 1
    assert counts.get("mismatch", 0) >= 1


# ---------------------------------------------------------------- influence
def test_a_billion_cases_or_a_changed_case_count_cannot_steer_the_average(consortium):
    c = consortium

    def attack(evil: Evil, task, honest) -> None:
        report = honest()
        if task.phase == "train" and task.round == 2:
            evil.send(report.model_dump(mode="json") | {"num_cases": 10**9})  # schema: refused
            evil.send(report.model_copy(update={"num_cases": report.num_cases * 1000}))
            return
        evil.send(report)

    state, evil = run_experiment(c, attack, max_attempts=1)
    assert state.phase == "done", state.error
    _excluded_from(state, evil.site, {2})
    assert_rounds_are_honest_fedavg(c, state)
    counts = refusals(c, state.experiment_id)
    assert counts.get("bad-report", 0) >= 1
    assert refusals(c, None).get("malformed-report", 0) >= 1
    for record in state.history:  # each participant weighs what it declared when planning
        total = sum(state.declared_cases[s] for s in record.participants)
        for site in record.participants:
            assert record.weights[site] == pytest.approx(state.declared_cases[site] / total)


def _garbage(_state):
    return b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!" + b"\xff" * 64


def _absurd_header(_state):
    header = {"0.weight": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * 4


def _realiased(state):
    """2.bias becomes an alias of 0.bias: an averaged layer replaced by another tensor."""
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in state.items() if k != "2.bias"}
    return save(tensors, metadata={"fednnunet.aliases": json.dumps({"2.bias": "0.bias"})})


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _joined(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def _overlapping(state):
    """2.bias is declared inside 0.bias's bytes: one stored tensor read as two layers
    (an alias the header does not declare)."""
    header, body = _split(bytes(encode_weights({k: v for k, v in state.items() if k != "2.bias"})))
    start = header["0.bias"]["data_offsets"][0]
    header["2.bias"] = {"dtype": "F32", "shape": [4], "data_offsets": [start, start + 16]}
    return _joined(header, body)


def _trailing(state):
    """An honest update with bytes hidden after its last tensor."""
    return bytes(encode_weights(state)) + b"hidden payload" * 8


def _tensors(make):
    return lambda state: encode_weights(make(state))


@pytest.mark.parametrize(
    ("make", "why", "from_round"),
    [
        (_tensors(lambda s: s | {"2.weight": s["2.weight"] * float("nan")}), "NaN", 2),
        (_tensors(lambda s: {k: v for k, v in s.items() if k != "2.bias"}), "missing", 2),
        (_tensors(lambda s: s | {"2.weight": torch.ones(1, 1)}), "shape", 2),
        (_tensors(lambda s: {k: v * 1e6 for k, v in s.items()}), "norm", 2),
        (_tensors(lambda s: {k: v * 1e6 for k, v in s.items()}), "norm", 1),
        (_garbage, "MalformedWeights", 2),
        (_absurd_header, "inconsistent dtype/shape/offsets", 2),
        (_realiased, "alias", 2),
        (_overlapping, "overlaps or leaves a gap", 2),
        (_trailing, "after the last tensor", 2),
    ],
    ids=["nan", "missing-key", "shape", "huge-norm", "huge-norm-round-1", "garbage",
         "absurd-header", "re-aliased", "overlapping-tensors", "trailing-bytes"],
)  # fmt: skip
def test_bad_updates_are_quarantined_not_averaged(consortium, make, why, from_round):
    c = consortium

    def crafted(evil, task):
        return make(_tiny(task.round))

    attack = _crafted_update_attack(crafted, from_round=from_round)
    state, evil = run_experiment(c, attack, rounds=2)
    assert state.phase == "done", state.error
    rounds = set(range(from_round, 3))
    _excluded_from(state, evil.site, rounds)
    assert_rounds_are_honest_fedavg(c, state)
    for record in state.history:
        if record.round in rounds:
            assert why in record.quarantined[evil.site], record.quarantined
    if from_round == 1:  # no previous global yet: screened against the round's median
        assert "median" in state.history[0].quarantined[evil.site]


def test_nan_validation_dice_is_stored_as_no_value_and_the_state_loads(consortium):
    c = consortium

    def attack(evil: Evil, task, honest) -> None:
        report = honest()
        if task.phase == "validate":
            body = report.model_dump(mode="json")
            body["metrics"] = {"mean_dice": float("nan"), "dice_1": float("inf"), "dice_2": 0.5}
            evil.send(body)
            return
        evil.send(report)

    state, evil = run_experiment(c, attack, rounds=1)
    assert state.phase == "done", state.error
    loaded = c.redis().load(state.experiment_id)  # the stored JSON loads again
    assert loaded.final_metrics[evil.site] == {"dice_2": 0.5}
    assert "finite" in loaded.final_missing[evil.site]["mean_dice"]
    assert set(loaded.final_missing[evil.site]) == {"mean_dice", "dice_1"}


def test_an_impossible_global_dice_cannot_steer_the_best_model(consortium):
    """A site claims a global-model Dice above 1 (every round and in the evaluate phase):
    the claim is left out of the case-weighted score, so the EMA and the best global are
    the honest sites' alone (recomputed here from their reports)."""
    c = consortium

    def attack(evil: Evil, task, honest) -> None:
        report = honest()
        if task.phase in ("train", "evaluate"):
            body = report.model_dump(mode="json")
            body["metrics"] = {**body["metrics"], "global_pseudo_dice": 50.0}
            evil.send(body)
            return
        evil.send(report)

    state, evil = run_experiment(c, attack, rounds=2)
    assert state.phase == "done", state.error
    honest = [c.site_id(s) for s in HONEST]
    ema = None
    for record in state.history:
        assert record.metrics[evil.site]["global_pseudo_dice"] == 50.0  # stored, not counted
        scores = {s: record.metrics[s]["global_pseudo_dice"] for s in honest}
        dice = sum(scores[s] * record.num_cases[s] for s in honest) / sum(
            record.num_cases[s] for s in honest
        )
        ema = dice if ema is None else 0.9 * ema + 0.1 * dice
        assert record.global_dice == pytest.approx(dice)
        assert record.global_dice_ema == pytest.approx(ema)
    final = {s: state.final_global_eval[s]["global_pseudo_dice"] for s in honest}
    cases = {s: state.declared_cases[s] for s in honest}
    expected = sum(final[s] * cases[s] for s in honest) / sum(cases.values())
    assert state.final_global_dice == pytest.approx(expected)
    assert state.best_global_dice_ema is not None and state.best_global_dice_ema <= 1.0
