"""No input bricks the coordinator: NaN-proof state, fenced writes, ticking through a
broken experiment (real Redis and S3)."""

from __future__ import annotations

import json
import math

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fednnunet.adapters.redis_state import LockLost, RedisState
from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.coordinator.service import Coordinator
from fednnunet.core import state_machine as sm
from fednnunet.messages import ExperimentOptions, SiteReport
from fednnunet.spec import parse_spec

pytestmark = pytest.mark.integration


@pytest.fixture
def isolated(stack, unique_id, tmp_path):
    ns = unique_id("fedtest-adv-")
    settings = stack.model_copy(update={"redis_namespace": ns, "bucket_prefix": ns})
    r = RedisState.from_settings(settings)
    sent = []
    coordinator = Coordinator(
        settings, r, ArtifactStore(settings, cache_dir=tmp_path / "c"), sent.append,
        render_plots=False,
    )  # fmt: skip
    yield settings, r, coordinator, sent
    keys = list(r.r.scan_iter(f"{ns}:*"))
    if keys:
        r.r.delete(*keys)


def _spec(exp: str, **more):
    return parse_spec({"experiment_id": exp, "sites": ["a", "b"], "method": "asym",
                       "configuration": "2d", "rounds": 2, **more})  # fmt: skip


def test_a_state_that_once_held_nan_still_loads(isolated, unique_id):
    _, r, coordinator, _ = isolated
    exp = unique_id("exp-nan-")
    coordinator.start(_spec(exp))
    raw = json.loads(r.r.get(r._k(exp, "state")))
    # What an older version stored for nnU-Net's NaN Dice (JSON has no NaN: null).
    raw["final_metrics"] = {"a": {"mean_dice": None, "dice_1": 0.5}}
    raw["history"] = [{"round": 1, "participants": ["a"], "metrics": {"a": {"loss": None}}}]
    r.r.set(r._k(exp, "state"), json.dumps(raw))
    state = r.load(exp, with_history=True)  # the embedded history moves to its own hash
    assert state.final_metrics == {"a": {"dice_1": 0.5}}
    assert state.rounds_closed == 1 and state.history[0].metrics == {"a": {}}
    assert [x.round for x in r.history(exp, 0, 1)] == [1]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    metrics=st.dictionaries(
        st.text(min_size=1, max_size=20),
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none(), st.integers()),
        max_size=8,
    ),
    error=st.text(max_size=2000),
)
def test_random_states_round_trip_through_redis_and_the_journal(isolated, metrics, error):
    settings_, r, coordinator, _ = isolated
    exp = "exp-prop"
    state = sm.new_experiment(
        exp, ["a", "b"], ExperimentOptions(method="asym", rounds=3, quorum=2), 0.0
    )
    report = SiteReport(
        experiment_id=exp, site_id="a", phase="plan", ok=True, metrics=metrics, error=error
    )
    sm.apply_report(state, report, 1.0)
    state.final_metrics = {"a": report.metrics}
    state.error = error
    r.save(state)
    loaded = r.load(exp)
    assert loaded == state
    assert all(math.isfinite(v) for v in loaded.final_metrics["a"].values())
    snapshot = json.loads(json.dumps(state.model_dump(mode="json"), allow_nan=False))
    assert sm.ExperimentState.model_validate(snapshot) == state  # the S3 journal's JSON


def test_a_coordinator_that_lost_its_lock_cannot_overwrite_the_newer_state(isolated, unique_id):
    _, r, coordinator, _ = isolated
    exp = unique_id("exp-fence-")
    coordinator.start(_spec(exp))
    with r.locked(exp, timeout_s=1.0) as stale:
        state = r.load(exp)
        # The holder pauses past its lock's expiry; another coordinator takes over.
        r.r.delete(r._k(exp, "lock"))
        with r.locked(exp) as fresh:
            newer = r.load(exp)
            newer.ignored_reports = 42
            r.save(newer, fresh)
        state.ignored_reports = 7
        with pytest.raises(LockLost):
            r.save(state, stale)
    assert r.load(exp).ignored_reports == 42


def test_failed_lock_renewal_is_fatal_for_the_holder(isolated, unique_id):
    _, r, coordinator, _ = isolated
    exp = unique_id("exp-renew-")
    coordinator.start(_spec(exp))
    with r.locked(exp, timeout_s=0.6) as fence:
        r.r.delete(r._k(exp, "lock"))  # expired while we were paused
        import time

        time.sleep(0.5)  # the renewer notices at its next renewal
        assert fence.lost
        with pytest.raises(LockLost):
            r.save(r.load(exp), fence)


def test_one_broken_experiment_does_not_stop_the_others_ticking(isolated, unique_id):
    _, r, coordinator, sent = isolated
    broken, healthy = unique_id("exp-broken-"), unique_id("exp-ok-")
    coordinator.start(_spec(broken))
    coordinator.start(_spec(healthy))
    r.r.set(r._k(broken, "state"), '{"experiment_id": "garbage", "sites": 7}')
    state = r.load(healthy)
    state.sites_status["a"].state = "pending"  # e.g. restored from the journal
    r.save(state)
    sent.clear()
    coordinator.tick()  # must not raise
    assert [t.site_id for t in sent if t.experiment_id == healthy] == ["a"]


def test_redispatch_paths_end_after_max_attempts(isolated, unique_id):
    _, r, coordinator, sent = isolated
    exp = unique_id("exp-attempts-")
    coordinator.start(_spec(exp, max_attempts=2, heartbeat_timeout_s=1, quorum=1))
    state = r.load(exp)
    for site in ("a", "b"):  # both "running", then silent forever
        state.sites_status[site].state, state.sites_status[site].started_at = "running", 0.0
        state.sites_status[site].attempt = 2
    r.save(state)
    coordinator.advance(exp)
    state = r.load(exp)
    assert state.phase == "failed"
    assert "no heartbeat after 2 attempt(s)" in state.error


def test_refusals_are_counted_per_experiment(isolated, unique_id):
    _, r, coordinator, _ = isolated
    exp = unique_id("exp-count-")
    coordinator.start(_spec(exp))
    forged = SiteReport(experiment_id=exp, site_id="a", phase="plan", ok=True)
    coordinator.on_report(forged, sender="site-b")
    coordinator.on_report(forged, sender="")
    counts, last = r.refusals(exp)
    assert counts == {"forged": 2} and last[0]["sender"] == ""
    assert r.load(exp).sites_status["a"].state == "queued"  # the forgery changed nothing


def test_redis_url_is_redacted_in_errors():
    from fednnunet.errors import ServiceUnreachable

    state = RedisState("redis://:s3cret@127.0.0.1:1/0")
    with pytest.raises(ServiceUnreachable) as err:
        state.ping()
    assert "s3cret" not in str(err.value)
    assert isinstance(err.value.__cause__, redis.RedisError)
