"""Plans from aggregates only == plans plain nnU-Net makes on the pooled data.

Real nnU-Net (2.8.1) planner on CPU, unchanged: once with the fingerprint merged from the
sites' sketches (synthetic lists), once with nnU-Net's own fingerprint of the pooled raw
dataset. Every plans field must be equal except ``dataset_name`` and the intensity
properties, which nnU-Net estimates by random sampling (compared with the tolerance of
tests/nnunet/test_fingerprint_vs_pooled.py). The demo federation is compared in that file.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from bench.pooled import make_pooled_dataset
from fednnunet.core.fingerprint_merge import DEFAULT_SKETCH, merge_fingerprint_summaries
from fednnunet.core.fingerprint_schema import SCHEMA
from fednnunet.core.geometry_sketch import GEOMETRY_SKETCH, summarize_geometry
from fednnunet.errors import DatasetError
from fednnunet.nnunet.compat import inline_pools, nnunet_env
from fednnunet.nnunet.demo_data import make_demo_dataset
from fednnunet.nnunet.fingerprint import extract_site_fingerprint

pytestmark = pytest.mark.nnunet


@pytest.fixture(autouse=True)
def _spawn() -> None:
    multiprocessing.set_start_method("spawn", force=True)


def plan_with(raw: Path, dataset_id: int, name: str, fingerprint: dict, pre: Path) -> dict:
    """nnU-Net's ExperimentPlanner on ``fingerprint`` (as written to dataset_fingerprint.json)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    (pre / name).mkdir(parents=True, exist_ok=True)
    (pre / name / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    with nnunet_env(raw, pre), inline_pools(True):
        plans = ExperimentPlanner(dataset_id).plan_experiment()
    return json.loads(json.dumps(plans))


def pooled_nnunet_fingerprint(raw: Path, dataset_id: int, name: str, pre: Path) -> dict:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )

    # inline: same nnU-Net code, no spawned workers (each costs ~2 CPU-s to start)
    with nnunet_env(raw, pre), inline_pools(True):
        fpe = DatasetFingerprintExtractor(dataset_id, num_processes=2)
        fpe.show_progress_bar = False
        return fpe.run(overwrite_existing=True)


def assert_plans_equal(ours: dict, pooled: dict) -> list[str]:
    """Equal except names; intensity properties within nnU-Net's sampling noise."""
    a, b = copy.deepcopy(ours), copy.deepcopy(pooled)
    fa = a.pop("foreground_intensity_properties_per_channel")
    fb = b.pop("foreground_intensity_properties_per_channel")
    a.pop("dataset_name"), b.pop("dataset_name")
    assert set(a["configurations"]) == set(b["configurations"])
    for cfg in b["configurations"]:
        assert a["configurations"][cfg] == b["configurations"][cfg], cfg
    assert a == b
    for ch in fb:
        for k in fb[ch]:
            assert abs(fa[ch][k] - fb[ch][k]) <= 2e-3 * abs(fb[ch][k]) + 2e-3 * fb[ch]["std"], k
    return sorted(b["configurations"])


def assert_no_case_rows(merged: dict, pooled_fp: dict) -> None:
    """No synthetic row is a case's shape; spacing values are pooled aggregates or absurd."""
    rows = {tuple(map(float, r)) for r in merged["shapes_after_crop"]}
    cases = {tuple(map(float, r)) for r in pooled_fp["shapes_after_crop"]}
    assert not rows & cases
    agg = merged["fednnunet"]["geometry"]
    sp = np.array(pooled_fp["spacings"])
    for ax in range(sp.shape[1]):
        allowed = {agg["median_spacing"][ax], agg["percentile_10_spacing"][ax]}
        for v in {r[ax] for r in merged["spacings"]} - allowed:
            assert v < sp[:, ax].min() / 100 or v > sp[:, ax].max() * 100


def run_federation(tmp: Path, sites: list[dict], pooled_id: int) -> tuple[dict, dict, dict]:
    raw, pre = tmp / "raw", tmp / "pre"
    ids = []
    for i, kw in enumerate(sites):
        ds = pooled_id + 1 + i
        make_demo_dataset(raw, ds, f"Site{i}", seed=i, **kw)
        ids.append(ds)
    pooled = make_pooled_dataset(raw, ids, pooled_id)
    summaries = [
        extract_site_fingerprint(ds, 2, raw, tmp / "site_pre", run_nnunet=False) for ds in ids
    ]
    merged = merge_fingerprint_summaries(summaries)
    assert merged["fednnunet"]["geometry"]["approximate"] == []
    pooled_fp = pooled_nnunet_fingerprint(raw, pooled_id, pooled.name, pre)
    ours = plan_with(raw, pooled_id, pooled.name, merged, tmp / "pre_merged")
    theirs = plan_with(raw, pooled_id, pooled.name, pooled_fp, pre)
    assert_no_case_rows(merged, pooled_fp)
    return ours, theirs, merged


def test_anisotropic_federation_plans_equal_pooled(tmp_path: Path) -> None:
    """One site at 5 mm slices: median 3 mm > 3 x 0.7 mm -> nnU-Net's 10th-percentile rule."""
    shape = (12, 48, 48)
    ours, theirs, merged = run_federation(
        tmp_path,
        [
            {"num_cases": 4, "spacing": (5.0, 0.7, 0.7), "shape": shape},
            {"num_cases": 3, "spacing": (3.0, 0.7, 0.7), "shape": shape},
            {"num_cases": 3, "spacing": (1.0, 0.7, 0.7), "shape": shape},
        ],
        960,
    )
    geo = merged["fednnunet"]["geometry"]
    assert geo["median_spacing"][0] == 3.0 and geo["target_spacing"][0] == 1.0  # rule fired
    assert assert_plans_equal(ours, theirs) == ["2d", "3d_fullres"]


def test_mixed_spacing_federation_plans_equal_pooled(tmp_path: Path) -> None:
    """Three protocols, non-round spacings, odd pooled case count (11)."""
    ours, theirs, _ = run_federation(
        tmp_path,
        [
            {"num_cases": 3, "spacing": (1.0, 1.0, 1.0), "shape": (20, 40, 40)},
            {"num_cases": 4, "spacing": (2.0, 0.5, 0.5), "shape": (12, 48, 40)},
            {"num_cases": 4, "spacing": (1.5, 0.7421875, 0.8), "shape": (16, 40, 44)},
        ],
        970,
    )
    assert assert_plans_equal(ours, theirs) == ["2d", "3d_fullres"]


def _geometry_only_fingerprint(cases: list[dict], intensity: dict) -> dict:
    """nnU-Net's fingerprint as its extractor would write it for cases of this geometry."""
    return {
        "spacings": [c["spacing"] for c in cases],
        "shapes_after_crop": [c["shape_after_crop"] for c in cases],
        "foreground_intensity_properties_per_channel": intensity,
        "median_relative_size_after_cropping": float(
            np.median([c["relative_size_after_cropping"] for c in cases])
        ),
    }


def test_large_federation_creates_3d_lowres_and_plans_equal_pooled(tmp_path: Path) -> None:
    """Large scans (about 340 x 470 x 470 voxels) -> nnU-Net adds 3d_lowres.

    Writing and cropping such volumes would cost minutes on CI, so the pooled fingerprint's
    geometry lists are given directly (what nnU-Net's extractor writes for such cases) and
    the site summaries are made from the same cases by the site's own sketch code.
    """
    rng = np.random.default_rng(5)
    protocols = [((1.0, 0.8, 0.8), 5), ((1.25, 0.9, 0.9), 4), ((0.8, 0.75, 0.75), 6)]
    sites = []
    for spacing, n in protocols:
        sites.append(
            [
                {
                    "spacing": list(spacing),
                    "shape_after_crop": [
                        int(v) for v in rng.integers([300, 420, 420], [380, 520, 520])
                    ],
                    "relative_size_after_cropping": float(rng.uniform(0.6, 0.95)),
                }
                for _ in range(n)
            ]
        )
    intensity = {"0": {"mean": 1.0, "median": 1.0, "std": 1.0, "min": 0.0, "max": 2.0,
                       "percentile_99_5": 1.9, "percentile_00_5": 0.1}}  # fmt: skip
    raw = tmp_path / "raw"
    folder = make_demo_dataset(raw, 980, "Large", num_cases=2, shape=(8, 16, 16))
    ds = json.loads((folder / "dataset.json").read_text())
    ds["numTraining"] = sum(len(s) for s in sites)  # the pooled count (batch size cap)
    (folder / "dataset.json").write_text(json.dumps(ds))

    summaries = []
    for i, cases in enumerate(sites):
        s = {
            "schema": SCHEMA,
            "dataset_name": f"Site{i}",
            "num_cases": len(cases),
            "channel_names": {"0": "MRI"},
            "labels": ds["labels"],
            "file_ending": ".nii.gz",
            "sketch": dict(DEFAULT_SKETCH),
            "geometry_sketch": dict(GEOMETRY_SKETCH),
            **summarize_geometry(cases),
            "intensity_per_channel": {
                "0": {
                    "weight": 0.0,
                    "num_voxels": 0,
                    "mean": 0.0,
                    "m2": 0.0,
                    "min": None,
                    "max": None,
                    "hist": {"zero": 0.0, "pos": {}, "neg": {}},
                }  # fmt: skip
            },
        }
        summaries.append(json.loads(json.dumps(s)))
    merged = merge_fingerprint_summaries(summaries)
    merged["foreground_intensity_properties_per_channel"] = intensity  # geometry is under test
    pooled_fp = _geometry_only_fingerprint([c for s in sites for c in s], intensity)
    ours = plan_with(raw, 980, folder.name, merged, tmp_path / "a")
    theirs = plan_with(raw, 980, folder.name, pooled_fp, tmp_path / "b")
    assert merged["fednnunet"]["geometry"]["approximate"] == []
    assert assert_plans_equal(ours, theirs) == [
        "2d",
        "3d_cascade_fullres",
        "3d_fullres",
        "3d_lowres",
    ]
    assert_no_case_rows(merged, pooled_fp)


def test_site_below_min_cohort_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "raw"
    make_demo_dataset(raw, 985, "Tiny", num_cases=2, shape=(8, 16, 16))
    with pytest.raises(DatasetError, match="2 training cases, fewer than the minimum cohort of 3"):
        extract_site_fingerprint(985, 1, raw, tmp_path / "pre", run_nnunet=False)
    monkeypatch.setenv("FEDNNUNET_MIN_CASES", "1")
    assert (
        extract_site_fingerprint(985, 1, raw, tmp_path / "pre", run_nnunet=False)["num_cases"] == 2
    )
    monkeypatch.setenv("FEDNNUNET_MIN_CASES", "5")  # site policy can raise it
    make_demo_dataset(raw, 986, "Four", num_cases=4, shape=(8, 16, 16))
    with pytest.raises(DatasetError, match="minimum cohort of 5"):
        extract_site_fingerprint(986, 1, raw, tmp_path / "pre", run_nnunet=False)
