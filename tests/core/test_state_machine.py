from fednnunet.core import state_machine as sm
from fednnunet.messages import ArtifactRef, ExperimentOptions, SiteReport

REF = ArtifactRef(bucket="b", key="k", sha256="0" * 64, size=1)


def H(letter: str) -> str:  # noqa: N802 - a plans hash made of one letter's code
    return f"{ord(letter):064x}"


def report(site, phase, round_=0, ok=True, **kw):
    return SiteReport(
        experiment_id="e",
        site_id=site,
        phase=phase,
        round=round_,
        ok=ok,
        artifact=REF,
        num_cases=4,
        **kw,
    )


def new(method="ffe", rounds=2, quorum=3, deadline=None):
    options = ExperimentOptions(
        method=method,
        rounds=rounds,
        quorum=quorum,
        round_deadline_s=deadline,
        heartbeat_timeout_s=10,
    )
    return sm.new_experiment("e", ["a", "b", "c"], options, now=0.0)


def dispatch_all(state, now=1.0):
    actions = sm.next_actions(state, now)
    assert all(isinstance(a, sm.Dispatch) for a in actions)
    for a in actions:
        sm.apply_dispatched(state, a, now)
    return actions


def test_ffe_walks_through_every_phase():
    s = new()
    assert s.phase == "fingerprint"
    assert len(dispatch_all(s)) == 3
    for site in "abc":
        assert sm.apply_report(s, report(site, "fingerprint"), 2.0)
    (merge,) = sm.next_actions(s, 2.0)
    assert isinstance(merge, sm.MergeFingerprints) and len(merge.reports) == 3
    sm.apply_merged(s, REF, 3.0)
    assert s.phase == "plan"
    dispatch_all(s)
    for site in "abc":
        sm.apply_report(s, report(site, "plan", plans_sha256=H("x")), 4.0)
    assert sm.phase_complete(s, 4.0)
    assert sm.apply_plans_checked(s, 4.0) is None
    assert (s.phase, s.round) == ("train", 1)
    for r in (1, 2):
        dispatch_all(s)
        for site in "abc":
            sm.apply_report(s, report(site, "train", r), 5.0)
        (agg,) = sm.next_actions(s, 5.0)
        assert isinstance(agg, sm.Aggregate) and agg.round == r
        sm.apply_aggregated(
            s, sm.RoundRecord(round=r, participants=list("abc"), global_weights=REF), 6.0
        )
    assert s.phase == "evaluate"
    dispatch_all(s)
    for site in "abc":
        sm.apply_report(s, report(site, "evaluate", metrics={"global_pseudo_dice": 0.5}), 6.5)
    assert sm.next_actions(s, 6.5) == [] and sm.phase_complete(s, 6.5)
    sm.apply_evaluated(s, 6.5)
    assert s.phase == "validate"
    dispatch_all(s)
    for site in "abc":
        sm.apply_report(s, report(site, "validate", metrics={"mean_dice": 0.9}), 7.0)
    assert sm.phase_complete(s, 7.0)
    sm.apply_validated(s, 7.0)
    assert s.phase == "done" and s.final_metrics["a"]["mean_dice"] == 0.9
    assert sm.next_actions(s, 8.0) == []


def test_ffe_refuses_different_plans():
    s = new()
    sm.apply_merged(s, REF, 0.0)
    dispatch_all(s)
    for site, h in zip("abc", "xxy", strict=True):
        sm.apply_report(s, report(site, "plan", plans_sha256=H(h)), 1.0)
    failure = sm.apply_plans_checked(s, 1.0)
    assert isinstance(failure, sm.Fail) and "different plans" in failure.reason


def test_asym_starts_with_planning_and_accepts_different_plans():
    s = new(method="asym")
    assert s.phase == "plan"
    dispatch_all(s)
    for site, h in zip("abc", "xyz", strict=True):
        sm.apply_report(s, report(site, "plan", plans_sha256=H(h)), 1.0)
    assert sm.apply_plans_checked(s, 1.0) is None and s.phase == "train"


def _to_train(quorum=2, deadline=30.0):
    s = new(method="asym", quorum=quorum, deadline=deadline)
    dispatch_all(s)
    for site in "abc":
        sm.apply_report(s, report(site, "plan", plans_sha256=H("h")), 1.0)
    sm.apply_plans_checked(s, 1.0)
    dispatch_all(s, 1.0)
    return s


def test_quorum_and_deadline_close_round_without_slow_site_and_ignore_its_late_update():
    s = _to_train()
    sm.apply_report(s, report("a", "train", 1), 5.0)
    sm.apply_report(s, report("b", "train", 1), 6.0)
    assert sm.next_actions(s, 10.0, {"c": 9.0}) == []  # before the deadline: wait for c
    (agg,) = sm.next_actions(s, 40.0, {"c": 39.0})
    assert isinstance(agg, sm.Aggregate) and agg.late == ("c",)
    sm.apply_aggregated(
        s, sm.RoundRecord(round=1, participants=["a", "b"], late=["c"], global_weights=REF), 40.0
    )
    assert s.round == 2
    assert not sm.apply_report(s, report("c", "train", 1), 41.0)  # stale: not mixed in
    assert s.ignored_reports == 1
    # c rejoins round 2 with the current global weights
    assert {a.site for a in sm.next_actions(s, 41.0)} == {"a", "b", "c"}


def test_duplicate_and_unknown_reports_are_ignored():
    s = _to_train()
    assert sm.apply_report(s, report("a", "train", 1), 2.0)
    assert not sm.apply_report(s, report("a", "train", 1), 3.0)
    assert not sm.apply_report(s, report("zzz", "train", 1), 3.0)


def test_dead_worker_is_redispatched_after_heartbeat_timeout():
    s = _to_train()
    sm.apply_heartbeat(s, "a", "train", 1, 2.0)
    assert s.sites_status["a"].state == "running"
    assert sm.next_actions(s, 5.0, {"a": 4.0}) == []
    (again,) = sm.next_actions(s, 30.0, {"a": 4.0})
    assert again == sm.Dispatch("a", "train", 1, 2)


def test_failures_retry_then_fail_experiment_below_quorum():
    s = _to_train(quorum=3)
    for attempt in range(1, 4):
        sm.apply_report(s, report("a", "train", 1, ok=False, error="boom"), 2.0)
        actions = sm.next_actions(s, 2.0)
        if attempt < 3:
            assert actions == [sm.Dispatch("a", "train", 1, attempt + 1)]
            sm.apply_dispatched(s, actions[0], 2.0)
    assert isinstance(actions[0], sm.Fail)
    # The site was reached and its task raised: the reason says where it failed.
    assert actions[0].reason == "train failed at 1 site(s), 3 needed: a: boom"


def test_stop_after_fingerprint_and_cancel():
    s = sm.new_experiment("e", ["a"], ExperimentOptions(rounds=1, stop_after="fingerprint"), 0.0)
    sm.apply_merged(s, REF, 1.0)
    assert s.phase == "done"
    s2 = new()
    sm.apply_cancelled(s2, 1.0)
    assert s2.phase == "cancelled" and sm.next_actions(s2, 2.0) == []


def test_decisions_are_pure():
    s = _to_train()
    before = s.model_dump_json()
    sm.next_actions(s, 100.0)
    assert s.model_dump_json() == before


def test_non_retryable_failure_fails_at_once_with_the_site_error():
    s = new()
    dispatch_all(s)
    sm.apply_report(
        s, report("b", "fingerprint", ok=False, error="Dataset902: broken", retryable=False), 2.0
    )
    (fail,) = sm.next_actions(s, 2.0)
    assert isinstance(fail, sm.Fail)
    assert fail.reason == "fingerprint failed at 1 site(s), 3 needed: b: Dataset902: broken"


def test_lost_queued_task_is_resent_when_the_worker_reports_idle():
    s = _to_train()  # dispatched at t=1.0
    assert sm.next_actions(s, 5.0, {}, {"a": 4.0}) == []  # idle beat before the grace: wait
    assert sm.next_actions(s, 30.0, {}, {}) == []  # no idle beat (busy or down): wait
    (again,) = sm.next_actions(s, 30.0, {}, {"a": 1.0 + sm.IDLE_GRACE_S + 1})
    assert again == sm.Dispatch("a", "train", 1, 2)
