"""Federated evaluation in the pure state machine: case-weighted global Dice, nnU-Net's
EMA, the best global, and what a site may not claim. Expected values are computed here
by hand (nnU-Net's logger: ema = 0.9 * ema + 0.1 * value; best: strictly higher EMA)."""

from __future__ import annotations

import math

import pytest

from fednnunet.core import state_machine as sm
from fednnunet.core.global_eval import case_weighted_dice
from fednnunet.messages import ArtifactRef, ExperimentOptions, SiteReport

CASES = {"a": 2, "b": 6}


def ref(n: int) -> ArtifactRef:
    return ArtifactRef(bucket="g", key=f"r{n}", sha256=f"{n:064x}", size=1)


def _training(rounds: int, initial: ArtifactRef | None = None) -> sm.ExperimentState:
    options = ExperimentOptions(method="asym", rounds=rounds, quorum=2)
    s = sm.new_experiment("e", ["a", "b"], options, 0.0, global_weights=initial)
    for site in "ab":
        s.sites_status[site].report = SiteReport(
            experiment_id="e", site_id=site, phase="plan", ok=True, num_cases=CASES[site]
        )
        s.sites_status[site].state = "done"
    assert sm.apply_plans_checked(s, 0.0) is None and s.declared_cases == CASES
    return s


def _close_round(s: sm.ExperimentState, r: int, scores: dict[str, float]) -> sm.RoundRecord:
    record = sm.RoundRecord(
        round=r,
        participants=list(scores),
        global_weights=ref(r),
        metrics={
            site: {"global_pseudo_dice": v, "pseudo_dice": 0.99} for site, v in scores.items()
        },
        num_cases={site: CASES[site] for site in scores},
    )
    sm.apply_aggregated(s, record, float(r))
    return record


def _evaluate(s: sm.ExperimentState, scores: dict[str, float]) -> None:
    assert s.phase == "evaluate"
    for site, v in scores.items():
        report = SiteReport(
            experiment_id="e",
            site_id=site,
            phase="evaluate",
            ok=True,
            num_cases=CASES[site],
            metrics={"global_pseudo_dice": v},
        )
        assert sm.apply_report(s, report, 9.0)
    assert sm.phase_complete(s, 9.0)
    sm.apply_evaluated(s, 9.0)
    assert s.phase == "validate"


def test_case_weighted_global_dice_ema_and_best_global():
    s = _training(rounds=3, initial=ref(0))
    # Globals 0, 1, 2 are scored at the start of rounds 1, 2, 3; global 3 in evaluate.
    scores = [{"a": 0.2, "b": 0.4}, {"a": 0.9, "b": 0.8}, {"a": 0.1, "b": 0.1}]
    records = [_close_round(s, r, sc) for r, sc in enumerate(scores, start=1)]
    _evaluate(s, {"a": 0.5, "b": 0.7})

    weighted = [(2 * a + 6 * b) / 8 for a, b in ((0.2, 0.4), (0.9, 0.8), (0.1, 0.1), (0.5, 0.7))]
    emas = [weighted[0]]
    for value in weighted[1:]:
        emas.append(0.9 * emas[-1] + 0.1 * value)
    for record, dice, ema in zip(records, weighted, emas, strict=False):
        assert record.global_dice == pytest.approx(dice)
        assert record.global_dice_ema == pytest.approx(ema)
    assert s.final_global_dice == pytest.approx(weighted[3])
    assert s.global_dice_ema == pytest.approx(emas[3])
    best = max(range(4), key=lambda i: (emas[i], -i))  # first of equal EMAs, as nnU-Net
    assert s.best_global_round == best == 1  # global 1: the EMA's peak, not the last
    assert s.best_global == ref(1) and s.best_global_dice_ema == pytest.approx(emas[1])


def test_unscored_initial_model_moves_the_ema_but_is_never_the_best():
    s = _training(rounds=1)  # no pretrained weights: round 0's model has no object
    _close_round(s, 1, {"a": 0.9, "b": 0.9})
    assert s.global_dice_ema == pytest.approx(0.9) and s.best_global is None
    _evaluate(s, {"a": 0.1, "b": 0.1})
    # The only global with an object is the last: it is the best although its EMA fell.
    assert s.best_global == ref(1) and s.best_global_round == 1


@pytest.mark.parametrize("claim", [1.5, -0.1, math.inf, math.nan])
def test_a_site_cannot_steer_the_best_model_with_an_impossible_dice(claim):
    metrics = {"a": {"global_pseudo_dice": claim}, "b": {"global_pseudo_dice": 0.4}}
    assert case_weighted_dice(metrics, CASES, ["a", "b"]) == pytest.approx(0.4)


def test_quarantined_sites_scores_do_not_count():
    s = _training(rounds=2, initial=ref(0))
    record = sm.RoundRecord(
        round=1,
        participants=["b"],
        quarantined={"a": "norm"},
        global_weights=ref(1),
        metrics={"a": {"global_pseudo_dice": 1.0}, "b": {"global_pseudo_dice": 0.3}},
        num_cases=CASES,
    )
    sm.apply_aggregated(s, record, 1.0)
    assert record.global_dice == pytest.approx(0.3)
