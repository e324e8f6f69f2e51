"""A site backend and training session that do no nnU-Net compute (tests, benchmarks).

They let tests and benchmarks drive the whole federation (broker, S3, Redis,
coordinator) with real-size weights — e.g. nnU-Net's own 2d network — and a controlled
training time. Weights move deterministically so the final global model of a disturbed
run can be compared with an undisturbed one.

A worker uses it when started with ``FEDNNUNET_SITE_BACKEND=tests.support.standin:
StandInBackend`` (from the repository root); ``FEDNNUNET_STANDIN_MODEL`` (tiny,
nnunet2d, nnunet3d), ``FEDNNUNET_STANDIN_SLEEP_S`` (seconds per round) and
``FEDNNUNET_STANDIN_DIR`` (scratch folder, one sub-folder per site) configure it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fednnunet.adapters.s3_store import sha256_bytes
from fednnunet.adapters.weights_codec import load_weights_file, save_weights_file
from fednnunet.core.tensors import split_aliases
from fednnunet.messages import ExperimentOptions
from fednnunet.nnunet.backend import NnunetBackend, Planned
from fednnunet.settings import Settings

BACKEND = "tests.support.standin:StandInBackend"


def build_state(model: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    if model == "tiny":
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        return net.state_dict()
    if model in ("nnunet2d", "nnunet3d"):
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
        from torch import nn

        if model == "nnunet2d":
            # The 2d network nnU-Net plans for small slices: 7.77 M parameters, 31 MB
            # unique, 240 state-dict keys (97 MB if aliased tensors are counted naively).
            conv, norm, stages, feats = (
                nn.Conv2d,
                nn.InstanceNorm2d,
                5,
                (32, 64, 128, 256, 512),
            )
            strides = (1, 2, 2, 2, 2)
        else:
            conv, norm, stages, feats = (
                nn.Conv3d,
                nn.InstanceNorm3d,
                6,
                (32, 64, 128, 256, 320, 320),
            )
            strides = (1, 2, 2, 2, 2, 2)
        net = PlainConvUNet(
            1,
            stages,
            feats,
            conv,
            3,
            strides,
            (2,) * stages,
            3,
            (2,) * (stages - 1),
            True,
            norm,
            {"eps": 1e-5, "affine": True},
            None,
            None,
            nn.LeakyReLU,
            {"inplace": True},
            deep_supervision=True,
        )
        return net.state_dict()
    raise ValueError(f"unknown stand-in model {model!r}")


def _balanced_shares(tensors: list[torch.Tensor], parts: int) -> list[list[torch.Tensor]]:
    """``tensors`` cut, in order, into ``parts`` runs of about equal element counts."""
    total = sum(t.numel() for t in tensors) or 1
    shares: list[list[torch.Tensor]] = [[] for _ in range(parts)]
    seen = 0
    for t in tensors:
        shares[min(parts - 1, seen * parts // total)].append(t)
        seen += t.numel()
    return shares


def standin_cases(salt: int) -> int:
    """The training cases a stand-in site declares (4 to 8, by dataset id)."""
    return 4 + salt % 5


class StandInSession:
    def __init__(
        self,
        dataset_id: int,
        options: ExperimentOptions,
        *,
        model: str = "tiny",
        sleep_s: float = 0.0,
        workdir: Path | None = None,
        site_salt: int | None = None,
        run_id: str | None = None,
        trainer_folder: str | None = None,
    ) -> None:
        self.dataset_id = dataset_id
        self.sleep_s = sleep_s
        self.model = model
        self.salt = dataset_id if site_salt is None else site_salt
        # One folder per run (experiment): concurrent experiments at a site must not
        # resume from each other's checkpoints.
        self.output_folder = (
            Path(workdir or f"/tmp/fednnunet-standin/{dataset_id}")  # noqa: S108 - no patient data
            / (run_id or "default")
            / f"{options.configuration}_fold{options.fold}"
        )
        if trainer_folder is not None:  # a fine-tuned model beside the federated one
            self.output_folder = self.output_folder / trainer_folder
        self.output_folder.mkdir(parents=True, exist_ok=True)
        self.plans = {"standin": model}
        self._state = build_state(model, options.seed)
        self._round = 0
        self.epoch = 0
        ckpt = self.output_folder / "standin_latest.safetensors"
        side = self.output_folder / "standin_round.json"
        if ckpt.exists() and side.exists():
            self._state.update(load_weights_file(ckpt, expand_aliases=True))
            info = json.loads(side.read_text())
            self._round, self.epoch = info["round"], info["epoch"]

    def num_training_cases(self) -> int:
        return standin_cases(self.salt)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    def load_global(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Like the real session: names that share one storage are copied into it once
        (the first supplied name of matching shape), and all of them count as loaded."""
        loaded = []
        for names in self._alias_groups():
            target = self._state[names[0]]
            src = next(
                (tensors[n] for n in names if n in tensors and tensors[n].shape == target.shape),
                None,
            )
            if src is not None:
                target.copy_(src)
                loaded.extend(n for n in names if n in tensors)
        return loaded

    def _alias_groups(self) -> list[list[str]]:
        """The state's names grouped by the storage they view (nnU-Net's state dict
        lists encoder weights under several names), canonical name first."""
        unique, aliases = split_aliases(self._state)
        groups = {name: [name] for name in unique}
        for alias, canonical in aliases.items():
            groups[canonical].append(alias)
        return list(groups.values())

    def train_epochs(
        self,
        n: int,
        on_iteration: Callable[[int, int, int], None] | None = None,
        lr_progress: float | None = None,
    ) -> dict[str, float]:
        # The whole call takes sleep_s (or the nudging's own time, if longer): the
        # nudging stands in for training compute, so it is part of S, not overhead.
        # Like training, it is spread over the epoch's iterations (a share in the middle
        # of each), not one burst at its start: on a machine that hosts several sites
        # a burst would slow the others' downloads, which a real site's GPU does not.
        # The same draws in the same order: the weights do not depend on the split.
        steps = 4
        t0 = time.monotonic()
        floats = [t for t in self._state.values() if t.is_floating_point()]
        shares = _balanced_shares(floats, steps)
        for e in range(n):
            self.epoch += 1
            gen = torch.Generator().manual_seed(self.salt * 100_003 + self.epoch)
            for i in range(steps):
                middle = t0 + self.sleep_s * (e * steps + i + 0.5) / (n * steps)
                time.sleep(max(0.0, middle - time.monotonic()))
                for t in shares[i]:
                    t.add_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.01)
                until = t0 + self.sleep_s * (e * steps + i + 1) / (n * steps)
                time.sleep(max(0.0, until - time.monotonic()))
                if on_iteration is not None:
                    on_iteration(self.epoch - 1, i + 1, steps)
        loss = 1.0 / (1 + self.epoch)
        extra = {} if lr_progress is None else {"lr_progress": lr_progress}
        return extra | {
            "train_loss": loss,
            "val_loss": loss * 1.1,
            "pseudo_dice": 1 - loss,
            "epoch": float(self.epoch),
        }

    def evaluate_pseudo_dice(self) -> dict[str, float]:
        """A deterministic score of the current weights (no data): 1 / (1 + |mean weight|)."""
        # One mean per storage, summed over every name as before (same value, a third
        # of the work on nnU-Net's aliased state dict).
        unique, aliases = split_aliases(self._state)
        means = {n: t.float().mean().abs() for n, t in unique.items() if t.is_floating_point()}
        floats = [means[aliases.get(n, n)] for n, t in self._state.items() if t.is_floating_point()]
        score = 1.0 / (1.0 + float(sum(floats)))
        return {"pseudo_dice": score, "pseudo_dice_1": score}

    def validate_current(self, subfolder: str) -> dict:
        score = self.evaluate_pseudo_dice()["pseudo_dice"]
        return {"mean_dice": score, "dice_per_class": {"1": score}}

    def write_best_checkpoint(self, tensors: dict[str, torch.Tensor], ema: float | None) -> Path:
        path = self.output_folder / "standin_best.safetensors"
        save_weights_file({**self._state, **tensors}, path)
        return path

    @property
    def finished(self) -> bool:
        return False

    def save_round_checkpoint(self, round_: int) -> None:
        save_weights_file(self._state, self.output_folder / "standin_latest.safetensors")
        (self.output_folder / "standin_round.json").write_text(
            json.dumps({"round": round_, "epoch": self.epoch})
        )
        self._round = round_

    def last_completed_round(self) -> int:
        return self._round

    def finish(self, run_validation: bool = True) -> dict:
        return {
            "mean_dice": 1 - 1.0 / (1 + self.epoch),
            "dice_per_class": {},
            "results_folder": str(self.output_folder),
        }

    def close(self) -> None:
        return None


class StandInBackend(NnunetBackend):
    """nnU-Net's fingerprint; stand-in plans (one per model) and stand-in sessions."""

    def __init__(
        self,
        settings: Settings,
        model: str | None = None,
        sleep_s: float | None = None,
        workdir: Path | None = None,
    ) -> None:
        super().__init__(settings)
        self.model = model or os.environ.get("FEDNNUNET_STANDIN_MODEL", "tiny")
        self.sleep_s = (
            float(os.environ.get("FEDNNUNET_STANDIN_SLEEP_S", "0")) if sleep_s is None else sleep_s
        )
        # One folder per site: simulated sites share FEDNNUNET_STANDIN_DIR.
        root = os.environ.get("FEDNNUNET_STANDIN_DIR") or "/tmp/fednnunet-standin"  # noqa: S108 - no patient data
        self.workdir = workdir or Path(root) / str(settings.site_id)

    def warm_up(self) -> None:
        return None  # nothing to import ahead

    def plan(
        self, dataset_id: int, options: ExperimentOptions, fingerprint: dict | None
    ) -> Planned:
        plans = {"standin": self.model}
        return Planned(plans, self.plans_sha256(plans), standin_cases(dataset_id))

    def plans_sha256(self, plans: dict) -> str:
        return sha256_bytes(json.dumps(plans, sort_keys=True).encode())

    def session(
        self,
        dataset_id: int,
        options: ExperimentOptions,
        run_id: str,
        trainer_folder: str | None = None,
        lr_scale: float = 1.0,  # noqa: ARG002 - no learning rate without compute
    ) -> StandInSession:
        return StandInSession(
            dataset_id,
            options,
            model=self.model,
            sleep_s=self.sleep_s,
            workdir=self.workdir,
            run_id=run_id,
            trainer_folder=trainer_folder,
        )
