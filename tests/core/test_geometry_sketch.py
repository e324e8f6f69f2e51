"""Geometry sketches: the synthetic fingerprint makes nnU-Net's formulas give the pooled values.

The reference below is nnU-Net 2.8.1's planner arithmetic on the pooled per-case lists
(``determine_fullres_target_spacing``, ``compute_new_shape``, ``np.median``); the real
planner is compared in tests/nnunet/test_aggregate_planning.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fednnunet.core.fingerprint_merge import merge_fingerprint_summaries
from fednnunet.core.fingerprint_schema import FingerprintRejected, SummaryLimits
from fednnunet.core.geometry_sketch import (
    add_noise,
    order_statistic,
    sketch_values,
    target_spacing,
)
from tests.core.test_fingerprint_merge import site_summary


def planner_reference(spacings: list, shapes: list) -> dict:
    """What nnU-Net's ExperimentPlanner derives from the per-case lists."""
    sp = np.vstack(spacings)
    target = np.percentile(sp, 50, 0)
    target_size = np.percentile(np.vstack(shapes), 50, 0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    if target[worst] > 3 * max(target[others]) and target_size[worst] * 3 < min(
        target_size[others]
    ):
        t = np.percentile(sp[:, worst], 10)
        if t < max(target[others]):
            t = max(max(target[others]), t) + 1e-5
        target[worst] = t
    new = [
        np.array([int(round(i / j * k)) for i, j, k in zip(s, target, h, strict=True)])
        for s, h in zip(spacings, shapes, strict=True)
    ]
    return {
        "target": target,
        "new_median": np.median(new, 0),
        "median_spacing": np.median(spacings, 0),
        "median_shape": np.median(shapes, 0),
    }


def with_geometry(name: str, spacings: list, shapes: list, rng) -> dict:
    cases = [rng.normal(0, 1, 30) for _ in spacings]
    s = site_summary(name, {"0": cases})
    from fednnunet.core.geometry_sketch import summarize_geometry

    geo = [
        {"spacing": sp, "shape_after_crop": sh, "relative_size_after_cropping": 0.5}
        for sp, sh in zip(spacings, shapes, strict=True)
    ]
    s.update(json.loads(json.dumps(summarize_geometry(geo))))
    return s


def federation(kind: str, rng) -> list[tuple[list, list]]:
    """Per-site (spacings, shapes) lists; protocol spacings, per-case shapes."""
    protocols = {
        "iso": [(1.0, 1.0, 1.0), (1.0, 0.9, 0.9), (1.2, 0.8, 0.8)],
        "aniso": [(5.0, 0.7, 0.7), (1.0, 0.7, 0.7), (1.5, 0.8, 0.8)],
        "mixed": [(2.0, 0.8, 0.8), (3.0, 0.7, 0.7), (2.5, 1.0, 1.0)],
    }[kind]
    sites = []
    for k, sp in enumerate(protocols):
        n = int(rng.integers(3, 12))
        base = np.array([24, 200, 200]) if kind == "aniso" and k == 0 else np.array([60, 90, 90])
        shapes = [[int(v) for v in base * rng.uniform(0.7, 1.1, 3)] for _ in range(n)]
        sites.append(([list(sp)] * n, shapes))
    return sites


@pytest.mark.parametrize("kind", ["iso", "aniso", "mixed"])
@pytest.mark.parametrize("seed", range(4))
def test_synthetic_lists_reproduce_pooled_planner_inputs(kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sites = federation(kind, rng)
    summaries = [with_geometry(f"s{i}", sp, sh, rng) for i, (sp, sh) in enumerate(sites)]
    merged = merge_fingerprint_summaries(summaries)
    pooled_sp = [s for sp, _ in sites for s in sp]
    pooled_sh = [h for _, sh in sites for h in sh]
    ref = planner_reference(pooled_sp, pooled_sh)
    got = planner_reference(merged["spacings"], merged["shapes_after_crop"])
    for key in ref:
        assert np.array_equal(ref[key], got[key]), (key, ref[key], got[key])
    assert merged["fednnunet"]["geometry"]["approximate"] == []
    # No row of the synthetic shapes is a case of any site (shapes vary per case). Spacings
    # are protocol values shared by many cases: every synthetic value is a pooled aggregate
    # (10th percentile or median, which the plans publish anyway) or far outside the data.
    rows_sh = {tuple(r) for r in merged["shapes_after_crop"]}
    assert not rows_sh & {tuple(map(float, h)) for h in pooled_sh}
    agg = merged["fednnunet"]["geometry"]
    sp = np.array(pooled_sp)
    for ax in range(3):
        allowed = {agg["median_spacing"][ax], agg["percentile_10_spacing"][ax]}
        for v in {r[ax] for r in merged["spacings"]} - allowed:
            assert v < sp[:, ax].min() / 100 or v > sp[:, ax].max() * 100


def test_anisotropic_federation_triggers_the_10th_percentile_rule() -> None:
    # 5 mm slices at one site dominate the median -> target from the 10th percentile
    spacings = [[5.0, 0.7, 0.7]] * 9 + [[1.0, 0.7, 0.7]] * 3
    shapes = [[20, 200, 200]] * 12
    ref = planner_reference(spacings, shapes)
    assert ref["target"][0] == pytest.approx(1.0)
    assert target_spacing([5.0, 0.7, 0.7], [1.0, 0.7, 0.7], [20, 200, 200])[0] == 1.0


def test_order_statistic_exact_for_homogeneous_buckets_and_edges() -> None:
    sk = sketch_values([1.1, 1.1, 1.1005, 2.0], 1e-3)  # 1.1 and 1.1005 share a bucket
    assert len(sk) == 2
    assert order_statistic(sk, 0, 4) == (1.1, 1.1, 1.1)  # first of the bucket: its min
    est, lo, hi = order_statistic(sk, 1, 4)
    assert lo < hi and lo <= est <= hi  # middle of a mixed bucket: bounded, flagged
    assert order_statistic(sk, 2, 4)[0] == 1.1005  # last of the bucket: its max
    assert order_statistic(sk, 3, 4) == (2.0, 2.0, 2.0)


def test_noise_keeps_total_and_bucket_set_subset() -> None:
    sk = sketch_values([0.7] * 5 + [5.0] * 3, 1e-3)
    noisy = add_noise(sk, 0.5, np.random.default_rng(0))
    assert sum(b[0] for b in noisy.values()) == pytest.approx(8.0)
    assert set(noisy) <= set(sk)


def _bad(mutate) -> dict:
    rng = np.random.default_rng(0)
    s = with_geometry("mallory", [[1.0, 1.0, 1.0]] * 4, [[10, 10, 10]] * 4, rng)
    mutate(s)
    return s


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda s: s.update(num_cases=10**9), "num_cases|cap|holds"),
        (lambda s: s["spacing"][0].update({"-7000": [4.0, 0.0009, 0.0009]}), "outside"),
        (lambda s: s["spacing"][0].update({"0": [float("nan"), 1.0, 1.0]}), "finite"),
        (lambda s: s["shape_after_crop"][1].update({"0": [4.0, 1.0, 1.0]}), "holds 8"),
        (lambda s: s["intensity_per_channel"]["0"].update(mean=float("inf")), "mean"),
        (lambda s: s["intensity_per_channel"]["0"]["hist"].update(zero=1e30), "mass"),
        (lambda s: s["intensity_per_channel"]["0"]["hist"].update(zero=-1.0), "zero"),
        (lambda s: s.update(spacings=[[1.0, 1.0, 1.0]] * 4), "spacings"),
        (lambda s: s["extent_mm"].pop(), "axes"),
        (lambda s: s.update(num_cases="many"), "num_cases"),
    ],
)
def test_bad_summaries_are_refused_with_one_line(mutate, words: str) -> None:
    good = _bad(lambda s: None)
    bad = _bad(mutate)
    with pytest.raises(FingerprintRejected) as ei:
        merge_fingerprint_summaries([good, bad])
    msg = str(ei.value)
    assert "\n" not in msg and "mallory" in msg
    assert any(w in msg for w in words.split("|")), msg


def test_case_cap_is_configurable() -> None:
    s = _bad(lambda s: None)
    merge_fingerprint_summaries([s])
    with pytest.raises(FingerprintRejected, match="cap of 3"):
        merge_fingerprint_summaries([s], SummaryLimits(max_cases=3))


def test_small_noise_passes_the_schema_and_leaves_planner_inputs_unchanged() -> None:
    """bench/b8 (P-noise): Laplace scale 0.05 (cases) on geometry masses left plans unchanged."""
    from fednnunet.core.geometry_sketch import summarize_geometry

    rng = np.random.default_rng(11)
    sites = federation("mixed", rng)
    exact = [with_geometry(f"s{i}", sp, sh, rng) for i, (sp, sh) in enumerate(sites)]
    noisy = []
    for s, (sp, sh) in zip(exact, sites, strict=True):
        geo = [
            {"spacing": a, "shape_after_crop": b, "relative_size_after_cropping": 0.5}
            for a, b in zip(sp, sh, strict=True)
        ]
        n = dict(s, noise={"scale": 0.05})
        n.update(json.loads(json.dumps(summarize_geometry(geo, noise=0.05, rng=rng))))
        noisy.append(n)
    a = merge_fingerprint_summaries(exact)["fednnunet"]["geometry"]
    b = merge_fingerprint_summaries(noisy)["fednnunet"]["geometry"]
    assert any(
        m[0] % 1 for s in noisy for ax in s["shape_after_crop"] for m in ax.values()
    )  # masses really are noisy
    for key in ("median_spacing", "target_spacing", "median_shape_after_resampling"):
        assert a[key] == b[key], key
