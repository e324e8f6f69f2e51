"""Federated fingerprint (3 demo sites, merged) vs nnU-Net's own fingerprint of the pooled data.

Tolerances per field (measured values in the comments, seed 0):
- mean, std: rel 1e-3. Our merge is exact for nnU-Net's equal-per-case weighting; the
  difference is nnU-Net's own Monte-Carlo sampling (1e8 foreground voxels drawn with
  replacement) and its float32 arithmetic. Measured (seeds 0-2) <= 8.7e-5 (mean),
  <= 8.0e-5 (std).
- median, percentile_00_5, percentile_99_5: |diff| <= alpha * |value| + 2e-3 * pooled std:
  the documented sketch bound (alpha = 1e-3 relative) plus an allowance for nnU-Net's
  sampling noise. Measured (seeds 0-2): median <= 4.4e-4 rel, percentile_99_5 <= 9.1e-4
  rel (<= 3.2e-3 of the std; mostly sketch error), percentile_00_5 <= 4.6e-5 of the std
  (4.4e-3 rel, the value is close to 0).
- min, max: exact (nnU-Net's min/max of 1e8 samples with replacement hit the extremes of
  these small foregrounds; a larger dataset could make nnU-Net's sampled extremes less
  extreme than our exact ones).
- spacings, shapes_after_crop: never sent; the merged lists are synthetic, and the
  pooled medians/percentiles nnU-Net's planner reads from them are exact (so are the
  plans, compared field by field); median_relative_size_after_cropping: exact.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fednnunet.core.fingerprint_merge import merge_fingerprint_summaries
from fednnunet.nnunet.compat import nnunet_env
from fednnunet.nnunet.demo_data import make_demo_dataset
from fednnunet.nnunet.fingerprint import extract_site_fingerprint
from tests.nnunet.test_aggregate_planning import assert_no_case_rows, assert_plans_equal, plan_with
from tests.support.reference import naive_average_fingerprint

pytestmark = pytest.mark.nnunet

QUANTILE_KEYS = ("median", "percentile_00_5", "percentile_99_5")


@pytest.fixture(scope="module")
def fingerprints(demo_federation, tmp_path_factory):
    raw = demo_federation.raw_root
    site_pre = tmp_path_factory.mktemp("pre_sites")
    # Only the first site also runs nnU-Net's extractor (~10 s each on 2 cores).
    summaries = [
        extract_site_fingerprint(ds, 2, raw, site_pre, run_nnunet=(k == 0))
        for k, ds in enumerate(demo_federation.site_ids)
    ]
    pooled_pre = tmp_path_factory.mktemp("pre_pooled")
    with nnunet_env(raw, pooled_pre):
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
            DatasetFingerprintExtractor,
        )

        fpe = DatasetFingerprintExtractor(demo_federation.pooled_id, num_processes=2)
        fpe.show_progress_bar = False
        fpe.run(overwrite_existing=True)
    pooled_file = pooled_pre / demo_federation.pooled_folder.name / "dataset_fingerprint.json"
    pooled = json.loads(pooled_file.read_text())
    return {
        "summaries": summaries,
        "merged": merge_fingerprint_summaries(summaries),
        "pooled": pooled,
        "site_pre": site_pre,
        "pooled_pre": pooled_pre,
    }


def _props(fp: dict) -> dict:
    return fp["foreground_intensity_properties_per_channel"]["0"]


def test_site_summary_is_json_and_site_keeps_nnunet_fingerprint(fingerprints, demo_federation):
    s = fingerprints["summaries"][0]
    assert s["schema"] == "fednnunet.fingerprint_summary/2"
    assert s["num_cases"] == 8 and s["labels"] == {"background": 0, "sphere": 1, "cube": 2}
    assert json.loads(json.dumps(s, allow_nan=False)) == s
    # no per-case list leaves the site: only sketches whose masses add up to the case count
    assert not {"spacings", "shapes_after_crop", "relative_sizes_after_cropping"} & set(s)
    for field in ("spacing", "shape_after_crop", "extent_mm"):
        for axis in s[field]:
            assert sum(b[0] for b in axis.values()) == 8
    local = fingerprints["site_pre"] / demo_federation.site_folders[0].name
    nnunet_fp = json.loads((local / "dataset_fingerprint.json").read_text())
    geo = merge_fingerprint_summaries([s])["fednnunet"]["geometry"]
    assert geo["median_spacing"] == list(np.median(nnunet_fp["spacings"], 0))
    assert geo["median_shape_after_crop"] == list(np.median(nnunet_fp["shapes_after_crop"], 0))
    # the site's own nnU-Net statistics agree with its summary (same data, same weighting)
    ours = merge_fingerprint_summaries([s])
    assert _props(ours)["mean"] == pytest.approx(_props(nnunet_fp)["mean"], rel=1e-3)
    assert _props(ours)["std"] == pytest.approx(_props(nnunet_fp)["std"], rel=1e-3)


def test_merged_fingerprint_has_nnunet_structure(fingerprints):
    merged, pooled = fingerprints["merged"], fingerprints["pooled"]
    assert set(merged) == set(pooled) | {"fednnunet"}  # nnU-Net ignores the extra record
    assert set(merged["foreground_intensity_properties_per_channel"]) == set(
        pooled["foreground_intensity_properties_per_channel"]
    )
    assert set(_props(merged)) == set(_props(pooled))


def test_geometry_aggregates_match_pooled_exactly(fingerprints):
    merged, pooled = fingerprints["merged"], fingerprints["pooled"]
    geo = merged["fednnunet"]["geometry"]
    assert geo["approximate"] == [] and geo["num_cases"] == len(pooled["spacings"])
    assert geo["median_spacing"] == list(np.percentile(pooled["spacings"], 50, 0))
    assert geo["median_shape_after_crop"] == list(np.percentile(pooled["shapes_after_crop"], 50, 0))
    assert merged["median_relative_size_after_cropping"] == pytest.approx(
        pooled["median_relative_size_after_cropping"], rel=1e-12
    )
    assert_no_case_rows(merged, pooled)


def test_intensity_statistics_match_pooled(fingerprints):
    ours, ref = _props(fingerprints["merged"]), _props(fingerprints["pooled"])
    assert ours["mean"] == pytest.approx(ref["mean"], rel=1e-3)
    assert ours["std"] == pytest.approx(ref["std"], rel=1e-3)
    assert ours["min"] == pytest.approx(ref["min"], rel=1e-6)  # float32 in nnU-Net's json
    assert ours["max"] == pytest.approx(ref["max"], rel=1e-6)
    alpha = fingerprints["summaries"][0]["sketch"]["relative_accuracy"]
    for k in QUANTILE_KEYS:
        assert abs(ours[k] - ref[k]) <= alpha * abs(ref[k]) + 2e-3 * ref["std"], (
            k,
            ours[k],
            ref[k],
        )


def test_naive_averaging_is_measurably_worse(fingerprints):
    """The reference's merge (average of site stats) misses the between-site spread."""
    ref = _props(fingerprints["pooled"])
    ours = _props(fingerprints["merged"])
    naive = naive_average_fingerprint(fingerprints["summaries"])[
        "foreground_intensity_properties_per_channel"
    ]["0"]
    err_ours = abs(ours["std"] - ref["std"]) / ref["std"]
    err_naive = abs(naive["std"] - ref["std"]) / ref["std"]
    assert err_naive > 0.1 and err_naive > 100 * err_ours
    for k in ("min", "max", "percentile_00_5", "percentile_99_5"):
        assert abs(naive[k] - ref[k]) > 10 * abs(ours[k] - ref[k]) + 1e-9, k


def test_plans_from_aggregates_equal_pooled_plans(fingerprints, demo_federation, tmp_path):
    """Plans from the merged (aggregate-only) fingerprint equal nnU-Net's pooled plans."""
    name = demo_federation.pooled_folder.name
    raw, pid = demo_federation.raw_root, demo_federation.pooled_id
    ours = plan_with(raw, pid, name, fingerprints["merged"], tmp_path)
    theirs = plan_with(raw, pid, name, fingerprints["pooled"], tmp_path / "pooled")
    assert assert_plans_equal(ours, theirs) == ["2d", "3d_fullres"]


def test_demo_data_is_deterministic_and_valid(tmp_path, demo_federation):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    a = make_demo_dataset(tmp_path / "a", 950, "Det", num_cases=2, seed=3)
    b = make_demo_dataset(tmp_path / "b", 950, "Det", num_cases=2, seed=3)
    for fa in sorted(a.rglob("*.nii.gz")):
        assert fa.read_bytes() == (b / fa.relative_to(a)).read_bytes()
    verify_dataset_integrity(str(demo_federation.pooled_folder), num_processes=2)
    ds = json.loads((demo_federation.pooled_folder / "dataset.json").read_text())
    assert ds["numTraining"] == 24 and ds["labels"] == {"background": 0, "sphere": 1, "cube": 2}


def test_missing_dataset_is_one_line_dataset_error(tmp_path):
    from fednnunet.errors import DatasetError

    with pytest.raises(DatasetError) as ei:
        extract_site_fingerprint(977, 2, tmp_path / "raw", tmp_path / "pre")
    assert "977" in str(ei.value) and "\n" not in str(ei.value)
