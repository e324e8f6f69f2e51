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
import copy
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fednnunet.errors import DatasetError, FedError, PolicyRefusal
from fednnunet.messages import ExperimentOptions
from fednnunet.nnunet.env import temporary_env
from fednnunet.settings import require_nnunet_paths, resolve_under

SIDECAR_NAME = "fednnunet_round.json"
# nnU-Net writes checkpoint_latest.pth every ``save_every`` epochs on its own; a mid-round
# checkpoint would no longer match the round recorded in the sidecar, so only rounds write it.
_NEVER = 10**9


@contextlib.contextmanager
def _nnunet_default_processes(n: int | None) -> Iterator[None]:
    """Temporarily change the process count the trainer module bound at import."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    old = trainer_module.default_num_processes
    if n is not None:
        trainer_module.default_num_processes = max(1, int(n))
    try:
        yield
    finally:
        trainer_module.default_num_processes = old


def resolve_trainer_class(name: str) -> type:
    """The nnU-Net trainer class of that name; refused (never retried) unless it is
    nnUNetTrainer or a subclass. nnU-Net's lookup returns *any* attribute of its trainer
    modules by that name (2.8.1 then fails its own issubclass check with a TypeError)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        cls = recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError, TypeError) as exc:
        raise PolicyRefusal(f"trainer {name!r} is not an nnU-Net trainer class: {exc}") from None
    if not is_nnunet_trainer(cls):
        raise PolicyRefusal(f"trainer {name!r} is not a subclass of nnUNetTrainer")
    return cls


def is_nnunet_trainer(obj: object) -> bool:
    """True for nnUNetTrainer and its subclasses only (not functions, modules, ...)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return isinstance(obj, type) and issubclass(obj, nnUNetTrainer)


def _parse_fold(fold: int | str) -> int | str:
    if fold == "all":
        return "all"
    try:
        return int(fold)
    except (TypeError, ValueError) as exc:
        raise FedError(f"fold must be an integer or 'all', got {fold!r}") from exc


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
    ) -> None:
        """Build (or resume) the trainer; ``run_id`` guards against resuming another run's files.

        ``options``: the experiment's, as validated (nnU-Net trains ``rounds *
        local_epochs`` epochs in all). ``da_processes`` sets ``nnUNet_n_proc_DA`` only while
        the data loaders are built (0: augmentation in this process). ``torch_threads``
        caps intra-op threads so that several sites on one machine do not oversubscribe it.
        """
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        paths = require_nnunet_paths("nnUNet_preprocessed", "nnUNet_results")
        configuration, device, seed = options.configuration, options.device, options.seed
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise FedError(f"device {device!r} requested but CUDA is not available here")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.export_npz = options.export_npz
        self.run_id = run_id
        fold = _parse_fold(options.fold)
        try:
            dataset_name = maybe_convert_to_dataset_name(dataset_id)
        except (RuntimeError, AssertionError) as exc:
            raise DatasetError(f"dataset {dataset_id}: {exc}") from exc
        pp_base = paths["nnUNet_preprocessed"] / dataset_name
        plans_file = resolve_under(pp_base, f"{options.plans_identifier}.json")
        if not plans_file.is_file():
            raise FedError(f"{plans_file} missing: run planning/preprocessing first")
        plans = json.loads(plans_file.read_text())
        dataset_json = json.loads((pp_base / "dataset.json").read_text())
        if configuration not in plans["configurations"]:
            raise FedError(
                f"configuration {configuration!r} not in {plans_file.name} "
                f"(available: {', '.join(plans['configurations'])})"
            )
        trainer_cls = resolve_trainer_class(options.trainer)

        # Same folder nnU-Net derives in nnUNetTrainer.__init__ (checked below).
        fold_dir = (
            paths["nnUNet_results"]
            / dataset_name
            / f"{trainer_cls.__name__}__{plans['plans_name']}__{configuration}"
            / f"fold_{fold}"
        )
        self._sidecar_path = fold_dir / SIDECAR_NAME
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

        plans_copy = copy.deepcopy(plans)  # nnU-Net 2.8.1 pops continue_training from it
        plans_copy["continue_training"] = resume_from is not None
        trainer = trainer_cls(
            plans=plans_copy,
            configuration=configuration,
            fold=fold,
            dataset_json=dataset_json,
            device=torch.device(device),
        )
        if Path(trainer.output_folder) != fold_dir:
            raise FedError(f"unexpected nnU-Net output folder {trainer.output_folder}")
        trainer.num_epochs = options.rounds * options.local_epochs
        trainer.num_iterations_per_epoch = options.iterations_per_epoch
        trainer.num_val_iterations_per_epoch = options.val_iterations_per_epoch
        trainer.save_every = _NEVER
        self.trainer = trainer
        self._completed_round = int(sidecar["round"]) if sidecar else 0
        self._finished = bool(sidecar and sidecar.get("finished"))
        self._closed = False

        compile_flag = "t" if compile_network else "f"
        da = None if da_processes is None else str(da_processes)
        with temporary_env(nnUNet_compile=compile_flag):
            # Seed right before the network is built: equal plans + seed -> equal init weights.
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            trainer.initialize()
            if resume_from is not None:
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
            if not self._finished:
                with temporary_env(nnUNet_n_proc_DA=da):
                    trainer.on_train_start()
        tr_keys, _ = trainer.do_split()
        self._num_training_cases = len(tr_keys)

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
        from torch._dynamo import OptimizedModule

        net = self.trainer.network
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net = net.module
        if isinstance(net, OptimizedModule):
            net = net._orig_mod
        return net

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
        self, n: int, on_iteration: Callable[[int, int, int], None] | None = None
    ) -> dict[str, float]:
        """Run ``n`` nnU-Net epochs with the trainer's hooks, in ``run_training``'s order.

        ``on_iteration(epoch, iteration, of_iterations)`` is called after each train step.
        Returns the last epoch's metrics (non-finite values are left out).
        """
        t = self.trainer
        if self._finished or self._closed:
            raise FedError("training session already finished/closed")
        if n < 1:
            raise FedError(f"number of epochs must be >= 1, got {n}")
        if t.current_epoch + n > t.num_epochs:
            raise FedError(
                f"{n} more epoch(s) after epoch {t.current_epoch} exceed total_epochs="
                f"{t.num_epochs} (nnU-Net's poly LR schedule ends there)"
            )
        for _ in range(n):
            epoch = t.current_epoch
            t.on_epoch_start()
            t.on_train_epoch_start()
            train_outputs = []
            for i in range(t.num_iterations_per_epoch):
                train_outputs.append(t.train_step(next(t.dataloader_train)))
                if on_iteration is not None:
                    on_iteration(epoch, i + 1, t.num_iterations_per_epoch)
            t.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                t.on_validation_epoch_start()
                val_outputs = [
                    t.validation_step(next(t.dataloader_val))
                    for _ in range(t.num_val_iterations_per_epoch)
                ]
                t.on_validation_epoch_end(val_outputs)
            t.on_epoch_end()
        return self.last_metrics()

    def last_metrics(self) -> dict[str, float]:
        log = self.trainer.logger
        if not log.get_value("train_losses", step=None):
            return {"epoch": float(self.current_epoch)}
        return _finite(
            {
                "train_loss": log.get_value("train_losses", step=-1),
                "val_loss": log.get_value("val_losses", step=-1),
                "pseudo_dice": log.get_value("mean_fg_dice", step=-1),
                "ema_pseudo_dice": log.get_value("ema_fg_dice", step=-1),
                "epoch": self.current_epoch,
                "lr": log.get_value("lrs", step=-1),
            }
        )

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
        # nnU-Net stores current_epoch + 1 (it saves inside on_epoch_end, before the
        # increment); step back like on_train_end does so a resume continues at the next epoch.
        t.current_epoch -= 1
        try:
            t.save_checkpoint(str(tmp))
        finally:
            t.current_epoch += 1
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
            with _nnunet_default_processes(validation_processes):
                t.perform_actual_validation(self.export_npz)
            summary = json.loads((self.output_folder / "validation" / "summary.json").read_text())
            result["dice_per_class"] = {
                str(label): float(m["Dice"]) for label, m in summary["mean"].items()
            }
            result["mean_dice"] = float(summary["foreground_mean"]["Dice"])
        return result

    def close(self) -> None:
        """Stop the augmentation worker processes (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for dl in (self.trainer.dataloader_train, self.trainer.dataloader_val):
            finish = getattr(dl, "_finish", None)
            if finish is not None:
                with contextlib.suppress(Exception):
                    finish()

    def __enter__(self) -> FederatedTrainingSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
