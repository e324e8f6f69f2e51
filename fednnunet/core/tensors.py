"""Aliased tensors in a state dict, found without I/O.

nnU-Net's ``state_dict()`` lists some tensors under several names
(``decoder.encoder.*`` shares storage with ``encoder.*``). Serializing or
averaging them once per name wastes bytes and time, and safetensors refuses
shared tensors. We keep one canonical name per storage view and a map
``alias -> canonical`` to restore the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def _view_identity(t: torch.Tensor) -> tuple:
    return (
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
        t.device.type,
    )


def split_aliases(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (unique tensors by canonical name, {alias: canonical}).

    The canonical name is the first name that lists a given view, in dict order.
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        ident = _view_identity(tensor)
        owner = seen.get(ident)
        if owner is None:
            seen[ident] = name
            unique[name] = tensor
        else:
            aliases[name] = owner
    return unique, aliases


def join_aliases(
    unique: Mapping[str, torch.Tensor], aliases: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """Expand a deduplicated dict: every alias points at its canonical tensor (shared)."""
    out = dict(unique)
    for alias, canonical in aliases.items():
        out[alias] = unique[canonical]
    return out


def unique_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    unique, _ = split_aliases(state)
    return sum(t.numel() * t.element_size() for t in unique.values())
