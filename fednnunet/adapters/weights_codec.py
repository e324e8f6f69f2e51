"""Model weights on the wire: safetensors, aliased tensors stored once, no pickle.

The alias map travels in the safetensors metadata (a JSON string), so a
receiver can rebuild the exact key set nnU-Net expects.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from fednnunet.core.tensors import join_aliases, split_aliases
from fednnunet.errors import FedError

ALIASES_META = "fednnunet.aliases"
# safetensors' own limit on the JSON header; a larger one is not a weights file.
MAX_HEADER_BYTES = 100 << 20
MAX_DIM = 1 << 31
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1,
}  # fmt: skip


class MalformedWeights(FedError):
    """A weights file whose header is not a sane safetensors header (refused unread)."""


@dataclass(frozen=True)
class WeightsHeader:
    """What a weights file declares, read and checked without loading a tensor."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    aliases: dict[str, str]
    metadata: dict[str, str]


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
    if not raw:
        return {}
    try:
        aliases = json.loads(raw)
    except ValueError as exc:
        raise MalformedWeights(f"alias map is not JSON: {exc}") from None
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise MalformedWeights("alias map must map names to names")
    return aliases


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


def read_header(path: Path) -> WeightsHeader:
    """The checked header of a safetensors file: every tensor's dtype, shape and byte
    range must agree and lie inside the file, every alias must name a tensor."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if size < 8 or not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
            raise MalformedWeights(f"not a safetensors file (header length {n}, file {size} B)")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise MalformedWeights(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise MalformedWeights("header is not a mapping")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MalformedWeights("metadata must map names to strings")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    data_bytes = size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (
                dtype in _ITEMSIZE
                and isinstance(shape, list)
                and len(shape) <= 8
                and all(isinstance(d, int) and 0 <= d < MAX_DIM for d in shape)
                and isinstance(begin, int)
                and isinstance(end, int)
                and 0 <= begin <= end <= data_bytes
                and end - begin == math.prod(shape) * _ITEMSIZE[dtype]
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise MalformedWeights(f"tensor {name[:80]!r}: inconsistent dtype/shape/offsets")
        shapes[name], dtypes[name] = tuple(shape), dtype
    aliases = _aliases(meta)
    dangling = [a for a, c in aliases.items() if c not in shapes or a in shapes]
    if dangling:
        raise MalformedWeights(f"alias {dangling[0][:80]!r} does not name one stored tensor")
    return WeightsHeader(shapes, dtypes, aliases, meta)


def read_file_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict]:
    """(shapes of unique tensors, alias map, other metadata) without loading tensors."""
    h = read_header(path)
    return h.shapes, h.aliases, h.metadata


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
