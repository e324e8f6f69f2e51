"""Parse the familiar ``nnUNetv2_train`` flags so a spec can say what a site would type.

The parser mirrors ``nnunetv2/run/run_training.py`` (2.8.1) for everything after
dataset/configuration/fold. Flags that cannot work in federated training (several GPUs
per site) are rejected with a message instead of being silently ignored.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from fednnunet.errors import FedError

_DEVICES = ("cpu", "cuda", "mps")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and calling ``sys.exit``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise FedError(f"invalid nnUNetv2_train arguments: {message}")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nnUNetv2_train", add_help=False, allow_abbrev=False)
    p.add_argument("-tr", type=str, default="nnUNetTrainer")
    p.add_argument("-p", type=str, default="nnUNetPlans")
    p.add_argument("-pretrained_weights", type=str, default=None)
    p.add_argument("-num_gpus", type=int, default=1)
    p.add_argument("--npz", action="store_true")
    p.add_argument("--c", action="store_true")
    p.add_argument("--val", action="store_true")
    p.add_argument("--val_best", action="store_true")
    p.add_argument("--disable_checkpointing", action="store_true")
    p.add_argument("--use_compressed", action="store_true")
    p.add_argument("-device", type=str, default="cuda")
    return p


def parse_nnunet_train_args(argv: Sequence[str]) -> dict[str, Any]:
    """Parse nnUNetv2_train flags; keys match ``TrainingOptions`` where a field exists.

    Returns ``trainer``, ``plans_identifier``, ``device``, ``export_npz`` (TrainingOptions
    fields) plus ``pretrained_weights``, ``num_gpus``, ``continue_training``,
    ``only_run_validation``, ``val_with_best``, ``disable_checkpointing``, ``use_compressed``.
    """
    args, unknown = _build_parser().parse_known_args(list(argv))
    if unknown:
        raise FedError("unknown nnUNetv2_train argument(s): " + " ".join(unknown))
    if args.num_gpus != 1:
        raise FedError(
            f"-num_gpus {args.num_gpus} is not supported: a site trains on one GPU "
            "(multi-GPU DDP cannot run inside a federated round)"
        )
    if args.device not in _DEVICES:
        raise FedError(f"-device must be one of {', '.join(_DEVICES)}, got {args.device!r}")
    if args.c and args.val:
        raise FedError("--c and --val cannot be used together")
    if args.val_best and args.disable_checkpointing:
        raise FedError("--val_best is not compatible with --disable_checkpointing")
    if args.c and args.pretrained_weights is not None:
        raise FedError("cannot both continue a training (--c) and load -pretrained_weights")
    return {
        "trainer": args.tr,
        "plans_identifier": args.p,
        "device": args.device,
        "export_npz": args.npz,
        "pretrained_weights": args.pretrained_weights,
        "num_gpus": args.num_gpus,
        "continue_training": args.c,
        "only_run_validation": args.val,
        "val_with_best": args.val_best,
        "disable_checkpointing": args.disable_checkpointing,
        "use_compressed": args.use_compressed,
    }
