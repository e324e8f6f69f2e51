"""The fingerprint merge against numpy on the concatenated (pooled) data."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from fednnunet.core.fingerprint_merge import (
    DEFAULT_SKETCH,
    SCHEMA,
    merge_channel_summaries,
    merge_fingerprint_summaries,
    summarize_channel_cases,
    validate_compatible,
)
from fednnunet.core.geometry_sketch import GEOMETRY_SKETCH, summarize_geometry
from fednnunet.errors import DatasetError
from tests.support.reference import naive_average_fingerprint

ALPHA = DEFAULT_SKETCH["relative_accuracy"]
QS = {"percentile_00_5": 0.005, "median": 0.5, "percentile_99_5": 0.995}
NNUNET_KEYS = {
    "spacings",
    "shapes_after_crop",
    "foreground_intensity_properties_per_channel",
    "median_relative_size_after_cropping",
    "fednnunet",  # aggregates record; nnU-Net ignores it
}
STAT_KEYS = {"mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5"}


def site_summary(name: str, cases_per_channel: dict[str, list[np.ndarray]], **over) -> dict:
    """A full site summary from raw per-case arrays (geometry fields are synthetic)."""
    n = len(next(iter(cases_per_channel.values())))
    geometry = [
        {
            "spacing": [2.0 + len(name) * 0.1, 0.8, 0.8 + i * 0.01],
            "shape_after_crop": [20 + i, 40, 41],
            "relative_size_after_cropping": 0.3 + 0.01 * i + 0.001 * len(name),
        }
        for i in range(n)
    ]
    s = {
        "schema": SCHEMA,
        "dataset_name": name,
        "num_cases": n,
        "channel_names": {ch: f"mod{ch}" for ch in cases_per_channel},
        "labels": {"background": 0, "a": 1, "b": 2},
        "file_ending": ".nii.gz",
        "sketch": dict(DEFAULT_SKETCH),
        "geometry_sketch": dict(GEOMETRY_SKETCH),
        **summarize_geometry(geometry),
        "intensity_per_channel": {
            ch: summarize_channel_cases(cases) for ch, cases in cases_per_channel.items()
        },
    }
    s.update(over)
    return json.loads(json.dumps(s))  # what arrives over S3


def make_sites(rng: np.random.Generator, equal_sizes: bool = True) -> list[list[np.ndarray]]:
    """3 sites with very different intensity distributions (offsets, scales, tails, signs)."""
    gens = [
        lambda n: rng.normal(100.0, 15.0, n),
        lambda n: rng.normal(400.0, 60.0, n) * 1.7 + 50.0,
        lambda n: np.concatenate([rng.lognormal(3.0, 1.0, n - n // 4), -rng.gamma(2, 30, n // 4)]),
    ]
    sites = []
    for g in gens:
        sizes = [5000] * 4 if equal_sizes else list(rng.integers(200, 9000, 4))
        sites.append([g(int(n)).astype(np.float32) for n in sizes])
    return sites


def weighted_reference(cases: list[np.ndarray]) -> dict:
    """nnU-Net semantics: every case weighs 1, spread evenly over its foreground voxels."""
    x = np.concatenate([c.astype(np.float64) for c in cases])
    w = np.concatenate([np.full(c.size, 1.0 / c.size) for c in cases])
    mean = np.average(x, weights=w)
    order = np.argsort(x, kind="stable")
    xs, cw = x[order], np.cumsum(w[order])
    lower_q = {k: xs[np.searchsorted(cw, q * cw[-1] * (1 - 1e-12))] for k, q in QS.items()}
    return {
        "mean": mean,
        "std": math.sqrt(np.average((x - mean) ** 2, weights=w)),
        "min": x.min(),
        "max": x.max(),
        **lower_q,
    }


def assert_stats_match(stats: dict, ref: dict) -> None:
    assert stats["mean"] == pytest.approx(ref["mean"], rel=1e-9)
    assert stats["std"] == pytest.approx(ref["std"], rel=1e-9)
    assert stats["min"] == ref["min"] and stats["max"] == ref["max"]
    for k in QS:  # documented bound: |q_hat - q| <= alpha * |q| (plus min_abs near 0)
        bound = ALPHA * abs(ref[k]) * (1 + 1e-9) + DEFAULT_SKETCH["min_abs"]
        assert abs(stats[k] - ref[k]) <= bound, (k, stats[k], ref[k])


def test_merge_equal_case_sizes_matches_numpy_on_concatenation():
    sites = make_sites(np.random.default_rng(0), equal_sizes=True)
    merged = merge_fingerprint_summaries(
        [site_summary(f"s{i}", {"0": c}) for i, c in enumerate(sites)]
    )
    assert set(merged) == NNUNET_KEYS
    stats = merged["foreground_intensity_properties_per_channel"]["0"]
    assert set(stats) == STAT_KEYS
    # equal case sizes: nnU-Net's equal-per-case weighting is plain pooling
    x = np.concatenate([c for s in sites for c in s]).astype(np.float64)
    assert stats["mean"] == pytest.approx(np.mean(x), rel=1e-9)
    assert stats["std"] == pytest.approx(np.std(x), rel=1e-9)
    assert stats["min"] == x.min() and stats["max"] == x.max()
    xs = np.sort(x)
    for k, q in QS.items():
        # np.percentile interpolates between two order statistics; the sketch is within
        # alpha of the lower one, so it lies within alpha of that bracket.
        lo, hi = xs[max(math.ceil(q * x.size) - 1, 0)], xs[math.ceil(q * (x.size - 1))]
        ref = np.percentile(x, q * 100)
        assert lo <= ref <= hi or hi <= ref <= lo
        tol = ALPHA * max(abs(lo), abs(hi)) + (hi - lo)
        assert abs(stats[k] - ref) <= tol, (k, stats[k], ref)


def test_merge_unequal_case_sizes_matches_weighted_reference():
    sites = make_sites(np.random.default_rng(1), equal_sizes=False)
    merged = merge_fingerprint_summaries(
        [site_summary(f"s{i}", {"0": c}) for i, c in enumerate(sites)]
    )
    stats = merged["foreground_intensity_properties_per_channel"]["0"]
    assert_stats_match(stats, weighted_reference([c for s in sites for c in s]))


def test_multichannel_and_geometry_fields():
    rng = np.random.default_rng(2)
    sites = make_sites(rng)
    summaries = [
        site_summary(f"s{i}", {"0": c, "1": [v * -3.0 + 7.0 for v in c]})
        for i, c in enumerate(sites)
    ]
    merged = merge_fingerprint_summaries(summaries)
    assert set(merged["foreground_intensity_properties_per_channel"]) == {"0", "1"}
    # relative sizes: 12 distinct values, each alone in its bucket -> exact pooled median
    rel = [0.3 + 0.01 * i + 0.001 * 2 for i in range(4)] * 3
    assert merged["median_relative_size_after_cropping"] == float(np.median(rel))
    assert merged["fednnunet"]["geometry"]["num_cases"] == 12


def test_merge_is_order_independent():
    sites = make_sites(np.random.default_rng(3), equal_sizes=False)
    summaries = [site_summary(f"s{i}", {"0": c}) for i, c in enumerate(sites)]
    results = [merge_fingerprint_summaries(list(p)) for p in itertools.permutations(summaries)]
    first = results[0]
    for r in results[1:]:
        # fsum-based merge: intensity statistics are bitwise identical in any order
        assert (
            r["foreground_intensity_properties_per_channel"]
            == (first["foreground_intensity_properties_per_channel"])
        )
        assert (
            r["median_relative_size_after_cropping"] == first["median_relative_size_after_cropping"]
        )
        assert sorted(r["spacings"]) == sorted(first["spacings"])
        assert sorted(r["shapes_after_crop"]) == sorted(first["shapes_after_crop"])


def test_merging_sites_equals_summarizing_all_cases_at_once():
    sites = make_sites(np.random.default_rng(4), equal_sizes=False)
    per_site = merge_channel_summaries([summarize_channel_cases(c) for c in sites])
    at_once = summarize_channel_cases([c for s in sites for c in s])
    for k in ("weight", "mean", "m2", "min", "max", "num_voxels"):
        assert per_site[k] == pytest.approx(at_once[k], rel=1e-12)
    assert per_site["hist"]["pos"].keys() == at_once["hist"]["pos"].keys()


def test_cases_without_foreground_are_ignored_like_nnunet():
    rng = np.random.default_rng(5)
    cases = [rng.normal(0, 1, 100), np.array([]), rng.normal(5, 1, 300)]
    s = summarize_channel_cases(cases)
    assert s["weight"] == 2.0
    assert s["mean"] == pytest.approx((cases[0].mean() + cases[2].mean()) / 2, rel=1e-12)


def test_naive_average_of_site_stds_is_wrong():
    """Why the merge matters: averaging stds ignores the spread between site means."""
    sites = make_sites(np.random.default_rng(6))
    summaries = [site_summary(f"s{i}", {"0": c}) for i, c in enumerate(sites)]
    x = np.concatenate([c for s in sites for c in s]).astype(np.float64)
    naive = naive_average_fingerprint(summaries)["foreground_intensity_properties_per_channel"]
    ours = merge_fingerprint_summaries(summaries)["foreground_intensity_properties_per_channel"]
    assert abs(naive["0"]["std"] - np.std(x)) / np.std(x) > 0.2
    assert abs(ours["0"]["std"] - np.std(x)) / np.std(x) < 1e-9


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("labels", {"background": 0, "a": 1}),
        ("channel_names", {"0": "CT"}),
        ("file_ending", ".mha"),
        ("schema", "fednnunet.fingerprint_summary/0"),
    ],
)
def test_incompatible_sites_are_rejected(field, value):
    rng = np.random.default_rng(7)
    a = site_summary("alpha", {"0": [rng.normal(0, 1, 50)]})
    b = site_summary("beta", {"0": [rng.normal(0, 1, 50)]}, **{field: value})
    with pytest.raises(DatasetError) as ei:
        merge_fingerprint_summaries([a, b])
    msg = str(ei.value)
    assert "\n" not in msg and "beta" in msg
    assert field in msg or "schema" in msg


def test_empty_and_inconsistent_summaries_are_rejected():
    with pytest.raises(DatasetError):
        validate_compatible([])
    rng = np.random.default_rng(8)
    bad = site_summary("gamma", {"0": [rng.normal(0, 1, 50)] * 2}, num_cases=3)
    with pytest.raises(DatasetError, match="gamma"):
        validate_compatible([bad])


def test_sketch_bound_with_zeros_and_mixed_signs():
    rng = np.random.default_rng(9)
    cases = [
        np.concatenate([np.zeros(3000), rng.normal(0, 1e-3, 500), rng.normal(50, 5, 1500)]),
        np.concatenate([-rng.lognormal(5, 2, 700), rng.lognormal(-4, 3, 900)]),
    ]
    merged = merge_fingerprint_summaries([site_summary("z", {"0": cases})])
    assert_stats_match(
        merged["foreground_intensity_properties_per_channel"]["0"], weighted_reference(cases)
    )
