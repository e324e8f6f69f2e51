"""nnU-Net planning at sites: FFE plans agree, AsymFedAvg plans differ, bad data fails clearly."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from fednnunet.errors import DatasetError, FedError
from fednnunet.nnunet.demo_data import make_demo_dataset, make_demo_federation
from fednnunet.nnunet.planning import plan_and_preprocess, plans_sha256


@pytest.fixture(autouse=True)
def _spawn() -> None:
    multiprocessing.set_start_method("spawn", force=True)


@pytest.fixture()
def nnunet_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    dirs = {v: tmp_path / v for v in ("raw", "preprocessed", "results")}
    for v, d in dirs.items():
        d.mkdir()
        monkeypatch.setenv(f"nnUNet_{v}", str(d))
    return dirs


def test_plans_sha256_ignores_site_fields_only() -> None:
    a = {
        "dataset_name": "Dataset901_A",
        "plans_name": "nnUNetPlans",
        "configurations": {"2d": {"batch_size": 12, "patch_size": [64, 64]}},
    }
    b = json.loads(json.dumps(a))
    b["dataset_name"] = "Dataset902_B"
    b["configurations"]["2d"]["batch_size"] = 7
    assert plans_sha256(a) == plans_sha256(b)
    b["configurations"]["2d"]["patch_size"] = [64, 48]
    assert plans_sha256(a) != plans_sha256(b)
    assert a["dataset_name"] == "Dataset901_A"  # input not mutated


@pytest.mark.nnunet
def test_ffe_same_fingerprint_same_plans_asym_differs(nnunet_dirs: dict[str, Path]) -> None:
    # Two sites with different spacing, intensities and case counts.
    make_demo_federation(nnunet_dirs["raw"], dataset_ids=(901,), num_cases=6)
    make_demo_dataset(nnunet_dirs["raw"], 902, "DemoSite2", num_cases=4, spacing=(3.0, 0.7, 0.7))

    own_a = plan_and_preprocess(901, ["2d"])
    own_b = plan_and_preprocess(902, ["2d"], verify_dataset_integrity=False)
    # AsymFedAvg: own fingerprints, different spacing -> different plans (and networks).
    assert plans_sha256(own_a) != plans_sha256(own_b)
    assert own_a["configurations"]["2d"]["spacing"] != own_b["configurations"]["2d"]["spacing"]

    # FFE: both sites plan from one (here: site A's) fingerprint -> identical plans.
    fp = json.loads(
        (
            nnunet_dirs["preprocessed"] / "Dataset901_DemoSite1" / "dataset_fingerprint.json"
        ).read_text()
    )
    ffe_a = plan_and_preprocess(901, ["2d"], fingerprint=fp, verify_dataset_integrity=False)
    ffe_b = plan_and_preprocess(902, ["2d"], fingerprint=fp, verify_dataset_integrity=False)
    assert plans_sha256(ffe_a) == plans_sha256(ffe_b)
    assert ffe_a["dataset_name"] != ffe_b["dataset_name"]
    written = json.loads(
        (
            nnunet_dirs["preprocessed"] / "Dataset902_DemoSite2" / "dataset_fingerprint.json"
        ).read_text()
    )
    assert written == fp

    # Idempotent: again gives the same plans and a complete preprocessed folder.
    pp = nnunet_dirs["preprocessed"] / "Dataset902_DemoSite2" / "nnUNetPlans_2d"
    before = sorted(p.name for p in pp.iterdir())
    again = plan_and_preprocess(902, ["2d"], fingerprint=fp, verify_dataset_integrity=False)
    assert again == ffe_b
    assert sorted(p.name for p in pp.iterdir()) == before
    assert len([n for n in before if n.endswith(".pkl")]) == 4


@pytest.mark.nnunet
def test_broken_datasets_raise_dataset_error(nnunet_dirs: dict[str, Path]) -> None:
    raw = nnunet_dirs["raw"]
    missing_label = make_demo_dataset(raw, 911, "NoLabel", num_cases=3)
    next((missing_label / "labelsTr").iterdir()).unlink()
    with pytest.raises(DatasetError, match="Dataset911_NoLabel") as exc:
        plan_and_preprocess(911, ["2d"])
    assert "\n" not in str(exc.value)

    bad_json = make_demo_dataset(raw, 912, "BadJson", num_cases=3)
    (bad_json / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json"):
        plan_and_preprocess(912, ["2d"])

    wrong_ending = make_demo_dataset(raw, 913, "Ending", num_cases=3)
    ds = json.loads((wrong_ending / "dataset.json").read_text())
    ds["file_ending"] = ".mha"
    (wrong_ending / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(DatasetError, match="Dataset913_Ending"):
        plan_and_preprocess(913, ["2d"])

    with pytest.raises(DatasetError, match="999"):
        plan_and_preprocess(999, ["2d"])


def test_unset_nnunet_paths_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(FedError, match="nnUNet_raw"):
        plan_and_preprocess(901, ["2d"])
