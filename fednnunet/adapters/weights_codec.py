"""Model weights on the wire: safetensors, aliased tensors stored once, no pickle.

The alias map travels in the safetensors metadata (a JSON string), so a
receiver can rebuild the exact key set nnU-Net expects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from fednnunet.core.tensors import join_aliases, split_aliases

ALIASES_META = "fednnunet.aliases"


def _prepare(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None):
    unique, aliases = split_aliases(state)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in unique.items()}
    meta = dict(metadata or {})
    meta[ALIASES_META] = json.dumps(aliases, sort_keys=True)
    return tensors, meta


def encode_weights(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    tensors, meta = _prepare(state, metadata)
    return st_save(tensors, metadata=meta)


def save_weights_file(
    state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None
) -> None:
    tensors, meta = _prepare(state, metadata)
    st_save_file(tensors, str(path), metadata=meta)


def _aliases(meta: Mapping[str, str] | None) -> dict[str, str]:
    raw = (meta or {}).get(ALIASES_META)
    return json.loads(raw) if raw else {}


def decode_weights(data: bytes, expand_aliases: bool = True) -> dict[str, torch.Tensor]:
    tensors = st_load(data)
    if not expand_aliases:
        return tensors
    with _header_reader(data) as meta:
        return join_aliases(tensors, _aliases(meta))


class _header_reader:
    """Reads the metadata of in-memory safetensors bytes (header only)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __enter__(self) -> dict[str, str]:
        n = int.from_bytes(self.data[:8], "little")
        header = json.loads(self.data[8 : 8 + n])
        return header.get("__metadata__", {}) or {}

    def __exit__(self, *exc: object) -> None:
        return None


def read_file_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict]:
    """(shapes of unique tensors, alias map, other metadata) without loading tensors."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    meta = header.pop("__metadata__", {}) or {}
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    return shapes, _aliases(meta), meta


def load_weights_file(
    path: Path, names: list[str] | None = None, expand_aliases: bool = False
) -> dict[str, torch.Tensor]:
    """Load (a subset of) the unique tensors of a safetensors file."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        for name in names if names is not None else list(fh.keys()):
            out[name] = fh.get_tensor(name)
    if expand_aliases:
        aliases = {a: c for a, c in _aliases(meta).items() if c in out}
        return join_aliases(out, aliases)
    return out
