"""A real (tiny) nnU-Net trainer kept alive across rounds: weights, resume, finish, predict."""

from __future__ import annotations

import copy
import json
import multiprocessing
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fednnunet.errors import FedError
from fednnunet.messages import ExperimentOptions
from fednnunet.nnunet.demo_data import make_demo_dataset
from fednnunet.nnunet.planning import plan_and_preprocess, plans_sha256
from fednnunet.nnunet.session import SIDECAR_NAME, FederatedTrainingSession
from tests.support.predict import predict_folder

pytestmark = pytest.mark.nnunet

# Three epochs in all (3 rounds of 1 epoch), two training iterations each, on the CPU.
TINY = dict(
    configuration="2d", device="cpu", rounds=3, iterations_per_epoch=2, val_iterations_per_epoch=1
)
RUNTIME = dict(da_processes=0, torch_threads=2)


def tiny(fold: int | str = 0, **options) -> ExperimentOptions:
    return ExperimentOptions(fold=fold, **TINY, **options)


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two sites (different spacing) planned FFE-style from site 901's fingerprint."""
    multiprocessing.set_start_method("spawn", force=True)
    root = tmp_path_factory.mktemp("nnunet")
    with pytest.MonkeyPatch.context() as mp:
        for v in ("raw", "preprocessed", "results"):
            (root / v).mkdir()
            mp.setenv(f"nnUNet_{v}", str(root / v))
        make_demo_dataset(root / "raw", 901, "SiteA", num_cases=8)
        make_demo_dataset(root / "raw", 902, "SiteB", num_cases=5, spacing=(3.0, 0.7, 0.7))
        a = plan_and_preprocess(901, ["2d"], verify_dataset_integrity=False)
        fp = json.loads(
            (root / "preprocessed" / "Dataset901_SiteA" / "dataset_fingerprint.json").read_text()
        )
        b = plan_and_preprocess(902, ["2d"], fingerprint=fp, verify_dataset_integrity=False)
        assert plans_sha256(a) == plans_sha256(b)
        yield root


@pytest.fixture()
def results(planned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh nnUNet_results per test (sessions write and resume there)."""
    for v in ("raw", "preprocessed"):
        monkeypatch.setenv(f"nnUNet_{v}", str(planned / v))
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    return tmp_path


def _alias_groups(sd: dict[str, torch.Tensor]) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for k, v in sd.items():
        if v.numel():
            groups.setdefault(v.data_ptr(), []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_initial_weights_across_sites(results: Path) -> None:
    with FederatedTrainingSession(901, tiny(0, seed=7), **RUNTIME) as a:
        wa = a.state_dict()
        assert a.num_training_cases() == 6  # 5-fold split of 8 cases
    with FederatedTrainingSession(902, tiny("all", seed=7), **RUNTIME) as b:
        wb = b.state_dict()
        assert b.num_training_cases() == 5  # fold "all": every case
        assert b.output_folder.name == "fold_all"
    with FederatedTrainingSession(902, tiny(1, seed=8), **RUNTIME) as c:
        wc = c.state_dict()
    assert _equal(wa, wb)
    assert not _equal(wa, wc)
    assert all(v.device.type == "cpu" for v in wa.values())
    # nnU-Net lists aliased tensors; state_dict() keeps them aliased (one copy per storage).
    groups = _alias_groups(wa)
    assert groups and any(any(k.startswith("decoder.encoder.") for k in g) for g in groups)


def test_rounds_resume_finish_and_plain_predict(results: Path, planned: Path) -> None:
    calls: list[tuple[int, int, int]] = []
    s1 = FederatedTrainingSession(901, tiny(0), run_id="run-1", **RUNTIME)
    try:
        assert s1.last_completed_round() == 0 and s1.current_epoch == 0
        m = s1.train_epochs(1, on_iteration=lambda *a: calls.append(a))
        assert calls == [(0, 1, 2), (0, 2, 2)]
        assert m["epoch"] == 1 and m["lr"] == pytest.approx(1e-2)
        assert {"train_loss", "val_loss"} <= m.keys()

        sd = s1.state_dict()
        groups = _alias_groups(sd)
        canonical = next(g for g in groups if any(k.startswith("encoder.") for k in g))
        enc_key = next(k for k in canonical if k.startswith("encoder."))
        head_key = next(k for k in sd if k.startswith("decoder.seg_layers.") and "weight" in k)
        modified = {k: v + 1.0 for k, v in sd.items()}
        del modified[enc_key]  # only its alias arrives: must still land in the shared storage
        modified[head_key] = torch.zeros(3, 3)  # wrong shape: skipped, stays local
        modified["not.in.network"] = torch.zeros(1)

        loaded = s1.load_global(modified)
        assert head_key not in loaded and "not.in.network" not in loaded
        assert enc_key in loaded
        after = s1.state_dict()
        assert torch.equal(after[head_key], sd[head_key])
        for k in loaded:
            assert torch.allclose(after[k], sd[k] + 1.0)
        live = s1._network().state_dict()
        for g in groups:
            assert len({live[k].data_ptr() for k in g}) == 1
            assert all(torch.equal(live[g[0]], live[k]) for k in g)

        s1.save_round_checkpoint(1)
        saved = s1.state_dict()
    finally:
        s1.close()
    fold_dir = results / "Dataset901_SiteA" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0"
    assert (fold_dir / "checkpoint_latest.pth").is_file()
    assert json.loads((fold_dir / SIDECAR_NAME).read_text())["round"] == 1

    # A restarted worker: new session object, same folders -> continues after round 1.
    s2 = FederatedTrainingSession(901, tiny(0), run_id="run-1", **RUNTIME)
    try:
        assert s2.last_completed_round() == 1 and s2.current_epoch == 1
        assert _equal(s2.state_dict(), saved)
        assert len(s2.trainer.optimizer.state) > 0  # momentum buffers came back too
        m2 = s2.train_epochs(2)
        assert m2["epoch"] == 3 and m2["lr"] < m["lr"]
        with pytest.raises(FedError, match="total_epochs"):
            s2.train_epochs(1)
        res = s2.finish(validation_processes=2)
    finally:
        s2.close()
    assert (fold_dir / "checkpoint_final.pth").is_file()
    assert not (fold_dir / "checkpoint_latest.pth").exists()
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert set(res["dice_per_class"]) == {"1", "2"}
    assert 0.0 <= res["mean_dice"] <= 1.0
    assert res["mean_dice"] == pytest.approx(summary["foreground_mean"]["Dice"])

    # Another run in the same folder does not pick up this run's state.
    with FederatedTrainingSession(901, tiny(0), run_id="run-2", **RUNTIME) as s3:
        assert s3.last_completed_round() == 0 and s3.current_epoch == 0

    # Plain nnU-Net inference on the result (trainer found by name, checkpoint_final.pth).
    inp = results / "predict_in"
    inp.mkdir()
    for f in sorted((planned / "raw" / "Dataset902_SiteB" / "imagesTr").iterdir())[:2]:
        shutil.copy(f, inp / f.name)
    outs = predict_folder(Path(res["results_folder"]), inp, results / "predict_out", folds=(0,))
    assert [p.name for p in outs] == ["siteb_000.nii.gz", "siteb_001.nii.gz"]
    import SimpleITK as sitk

    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(outs[0])))
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(inp / "siteb_000_0000.nii.gz")))
    assert seg.shape == img.shape
    assert set(np.unique(seg)) <= {0, 1, 2}


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_global_scoring_best_checkpoint_and_finetuning(results: Path, planned: Path) -> None:
    """The incoming global is scored with nnU-Net's validation step without entering the
    training log; checkpoint_best.pth is a given global that nnU-Net's predictor loads;
    fine-tuning writes its own trainer folder and leaves the federated model untouched."""
    fold_dir = results / "Dataset901_SiteA" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0"
    with FederatedTrainingSession(901, tiny(0), run_id="run-b", **RUNTIME) as s:
        initial = s.state_dict()
        log_before = copy.deepcopy(s.trainer.logger.get_checkpoint())
        scores = s.evaluate_pseudo_dice()
        assert set(scores) >= {"pseudo_dice", "val_loss"}
        assert all(0.0 <= scores[k] <= 1.0 for k in scores if k.startswith("pseudo_dice"))
        assert set(scores) - {"pseudo_dice", "val_loss"} <= {"pseudo_dice_1", "pseudo_dice_2"}
        assert s.trainer.logger.get_checkpoint() == log_before  # no trace in nnU-Net's log
        assert _equal(s.state_dict(), initial)

        s.train_epochs(2)
        ema = s.trainer.logger.get_value("ema_fg_dice", step=None)
        assert len(ema) == 2  # the trainer's own epochs only
        assert not (fold_dir / "checkpoint_best.pth").exists()  # no *local* best

        full = s.validate_current("fednnunet_global_eval/round_00002", validation_processes=1)
        assert 0.0 <= full["mean_dice"] <= 1.0 and set(full["dice_per_class"]) == {"1", "2"}
        assert (fold_dir / "fednnunet_global_eval/round_00002/validation/summary.json").is_file()
        assert not (fold_dir / "validation").exists()

        s.train_epochs(1)
        final = s.state_dict()
        s.finish(run_validation=False)  # nnU-Net's validation: covered above
        best_path = s.write_best_checkpoint(initial, 0.25)
        assert _equal(s.state_dict(), final)  # the live model is still the final one
    final_sha = _sha256(fold_dir / "checkpoint_final.pth")
    best = torch.load(best_path, map_location="cpu", weights_only=False)  # local file
    assert best["_best_ema"] == 0.25 and best["trainer_name"] == "nnUNetTrainer"
    assert _equal(dict(best["network_weights"]), initial)

    _predictor_loads(fold_dir.parent, "checkpoint_best.pth", initial)

    # Fine-tuning from the final global in a folder of its own, at a tenth of the LR.
    with FederatedTrainingSession(
        901,
        ExperimentOptions(fold=0, **(TINY | {"rounds": 1})),
        run_id="run-b",
        trainer_folder="nnUNetTrainer_finetuned",
        lr_scale=0.1,
        **RUNTIME,
    ) as tuned:
        assert tuned.output_folder.parent.name == "nnUNetTrainer_finetuned__nnUNetPlans__2d"
        tuned.load_global(final)
        m = tuned.train_epochs(1)
        assert m["lr"] == pytest.approx(1e-3)
        tuned.finish(run_validation=False)
        tuned_weights = tuned.state_dict()
    assert not _equal(tuned_weights, final)
    assert _sha256(fold_dir / "checkpoint_final.pth") == final_sha  # the global: untouched
    federated = torch.load(
        fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    assert _equal(dict(federated["network_weights"]), final)
    tuned_dir = fold_dir.parent.parent / "nnUNetTrainer_finetuned__nnUNetPlans__2d" / "fold_0"
    ckpt = torch.load(tuned_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainer"  # the class nnU-Net's predictor builds
    _predictor_loads(tuned_dir.parent, "checkpoint_final.pth", tuned_weights)


def _predictor_loads(model_dir: Path, checkpoint: str, weights: dict) -> None:
    """nnU-Net's predictor loads the checkpoint as ``nnUNetv2_predict -chk`` does."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), (0,), checkpoint)
    assert _equal(dict(predictor.list_of_parameters[0]), weights)
