"""Pure trust rules: sender identity, case weights, architecture signatures, schemas."""

from __future__ import annotations

import math

import pytest
import torch

from fednnunet.core.aggregation import capped_weights, trimmed_mean
from fednnunet.core.identity import SenderPolicy
from fednnunet.core.update_checks import (
    Signature,
    common_signature,
    majority_signature,
    norm_outliers,
    signature_problems,
)
from fednnunet.messages import ExperimentOptions, SiteReport


def test_only_a_sites_own_broker_user_speaks_for_it():
    prod = SenderPolicy("coordinator", frozenset({"operator"}))
    assert prod.may_speak_for("site-a", "a")
    assert not prod.may_speak_for("site-b", "a")
    assert not prod.may_speak_for("", "a")  # a message without user_id
    assert not prod.may_speak_for("coordinator", "a")
    assert prod.is_operator("operator") and prod.is_operator("coordinator")
    assert not prod.is_operator("site-a") and not prod.is_operator("")
    dev = SenderPolicy("guest", frozenset(), shared_user_trusted=True)
    assert dev.may_speak_for("guest", "a") and not dev.may_speak_for("site-b", "a")


def _reference_capped(cases: dict[str, int], cap: float) -> dict[str, float]:
    """Water-filling written independently: raise a common scale t until the sum is 1."""
    lo, hi = 0.0, 1.0 / min(cases.values())
    for _ in range(200):
        t = (lo + hi) / 2
        if sum(min(cap, t * n) for n in cases.values()) < 1:
            lo = t
        else:
            hi = t
    return {s: min(cap, hi * n) for s, n in cases.items()}


@pytest.mark.parametrize(
    ("cases", "cap"),
    [({"a": 1, "b": 1, "c": 10**9}, 0.5), ({"a": 10, "b": 20, "c": 70}, 0.4),
     ({"a": 3, "b": 5, "c": 7, "d": 100}, 0.3), ({"a": 2, "b": 3}, 1.0)],
)  # fmt: skip
def test_capped_weights_match_an_independent_water_filling(cases, cap):
    got = capped_weights(cases, cap)
    want = _reference_capped(cases, cap)
    assert math.isclose(sum(got.values()), 1.0, abs_tol=1e-9)
    for site in cases:
        assert got[site] == pytest.approx(want[site], abs=1e-6)
    assert max(got.values()) <= cap + 1e-9


def test_without_a_cap_weights_are_case_proportional():
    assert capped_weights({"a": 1, "b": 3}) == {"a": 0.25, "b": 0.75}
    with pytest.raises(ValueError):
        capped_weights({"a": 0})


def test_trimmed_mean_ignores_one_outlier_per_coordinate():
    ups = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])},
           {"w": torch.tensor([1e9, -1e9])}]  # fmt: skip
    out = trimmed_mean(ups, ["w"], trim=1)
    assert torch.equal(out["w"], torch.tensor([3.0, 2.0]))  # the median of three
    with pytest.raises(ValueError):
        trimmed_mean(ups[:2], ["w"], trim=1)


def _sig(**tensors) -> Signature:
    aliases = tensors.pop("aliases", {})
    return Signature({k: (v, "F32") for k, v in tensors.items()}, aliases)


def test_ffe_updates_must_carry_exactly_the_reference_model():
    ref = _sig(a=(2, 2), b=(2,), aliases={"x.a": "a"})
    assert signature_problems(ref, ref, exact=True) == []
    assert "missing" in signature_problems(_sig(a=(2, 2), aliases={"x.a": "a"}), ref, True)[0]
    extra = _sig(a=(2, 2), b=(2,), c=(1,), aliases={"x.a": "a"})
    assert "unexpected" in signature_problems(extra, ref, True)[0]
    shape = _sig(a=(2, 3), b=(2,), aliases={"x.a": "a"})
    assert "shape" in signature_problems(shape, ref, True)[0]
    realiased = _sig(a=(2, 2), b=(2,), aliases={"x.a": "b"})
    assert "alias" in signature_problems(realiased, ref, True)[0]


def test_asym_updates_may_keep_local_layers_but_not_alias_a_shared_one():
    ref = _sig(a=(2, 2), aliases={})
    assert signature_problems(_sig(a=(2, 2), local=(9,)), ref, exact=False) == []
    sneaky = Signature({"local": ((2, 2), "F32")}, {"a": "local"})
    problems = signature_problems(sneaky, ref, exact=False)
    assert any("missing" in p for p in problems) and any("alias" in p for p in problems)


def test_first_round_reference_is_the_majority_or_the_common_layers():
    honest, odd = _sig(a=(2,), b=(3,)), _sig(a=(2,), b=(4,))
    assert majority_signature({"x": honest, "y": honest, "z": odd}) == honest
    assert majority_signature({"x": honest, "z": odd}) is None  # no majority: no decision
    common = common_signature([_sig(a=(2,), b=(3,), aliases={"c": "a"}), _sig(a=(2,), b=(4,))])
    assert dict(common.tensors) == {"a": ((2,), "F32")} and dict(common.aliases) == {}


def test_round_one_norm_screening_uses_the_median():
    assert set(norm_outliers({"a": 10.0, "b": 11.0, "c": 1e6})) == {"c"}
    assert norm_outliers({"a": 10.0, "b": 12.0}) == {}


def test_reports_keep_only_finite_bounded_metrics_and_short_errors():
    r = SiteReport(
        experiment_id="e", site_id="a", phase="validate", ok=False, error="x" * 5000,
        metrics={"mean_dice": float("nan"), "dice_1": 0.8, "inf": float("inf"), "none": None},
    )  # fmt: skip
    assert r.metrics == {"dice_1": 0.8}
    assert set(r.missing_metrics) == {"mean_dice", "inf", "none"}
    assert len(r.error) <= 500
    with pytest.raises(ValueError):
        SiteReport(experiment_id="e", site_id="a", phase="train", ok=True, num_cases=10**9)
    with pytest.raises(ValueError):
        SiteReport(
            experiment_id="e", site_id="a", phase="train", ok=True,
            metrics={f"m{i}": 1.0 for i in range(1000)},
        )  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value"),
    [("plans_identifier", "../../raw/Dataset901/dataset"), ("plans_identifier", "/etc/x"),
     ("configuration", "2d/../../x"), ("trainer", "os.system"), ("trainer", "a b")],
)  # fmt: skip
def test_names_that_become_paths_must_be_plain(field, value):
    with pytest.raises(ValueError):
        ExperimentOptions(**({"configuration": "2d", "fold": 0} | {field: value}))
