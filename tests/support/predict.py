"""Predict with plain nnU-Net from a results folder: proof that federated output is nnU-Net's."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from fednnunet.errors import FedError


def _model_dir_and_folds(
    path: Path, folds: Sequence[int | str]
) -> tuple[Path, tuple[int | str, ...]]:
    """Accept ``.../Trainer__Plans__config`` or one of its ``fold_N`` folders."""
    path = Path(path)
    if path.name.startswith("fold_"):
        f = path.name[len("fold_") :]
        return path.parent, (f if f == "all" else int(f),)
    return path, tuple(f if f == "all" else int(f) for f in folds)


def predict_folder(
    results_fold_dir_or_model_dir: Path,
    input_dir: Path,
    output_dir: Path,
    folds: Sequence[int | str] = (0,),
    device: str = "cpu",
    checkpoint_name: str = "checkpoint_final.pth",
    num_processes: int = 0,
) -> list[Path]:
    """Segment every case in ``input_dir`` (nnU-Net naming: ``CASE_0000.ext``).

    Uses ``nnUNetPredictor.initialize_from_trained_model_folder`` exactly as
    ``nnUNetv2_predict`` does; ``num_processes=0`` is ``-npp 0 -nps 0`` (no worker pools).
    A fold folder as first argument selects that fold. Returns the written segmentations.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model_dir, use_folds = _model_dir_and_folds(Path(results_fold_dir_or_model_dir), folds)
    for f in use_folds:
        ckpt = model_dir / f"fold_{f}" / checkpoint_name
        if not ckpt.is_file():
            raise FedError(f"no trained model: {ckpt} missing")
    file_ending = json.loads((model_dir / "dataset.json").read_text())["file_ending"]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=device.startswith("cuda"),
        device=torch.device(device),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds, checkpoint_name)
    if num_processes > 0:
        predictor.predict_from_files(
            str(input_dir),
            str(output_dir),
            save_probabilities=False,
            overwrite=True,
            num_processes_preprocessing=num_processes,
            num_processes_segmentation_export=num_processes,
        )
    else:
        predictor.predict_from_files_sequential(
            str(input_dir), str(output_dir), save_probabilities=False, overwrite=True
        )
    return sorted(output_dir.glob(f"*{file_ending}"))
