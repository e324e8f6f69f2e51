"""nnUNetv2_train flags in a spec: parsed like nnU-Net, mapped onto ExperimentOptions."""

from __future__ import annotations

import pytest

from fednnunet.errors import FedError
from fednnunet.messages import ExperimentOptions
from fednnunet.nnunet.train_args import parse_nnunet_train_args


def test_defaults_match_nnunetv2_train() -> None:
    out = parse_nnunet_train_args([])
    assert out["trainer"] == "nnUNetTrainer"
    assert out["plans_identifier"] == "nnUNetPlans"
    assert out["device"] == "cuda"
    assert out["export_npz"] is False
    assert set(out) == {"trainer", "plans_identifier", "device", "export_npz"}


def test_flags_map_onto_experiment_options() -> None:
    out = parse_nnunet_train_args(
        ["-tr", "nnUNetTrainerNoMirroring", "-p", "nnUNetResEncUNetMPlans", "-device", "cpu",
         "--npz", "-num_gpus", "1"]
    )  # fmt: skip
    fields = {k: v for k, v in out.items() if k in ExperimentOptions.model_fields}
    assert set(fields) == {"trainer", "plans_identifier", "device", "export_npz"}
    opts = ExperimentOptions(configuration="2d", fold=0, **fields)
    assert opts.trainer == "nnUNetTrainerNoMirroring"
    assert opts.plans_identifier == "nnUNetResEncUNetMPlans"
    assert opts.device == "cpu" and opts.export_npz is True


@pytest.mark.parametrize(
    "flag",
    [["--c"], ["--val"], ["--val_best"], ["--disable_checkpointing"], ["--use_compressed"]],
)  # fmt: skip
def test_flags_a_federation_cannot_honour_are_refused_with_the_reason(flag: list[str]) -> None:
    with pytest.raises(FedError, match=flag[0] + " is not"):
        parse_nnunet_train_args(flag)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--bogus", "-x", "3"], r"--bogus -x 3"),
        (["-num_gpus", "2"], "num_gpus 2"),
        (["-device", "tpu"], "-device"),
        (["-num_gpus", "two"], "invalid"),
        (["-tr"], "-tr"),
    ],
)
def test_rejections_name_the_problem(argv: list[str], match: str) -> None:
    with pytest.raises(FedError, match=match):
        parse_nnunet_train_args(argv)


def test_pretrained_weights_become_the_specs_initial_model() -> None:
    from fednnunet.spec import parse_spec

    spec = parse_spec(
        {
            "sites": ["a"],
            "train_args": ["-pretrained_weights", "/x/ckpt.pth", "-tr", "nnUNetTrainer"],
        }
    )
    assert spec.pretrained_weights == "/x/ckpt.pth"
    assert spec.options().trainer == "nnUNetTrainer"


def test_checkpoint_weights_are_read_without_unpickling_objects(tmp_path) -> None:
    import os

    import torch

    from fednnunet.nnunet.pretrained import checkpoint_weights

    good = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"_orig_mod.a.weight": torch.ones(2)}, "epoch": 3}, good)
    assert list(checkpoint_weights(good)) == ["a.weight"]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"network_weights": {"a": torch.ones(1)}, "x": Evil()}, bad)
    with pytest.raises(FedError, match="not a loadable checkpoint"):
        checkpoint_weights(bad)
    with pytest.raises(FedError, match="not found"):
        checkpoint_weights(tmp_path / "missing.pth")
