"""One nnU-Net trainer kept alive across federated rounds inside a long-lived site worker.

``nnUNetv2_train`` builds a trainer, runs ``run_training`` to the end and exits. Federated
training interleaves local epochs with weight exchange, so this session builds the very
same trainer (class found by name, normal nnU-Net folders), keeps it - network, optimizer
momentum, poly-LR position, data loaders, logger - between rounds, and runs each epoch
with the trainer's own hooks in ``run_training``'s order. Results land in the normal
``nnUNet_results`` layout, so plain ``nnUNetv2_predict`` works on them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fednnunet.errors import DatasetError, FedError, PolicyRefusal
from fednnunet.messages import ExperimentOptions
from fednnunet.nnunet import compat
from fednnunet.settings import require_nnunet_paths, resolve_under

SIDECAR_NAME = "fednnunet_round.json"


def resolve_trainer_class(name: str) -> type:
    """The nnU-Net trainer class of that name; refused (never retried) unless it is
    nnUNetTrainer or a subclass (nnU-Net's lookup returns *any* attribute by that name)."""
    try:
        cls = compat.resolve_trainer_class(name)
    except LookupError as exc:
        raise PolicyRefusal(f"trainer {name!r} is not an nnU-Net trainer class: {exc}") from None
    if not compat.is_nnunet_trainer(cls):
        raise PolicyRefusal(f"trainer {name!r} is not a subclass of nnUNetTrainer")
    return cls


def _parse_fold(fold: int | str) -> int | str:
    if fold == "all":
        return "all"
    try:
        return int(fold)
    except (TypeError, ValueError) as exc:
        raise FedError(f"fold must be an integer or 'all', got {fold!r}") from exc


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FedError(f"device {device!r} requested but CUDA is not available here")


def _load_plans(dataset_id: int, options: ExperimentOptions) -> tuple[dict, dict, str]:
    """(plans, dataset.json, dataset name) of the planned, preprocessed local dataset."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    preprocessed = require_nnunet_paths("nnUNet_preprocessed")["nnUNet_preprocessed"]
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_id)
    except (RuntimeError, AssertionError) as exc:
        raise DatasetError(f"dataset {dataset_id}: {exc}") from exc
    pp_base = preprocessed / dataset_name
    plans_file = resolve_under(pp_base, f"{options.plans_identifier}.json")
    if not plans_file.is_file():
        raise FedError(f"{plans_file} missing: run planning/preprocessing first")
    plans = json.loads(plans_file.read_text())
    if options.configuration not in plans["configurations"]:
        raise FedError(
            f"configuration {options.configuration!r} not in {plans_file.name} "
            f"(available: {', '.join(plans['configurations'])})"
        )
    return plans, json.loads((pp_base / "dataset.json").read_text()), dataset_name


def _fold_folder(
    dataset_name: str, trainer_cls: type, plans: dict, options: ExperimentOptions
) -> Path:
    """The folder nnU-Net derives in nnUNetTrainer.__init__ (checked once it is built)."""
    results = require_nnunet_paths("nnUNet_results")["nnUNet_results"]
    return (
        results
        / dataset_name
        / f"{trainer_cls.__name__}__{plans['plans_name']}__{options.configuration}"
        / f"fold_{_parse_fold(options.fold)}"
    )


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    """Drop NaN/Inf (e.g. pseudo Dice without foreground): JSON carries no NaN."""
    out = {}
    for k, v in metrics.items():
        with contextlib.suppress(TypeError, ValueError):
            f = float(v)
            if math.isfinite(f):
                out[k] = f
    return out


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset())


class FederatedTrainingSession:
    """A plain nnU-Net trainer driven epoch by epoch, resumable at round boundaries."""

    def __init__(
        self,
        dataset_id: int,
        options: ExperimentOptions,
        *,
        torch_threads: int | None = None,
        da_processes: int | None = None,
        compile_network: bool = False,
        run_id: str | None = None,
        trainer_folder: str | None = None,
        lr_scale: float = 1.0,
    ) -> None:
        """Build (or resume) the trainer; ``run_id`` guards against resuming another run's files.

        ``options``: the experiment's, as validated (nnU-Net trains ``rounds *
        local_epochs`` epochs in all). ``da_processes`` sets ``nnUNet_n_proc_DA`` only while
        the data loaders are built (0: augmentation in this process). ``torch_threads``
        caps intra-op threads so that several sites on one machine do not oversubscribe it.
        ``trainer_folder``: results under ``<trainer_folder>__<plans>__<configuration>``
        instead of the trainer's own name (a fine-tuned model beside the federated one);
        ``lr_scale`` multiplies the trainer's initial learning rate.
        """
        compat.require_tested_nnunet()
        _check_device(options.device)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.export_npz = options.export_npz
        self.run_id = run_id
        plans, dataset_json, dataset_name = _load_plans(dataset_id, options)
        trainer_cls = resolve_trainer_class(options.trainer)
        if trainer_folder is not None:
            trainer_cls = compat.renamed_trainer_class(trainer_cls, trainer_folder)
        if not 0 < lr_scale <= 1:
            raise FedError(f"lr_scale must be in (0, 1], got {lr_scale}")
        fold_dir = _fold_folder(dataset_name, trainer_cls, plans, options)
        self._sidecar_path = fold_dir / SIDECAR_NAME
        sidecar, resume_from = self._resume_point(fold_dir)
        self.trainer = compat.new_trainer(
            trainer_cls,
            plans,
            options.configuration,
            _parse_fold(options.fold),
            dataset_json,
            options.device,
            continue_training=resume_from is not None,
        )
        if Path(self.trainer.output_folder) != fold_dir:
            raise FedError(f"unexpected nnU-Net output folder {self.trainer.output_folder}")
        compat.set_schedule(
            self.trainer,
            total_epochs=options.rounds * options.local_epochs,
            iterations_per_epoch=options.iterations_per_epoch,
            val_iterations_per_epoch=options.val_iterations_per_epoch,
        )
        compat.scale_initial_lr(self.trainer, lr_scale)  # before initialize() builds the SGD
        self._completed_round = int(sidecar["round"]) if sidecar else 0
        self._finished = bool(sidecar and sidecar.get("finished"))
        self._closed = False
        self._initialize(options.seed, compile_network, resume_from, sidecar)
        if not self._finished:
            da = None if da_processes is None else str(da_processes)
            with compat.temporary_env(nnUNet_n_proc_DA=da):
                self.trainer.on_train_start()
        tr_keys, _ = self.trainer.do_split()
        self._num_training_cases = len(tr_keys)

    def _resume_point(self, fold_dir: Path) -> tuple[dict[str, Any] | None, Path | None]:
        """This run's sidecar and the checkpoint to resume from (neither: a fresh start)."""
        sidecar = self._read_sidecar()
        resume_from = None
        if sidecar is not None:
            if sidecar.get("finished") and (fold_dir / "checkpoint_final.pth").is_file():
                resume_from = fold_dir / "checkpoint_final.pth"
            elif (fold_dir / "checkpoint_latest.pth").is_file():
                resume_from = fold_dir / "checkpoint_latest.pth"
        if resume_from is None:
            self._sidecar_path.unlink(missing_ok=True)
            sidecar = None
        return sidecar, resume_from

    def _initialize(
        self,
        seed: int,
        compile_network: bool,
        resume_from: Path | None,
        sidecar: dict[str, Any] | None,
    ) -> None:
        """Build network and optimizer (seeded: equal plans + seed -> equal initial
        weights at every site), then load the checkpoint to resume from, if any."""
        trainer = self.trainer
        with compat.temporary_env(nnUNet_compile="t" if compile_network else "f"):
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            trainer.initialize()
            if resume_from is None:
                return
            # Local file written by this worker; nnU-Net 2.8.1 loads it with
            # weights_only=False (its dict argument path is broken), as `--c` does.
            trainer.load_checkpoint(str(resume_from))
            if sidecar and int(sidecar.get("epoch", trainer.current_epoch)) != (
                trainer.current_epoch
            ):
                trainer.print_to_log_file(
                    f"fednnunet: checkpoint epoch {trainer.current_epoch} != sidecar "
                    f"epoch {sidecar.get('epoch')}; continuing from the checkpoint"
                )

    # ---- introspection -------------------------------------------------------------------

    @property
    def current_epoch(self) -> int:
        """Epochs completed so far (nnU-Net's ``current_epoch`` between epochs)."""
        return int(self.trainer.current_epoch)

    @property
    def plans(self) -> dict:
        """The plans this trainer was built from (what the federation hashes)."""
        return self.trainer.plans_manager.plans

    @property
    def output_folder(self) -> Path:
        return Path(self.trainer.output_folder)

    def num_training_cases(self) -> int:
        return self._num_training_cases

    def last_completed_round(self) -> int:
        return self._completed_round

    def _network(self) -> torch.nn.Module:
        return compat.network_module(self.trainer)

    # ---- weights -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the weights, keys as nnU-Net lists them; aliases stay aliased."""
        copies: dict[tuple, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for name, t in self._network().state_dict().items():
            key = _storage_key(t)
            if key not in copies:
                copies[key] = t.detach().to("cpu", copy=True)
            out[name] = copies[key]
        return out

    def load_global(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Copy in the global weights whose name and shape match; return the keys loaded.

        Keys naming one storage (``encoder.*`` / ``decoder.encoder.*``) are loaded once, into
        the shared storage, so aliases cannot diverge; an alias group counts as loaded if any
        of its names is supplied. Everything else keeps its local value.
        """
        groups: dict[tuple, list[str]] = {}
        live = self._network().state_dict(keep_vars=True)
        for name, t in live.items():
            groups.setdefault(_storage_key(t), []).append(name)
        loaded: list[str] = []
        with torch.no_grad():
            for names in groups.values():
                target = live[names[0]]
                src = next(
                    (
                        tensors[n]
                        for n in names
                        if n in tensors and tuple(tensors[n].shape) == tuple(target.shape)
                    ),
                    None,
                )
                if src is None:
                    continue
                target.copy_(src.detach().to(device=target.device, dtype=target.dtype))
                loaded.extend(names)
        return loaded

    # ---- training ------------------------------------------------------------------------

    def train_epochs(
        self,
        n: int,
        on_iteration: Callable[[int, int, int], None] | None = None,
        lr_progress: float | None = None,
    ) -> dict[str, float]:
        """Run ``n`` nnU-Net epochs with the trainer's hooks, in ``run_training``'s order.

        ``on_iteration(epoch, iteration, of_iterations)`` is called after each train step.
        ``lr_progress`` (asynchronous federation): the federation's progress in [0, 1]
        that places nnU-Net's poly learning rate instead of this trainer's own epoch.
        Returns the last epoch's metrics (non-finite values are left out).
        """
        t = self.trainer
        if self._finished or self._closed:
            raise FedError("training session already finished/closed")
        if n < 1:
            raise FedError(f"number of epochs must be >= 1, got {n}")
        if lr_progress is not None:
            # Async: the LR follows the federation's progress (scale-free in num_epochs),
            # and a fast site may train more epochs than rounds x local_epochs.
            t.num_epochs = max(t.num_epochs, t.current_epoch + n)
        if t.current_epoch + n > t.num_epochs:
            raise FedError(
                f"{n} more epoch(s) after epoch {t.current_epoch} exceed total_epochs="
                f"{t.num_epochs} (nnU-Net's poly LR schedule ends there)"
            )
        for _ in range(n):
            # nnU-Net would save a *local* checkpoint_best.pth by its local EMA in this
            # epoch; the federation's best is a global model, written at the end.
            compat.never_save_local_best(t)
            compat.run_epoch(t, on_iteration, lr_progress=lr_progress)
        return self.last_metrics()

    def evaluate_pseudo_dice(self) -> dict[str, float]:
        """nnU-Net's validation step on the current weights: pseudo-Dice, per class, loss.

        The trainer's own hooks run (``num_val_iterations_per_epoch`` batches, as at the end
        of an epoch) but log to a scratch log, so the training log and its EMA only ever
        see the trainer's own epochs. Non-finite values (a class absent from the sampled
        patches and never predicted) are left out.
        """
        if self._finished or self._closed:
            raise FedError("training session already finished/closed")
        scored = compat.score_current_weights(self.trainer)
        metrics: dict[str, Any] = {
            "pseudo_dice": scored["mean_fg_dice"],
            "val_loss": scored["val_losses"],
        }
        per_class = scored["dice_per_class_or_region"] or []
        for name, dice in zip(compat.foreground_class_names(self.trainer), per_class, strict=False):
            metrics[f"pseudo_dice_{name}"] = dice
        return _finite(metrics)

    def validate_current(
        self, subfolder: str, validation_processes: int | None = None
    ) -> dict[str, Any]:
        """nnU-Net's full sliding-window validation of the current weights, written under
        ``<fold>/<subfolder>/validation`` (the final validation folder is left alone)."""
        target = resolve_under(self.output_folder, subfolder)
        with compat.default_processes(validation_processes):
            summary = compat.validate_into(self.trainer, target)
        return _validation_summary(summary)

    def write_best_checkpoint(self, tensors: dict[str, torch.Tensor], ema: float | None) -> Path:
        """``checkpoint_best.pth``: nnU-Net's checkpoint with ``tensors`` as the network (the
        federation's best global) and ``ema`` as its best EMA; the live weights are kept."""
        if not self._finished:
            raise FedError("the best checkpoint is written after the last round")
        current = self.state_dict()
        tmp = self.output_folder / "checkpoint_best.pth.tmp"
        self.load_global(tensors)
        try:
            compat.save_best_checkpoint(self.trainer, tmp, ema)
        finally:
            self.load_global(current)
        final = self.output_folder / "checkpoint_best.pth"
        os.replace(tmp, final)
        return final

    def last_metrics(self) -> dict[str, float]:
        logged = compat.logged_metrics(self.trainer)
        if logged is None:
            return {"epoch": float(self.current_epoch)}
        return _finite({**logged, "epoch": self.current_epoch})

    # ---- checkpoints ---------------------------------------------------------------------

    def _read_sidecar(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self._sidecar_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if self.run_id is not None and data.get("run_id") != self.run_id:
            return None
        return data

    def _write_sidecar(self) -> None:
        data = {
            "round": self._completed_round,
            "epoch": self.current_epoch,
            "finished": self._finished,
            "run_id": self.run_id,
        }
        tmp = self._sidecar_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._sidecar_path)

    def save_round_checkpoint(self, round_: int) -> None:
        """Write nnU-Net's checkpoint_latest.pth and record ``round_`` as completed."""
        t = self.trainer
        if t.disable_checkpointing:
            raise FedError("checkpointing is disabled: cannot record a completed round")
        final = self.output_folder / "checkpoint_latest.pth"
        tmp = self.output_folder / "checkpoint_latest.pth.tmp"
        compat.save_checkpoint_between_epochs(t, tmp)
        os.replace(tmp, final)
        self._completed_round = int(round_)
        self._write_sidecar()

    # ---- the end -------------------------------------------------------------------------

    def finish(
        self, run_validation: bool = True, validation_processes: int | None = None
    ) -> dict[str, Any]:
        """End training as nnU-Net does (checkpoint_final.pth) and run its final validation.

        ``validation_processes`` overrides nnU-Net's ``default_num_processes`` (8, or
        ``nnUNet_def_n_proc`` at import) for the export/metrics pools: each spawned worker
        imports torch, which dominates validation time on a small machine.
        """
        t = self.trainer
        if not self._finished:
            t.on_train_end()
            self._finished = True
            self._write_sidecar()
        result: dict[str, Any] = {
            "results_folder": str(t.output_folder_base),
            "fold_folder": str(t.output_folder),
        }
        if run_validation:
            with compat.default_processes(validation_processes):
                t.perform_actual_validation(self.export_npz)
            result |= _validation_summary(self.output_folder / "validation" / "summary.json")
        return result

    @property
    def finished(self) -> bool:
        return self._finished

    def close(self) -> None:
        """Stop the augmentation worker processes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        compat.stop_data_loaders(self.trainer)

    def __enter__(self) -> FederatedTrainingSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _validation_summary(path: Path) -> dict[str, Any]:
    """Mean foreground Dice and Dice per class from nnU-Net's validation summary.json."""
    summary = json.loads(path.read_text())
    return {
        "dice_per_class": {str(label): float(m["Dice"]) for label, m in summary["mean"].items()},
        "mean_dice": float(summary["foreground_mean"]["Dice"]),
    }
