"""End to end with real nnU-Net on CPU: 3 sites, 2d, tiny epochs, real RabbitMQ/Redis/S3.

Each site worker and the coordinator are separate processes; every site ends
with a plain nnU-Net results folder that nnU-Net's own predictor loads.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import torch

from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import decode_weights
from fednnunet.cli.simulate import LocalFederation, submit, wait_for
from fednnunet.nnunet.demo_data import make_demo_dataset, make_demo_federation
from fednnunet.spec import parse_spec
from tests.support.nnunet_dirs import make_nnunet_dirs

pytestmark = [pytest.mark.integration, pytest.mark.nnunet]
# Unique site ids per test run: queues are per site, and another federation (a demo,
# a parallel session) may be using the plain dataset ids on the same broker.
_RUN = secrets.token_hex(2)
SITES = {f"s{_RUN}-{i}": i for i in (901, 902, 903)}
SITE_OF = {i: s for s, i in SITES.items()}


def _env(root: Path) -> dict[str, str]:
    return make_nnunet_dirs(root) | {"nnUNet_def_n_proc": "1"}


def _run(stack, tmp: Path, method: str, unique_id, rounds: int = 3, make_data=None, **more):
    env = _env(tmp)
    if make_data is None:
        make_demo_federation(Path(env["nnUNet_raw"]), list(SITES.values()), num_cases=8, seed=0)
    else:
        make_data(Path(env["nnUNet_raw"]))
    spec = parse_spec(
        {
            "experiment_id": unique_id(f"e2e-{method}-"),
            "sites": list(SITES),
            "method": method,
            "configuration": "2d",
            "fold": 0,
            "rounds": rounds,
            "iterations_per_epoch": 3,
            "val_iterations_per_epoch": 1,
            "device": "cpu",
            "heartbeat_timeout_s": 300,
        }
        | more
    )
    with LocalFederation(SITES, tmp / "logs", env=env) as fed:
        submit(stack, spec)
        state = wait_for(stack, spec.experiment_id, 900, on_update=lambda *_: fed.check_alive())
    assert state.phase == "done", state.error
    return env, state


def _fold_dir(env: dict[str, str], site: str) -> Path:
    dataset = SITES[site]
    (folder,) = Path(env["nnUNet_results"]).glob(
        f"Dataset{dataset}_*/nnUNetTrainer__nnUNetPlans__2d"
    )
    return folder / "fold_0"


def test_ffe_three_sites_end_to_end_and_plain_nnunet_predicts(stack, tmp_path, unique_id):
    env, state = _run(stack, tmp_path, "ffe", unique_id, finetune_epochs=1)
    assert len(set(state.plans_sha256.values())) == 1, "FFE sites must share one plan"
    assert [r.round for r in state.history] == [1, 2, 3]
    _check_federated_evaluation(stack, env, state)
    for site in SITES:
        fold = _fold_dir(env, site)
        assert (fold / "checkpoint_final.pth").is_file()
        summary = json.loads((fold / "validation" / "summary.json").read_text())
        dice = summary["foreground_mean"]["Dice"]
        assert 0.0 <= dice <= 1.0
        assert state.final_metrics[site]["mean_dice"] == pytest.approx(dice, abs=1e-6)

    # Every site's final model is the federation's last global model.
    store = ArtifactStore(stack)
    final_global = decode_weights(store.get_bytes(state.global_weights))
    ckpt = torch.load(
        _fold_dir(env, SITE_OF[902]) / "checkpoint_final.pth",
        map_location="cpu",
        weights_only=False,
    )  # a local file nnU-Net wrote, not network data
    for key, value in final_global.items():
        assert torch.allclose(ckpt["network_weights"][key], value), key

    # Plain nnU-Net predictor on one site's results folder.
    from tests.support.predict import predict_folder

    raw_site = next(Path(env["nnUNet_raw"]).glob("Dataset901_*"))
    inputs = tmp_path / "pred_in"
    inputs.mkdir()
    for img in sorted((raw_site / "imagesTr").glob("*_0000.nii.gz"))[:2]:
        (inputs / img.name).symlink_to(img)
    outputs = predict_folder(
        _fold_dir(env, SITE_OF[901]).parent, inputs, tmp_path / "pred_out", folds=(0,), device="cpu"
    )
    assert len(outputs) == 2 and all(p.exists() for p in outputs)


def _check_federated_evaluation(stack, env: dict[str, str], state) -> None:
    """Every site scored every round's incoming global and the last one; `status --json`
    shows it; checkpoint_best.pth is the global of the best EMA; fine-tuned models sit in
    their own trainer folder and the federated checkpoint is the final global."""
    from typer.testing import CliRunner

    from fednnunet.cli.main import app

    result = CliRunner().invoke(app, ["experiment", "status", state.experiment_id, "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    history = status["history"]
    assert [h["global_model"]["of_round"] for h in history] == [0, 1, 2]
    for entry in history:
        scores = entry["global_model"]["sites"]
        assert set(scores) == set(SITES) and all(0.0 <= v <= 1.0 for v in scores.values())
        cases = {s: state.declared_cases[s] for s in SITES}
        expected = sum(scores[s] * cases[s] for s in SITES) / sum(cases.values())
        assert entry["global_model"]["dice"] == pytest.approx(expected)
    final = status["global_model"]["final"]
    assert final["of_round"] == 3 and set(final["sites"]) == set(SITES)
    emas = [h["global_model"]["dice_ema"] for h in history]
    assert emas[0] == pytest.approx(history[0]["global_model"]["dice"])
    for prev, h in zip(emas, history[1:], strict=False):  # nnU-Net's EMA, recomputed here
        assert h["global_model"]["dice_ema"] == pytest.approx(
            0.9 * prev + 0.1 * h["global_model"]["dice"]
        )
    # Round 0's model has no object (no pretrained weights): the best is one of globals 1-3.
    best_round = status["global_model"]["best_round"]
    assert best_round in (1, 2, 3)
    store = ArtifactStore(stack)
    best_global = decode_weights(store.get_bytes(state.best_global))
    final_global = decode_weights(store.get_bytes(state.global_weights))
    for site in SITES:
        fold = _fold_dir(env, site)
        best = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)
        for key, value in best_global.items():
            assert torch.equal(best["network_weights"][key], value), (site, key)
        ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        for key, value in final_global.items():  # fine-tuning did not touch the global
            assert torch.equal(ckpt["network_weights"][key], value), (site, key)
        tuned = fold.parent.parent / "nnUNetTrainer_finetuned__nnUNetPlans__2d" / "fold_0"
        assert (tuned / "checkpoint_final.pth").is_file()
        assert 0.0 <= state.final_metrics[site]["finetuned_mean_dice"] <= 1.0
    # nnU-Net's predictor loads the best checkpoint as `nnUNetv2_predict -chk` would.
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        str(_fold_dir(env, SITE_OF[903]).parent), (0,), "checkpoint_best.pth"
    )


def _sites_with_different_architectures(raw: Path) -> None:
    """Site 903 has much larger slices, so nnU-Net plans a deeper 2d network there."""
    make_demo_federation(raw, [901, 902], num_cases=8, seed=0)
    make_demo_dataset(
        raw,
        903,
        "DemoSite903",
        num_cases=8,
        shape=(8, 192, 192),
        spacing=(3.0, 0.5, 0.5),
        intensity_scale=2.0,
        seed=3,
    )


def test_asymfedavg_averages_only_common_layers(stack, tmp_path, unique_id):
    env, state = _run(
        stack, tmp_path, "asym", unique_id, rounds=2, make_data=_sites_with_different_architectures
    )
    assert len(set(state.plans_sha256.values())) > 1, "demo sites should plan differently"
    store = ArtifactStore(stack)
    global_w = decode_weights(store.get_bytes(state.global_weights))
    last = state.history[-1]
    updates = {}
    for site in SITES:
        ref = store.stat(
            f"{stack.bucket_prefix}-site-{site}",
            f"{state.experiment_id}/train/r{last.round:05d}/{site}/update.safetensors",
        )
        updates[site] = decode_weights(store.get_bytes(ref))
    common = set.intersection(
        *(
            {
                k
                for k, v in u.items()
                if all(k in o and o[k].shape == v.shape for o in updates.values())
            }
            for u in updates.values()
        )
    )
    assert set(global_w) == common
    assert any(len(u) > len(global_w) for u in updates.values()), "some layers differ"
    for site in SITES:
        ckpt = torch.load(
            _fold_dir(env, site) / "checkpoint_final.pth", map_location="cpu", weights_only=False
        )["network_weights"]
        for key in common:  # common layers: the global value
            assert torch.allclose(ckpt[key], global_w[key]), (site, key)
    # Layers that differ stay local: the deeper site keeps its own extra stages.
    local_only = [k for k in updates[SITE_OF[903]] if k not in common]
    assert local_only
    ckpt903 = torch.load(
        _fold_dir(env, SITE_OF[903]) / "checkpoint_final.pth",
        map_location="cpu",
        weights_only=False,
    )["network_weights"]
    assert all(k in ckpt903 for k in local_only)
