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


# Flags of nnUNetv2_train that a federated run cannot honour, and why (refused, never
# accepted and ignored).
UNSUPPORTED_FLAGS = {
    "continue_training": (
        "--c is not needed: a federated run resumes by itself after a restart "
        "(each site from its round checkpoint)"
    ),
    "only_run_validation": (
        "--val is not supported: validation runs at every site after the last round"
    ),
    "val_with_best": (
        "--val_best is not supported: sites validate the federation's final global model"
    ),
    "disable_checkpointing": (
        "--disable_checkpointing is not supported: round checkpoints make a site's "
        "restart lose nothing"
    ),
    "use_compressed": (
        "--use_compressed is not supported: sites train from nnU-Net's default "
        "(decompressed) preprocessed data"
    ),
}


def pretrained_weights_arg(argv: Sequence[str]) -> str | None:
    """The ``-pretrained_weights`` path, if given (the federation's initial global model)."""
    args, _ = _build_parser().parse_known_args(list(argv))
    return args.pretrained_weights


def parse_nnunet_train_args(argv: Sequence[str]) -> dict[str, Any]:
    """Parse nnUNetv2_train flags into ``ExperimentOptions`` fields.

    Returns ``trainer``, ``plans_identifier``, ``device`` and ``export_npz``;
    ``-pretrained_weights`` is read by :func:`pretrained_weights_arg` (the spec's initial
    global model); every other flag of nnUNetv2_train is refused with the reason
    (:data:`UNSUPPORTED_FLAGS`).
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
    given = {
        "continue_training": args.c,
        "only_run_validation": args.val,
        "val_with_best": args.val_best,
        "disable_checkpointing": args.disable_checkpointing,
        "use_compressed": args.use_compressed,
    }
    refused = [UNSUPPORTED_FLAGS[k] for k, on in given.items() if on]
    if refused:
        raise FedError("; ".join(refused))
    return {
        "trainer": args.tr,
        "plans_identifier": args.p,
        "device": args.device,
        "export_npz": args.npz,
    }
