"""A pretrained nnU-Net checkpoint as the federation's initial global model.

``nnUNetv2_train -pretrained_weights CKPT`` starts a training from another model's
weights; here the operator's checkpoint becomes round 0's global, so every site starts
its first round from it (layers with the same name and shape; a new task's different
segmentation head keeps its fresh initialisation, as in nnU-Net).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fednnunet.errors import FedError
from fednnunet.nnunet.compat import CHECKPOINT_WEIGHTS

# Prefixes nnU-Net's own load_pretrained_weights strips (torch.compile, DDP).
_PREFIXES = ("_orig_mod.", "module.")


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The network weights of an nnU-Net checkpoint (``checkpoint_*.pth``, read with
    torch's weights-only loader: no arbitrary unpickling) or of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FedError(f"pretrained weights {path} not found")
    if path.suffix == ".safetensors":
        from fednnunet.adapters.weights_codec import load_weights_file

        return load_weights_file(path, expand_aliases=True)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
        raise FedError(f"pretrained weights {path}: not a loadable checkpoint ({exc})") from None
    weights = ckpt.get(CHECKPOINT_WEIGHTS, ckpt) if isinstance(ckpt, dict) else None
    if (
        not isinstance(weights, dict)
        or not weights
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())
    ):
        raise FedError(f"pretrained weights {path}: no 'network_weights' tensors in it")
    out = {}
    for key, tensor in weights.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = tensor
    return out
