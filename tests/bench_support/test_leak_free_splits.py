"""The leak-free split helper of bench/: no model trains on a case it is scored on.

Pure file work on the demo raw data (no services, no training).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.pooled import (
    foreground_dice_of_cases,
    leak_free_splits,
    make_pooled_dataset,
    pooled_case_name,
    pooled_dice_by_site,
    raw_case_names,
    read_splits,
    site_of_pooled_case,
    write_splits,
)
from fednnunet.nnunet.demo_data import make_demo_federation

SITES = (901, 902, 903)
POOLED = 910


@pytest.fixture(scope="module", params=[False, True], ids=["default", "hard"])
def federation(request, tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    folders = make_demo_federation(raw, SITES, num_cases=8, seed=0, hard=request.param)
    make_pooled_dataset(raw, SITES, POOLED)
    return raw, folders


def _nnunet_format(splits) -> None:
    """What nnU-Net's generate_crossval_split returns and do_split reads back."""
    assert isinstance(splits, list) and len(splits) == 5
    for fold in splits:
        assert set(fold) == {"train", "val"}
        assert all(isinstance(c, str) for part in fold.values() for c in part)
        assert not set(fold["train"]) & set(fold["val"])


def test_site_splits_are_nnunets_own(federation):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    raw, folders = federation
    splits = leak_free_splits(raw, SITES)
    for ds, folder in zip(SITES, folders, strict=True):
        expected = generate_crossval_split(sorted(raw_case_names(folder)), seed=12345, n_splits=5)
        assert splits[ds] == [
            {"train": list(map(str, f["train"])), "val": list(map(str, f["val"]))} for f in expected
        ]


def test_no_evaluation_case_in_any_training_set(federation, tmp_path):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    raw, _ = federation
    splits = leak_free_splits(raw, SITES, POOLED)
    pre = tmp_path / "pre"
    write_splits(pre, raw, splits)
    written = {
        ds: load_json(str(next(pre.glob(f"Dataset{ds}_*")) / "splits_final.json"))
        for ds in (*SITES, POOLED)
    }
    assert written == splits == {ds: read_splits(pre, raw, ds) for ds in (*SITES, POOLED)}
    for s in written.values():
        _nnunet_format(s)

    pooled_cases = set(raw_case_names(next(raw.glob(f"Dataset{POOLED}_*"))))
    for k in range(5):
        # Every model trained for fold k: each site's own (FFE, AsymFedAvg, local-only)
        # and the pooled one (centralized).
        training_sets = [set(written[POOLED][k]["train"])] + [
            {pooled_case_name(ds, c) for c in written[ds][k]["train"]} for ds in SITES
        ]
        for ds in SITES:
            evaluation = {pooled_case_name(ds, c) for c in written[ds][k]["val"]}
            assert evaluation
            for train in training_sets:
                assert not evaluation & train, (k, ds, evaluation & train)
        # Pooled fold = union of the site folds; all pooled cases, each once.
        assert set(written[POOLED][k]["val"]) == {
            pooled_case_name(ds, c) for ds in SITES for c in written[ds][k]["val"]
        }
        assert set(written[POOLED][k]["train"]) | set(written[POOLED][k]["val"]) == pooled_cases
    assert sorted(c for f in written[POOLED] for c in f["val"]) == sorted(pooled_cases)


def test_nnunet_default_pooled_split_would_leak(federation):
    """Why the helper exists: nnU-Net's own split of the pooled cases mixes the sites' folds."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    raw, _ = federation
    splits = leak_free_splits(raw, SITES)
    default = generate_crossval_split(
        sorted(raw_case_names(next(raw.glob(f"Dataset{POOLED}_*")))), seed=12345, n_splits=5
    )
    site_val = {pooled_case_name(ds, c) for ds in SITES for c in splits[ds][0]["val"]}
    assert site_val & set(map(str, default[0]["train"]))


def test_pooled_names_map_back(federation):
    raw, folders = federation
    pooled = next(raw.glob(f"Dataset{POOLED}_*"))
    site_cases = {ds: set(raw_case_names(f)) for ds, f in zip(SITES, folders, strict=True)}
    for name in raw_case_names(pooled):
        ds, case = site_of_pooled_case(name)
        assert case in site_cases[ds]
        src = next(raw.glob(f"Dataset{ds}_*")) / "labelsTr" / f"{case}.nii.gz"
        assert (pooled / "labelsTr" / f"{name}.nii.gz").read_bytes() == src.read_bytes()
    with pytest.raises(ValueError):
        site_of_pooled_case("demosite1_000")


def test_dice_by_site_matches_nnunet_arithmetic():
    """Per-site Dice of a pooled validation summary = nnU-Net's foreground_mean per site."""
    rng = np.random.default_rng(0)
    cases = []
    for ds in SITES:
        for i in range(3):
            cube = float("nan") if (ds, i) == (901, 0) else float(rng.uniform())
            cases.append(
                {
                    "reference_file": f"/gt/{pooled_case_name(ds, f'c_{i:03d}')}.nii.gz",
                    "metrics": {"1": {"Dice": float(rng.uniform())}, "2": {"Dice": cube}},
                }
            )
    summary = {"metric_per_case": cases, "mean": {"1": {}, "2": {}}}
    by_site = pooled_dice_by_site(summary)
    assert set(by_site) == set(SITES)
    for ds in SITES:
        mine = [c for c in cases if f"d{ds}_" in c["reference_file"]]
        lab1 = np.mean([c["metrics"]["1"]["Dice"] for c in mine])
        lab2 = np.nanmean([c["metrics"]["2"]["Dice"] for c in mine])
        assert math.isclose(by_site[ds], (lab1 + lab2) / 2)
    everything = foreground_dice_of_cases(json.loads(json.dumps(summary)))
    assert math.isclose(
        everything,
        np.mean(
            [
                np.mean([c["metrics"]["1"]["Dice"] for c in cases]),
                np.nanmean([c["metrics"]["2"]["Dice"] for c in cases]),
            ]
        ),
    )


def test_hard_federation_differs_in_spacing_intensity_and_class_balance(tmp_path):
    import SimpleITK as sitk

    folders = make_demo_federation(tmp_path, SITES, seed=0, hard=True)
    spacings, medians, cube_share, sizes = [], [], [], []
    for folder in folders:
        labels = sorted((folder / "labelsTr").glob("*.nii.gz"))
        sizes.append(len(labels))
        first = sitk.ReadImage(
            str(folder / "imagesTr" / labels[0].name.replace(".nii", "_0000.nii"))
        )
        spacings.append(first.GetSpacing())
        img = sitk.GetArrayFromImage(first)
        medians.append(float(np.median(img[img != 0])))
        with_cube = [2 in sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in labels]
        cube_share.append(sum(with_cube) / len(with_cube))
    assert len(set(spacings)) == 3 and len(set(sizes)) == 3
    assert max(medians) > 3 * min(medians)
    assert max(cube_share) - min(cube_share) >= 0.3  # class balance differs
