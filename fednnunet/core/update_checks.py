"""Checks an update must pass before it is aggregated (pure).

A site update with NaN/Inf, a shape that does not match the expected
architecture, or an absurd norm is quarantined: one bad site must not poison
the global model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

# An update whose L2 norm exceeds this many times the reference norm is absurd.
DEFAULT_MAX_NORM_RATIO = 100.0


def update_problems(
    update: Mapping[str, torch.Tensor],
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    reference_norm: float | None = None,
    max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO,
) -> list[str]:
    """Every reason to refuse this update (empty list: acceptable)."""
    problems: list[str] = []
    if not update:
        return ["update has no tensors"]
    floats = {n: t for n, t in update.items() if t.is_floating_point()}
    norms = _norms(list(floats.values()))
    sq = 0.0
    for (name, tensor), norm in zip(floats.items(), norms, strict=True):
        # A tensor norm is finite iff every value is (barring float32 overflow of huge
        # finite values, which the norm check below refuses anyway): one fused pass.
        if not math.isfinite(norm) and not bool(torch.isfinite(tensor).all()):
            problems.append(f"{name}: NaN or Inf values")
            continue
        sq += norm * norm
    for name, tensor in update.items():
        expected = (expected_shapes or {}).get(name)
        if expected is not None and tuple(tensor.shape) != tuple(expected):
            problems.append(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(expected)}")
    norm = math.sqrt(sq)
    if not math.isfinite(norm):
        problems.append("L2 norm overflows")
    elif (
        reference_norm is not None and reference_norm > 0 and norm > max_norm_ratio * reference_norm
    ):
        problems.append(
            f"L2 norm {norm:.3g} is more than {max_norm_ratio:g}x the global norm "
            f"{reference_norm:.3g}"
        )
    return problems


def _norms(tensors: list[torch.Tensor]) -> list[float]:
    """Per-tensor L2 norms with one vectorized call (float32 math, float64 result)."""
    if not tensors:
        return []
    return [float(n) for n in torch._foreach_norm(tensors)]


def l2_norm(update: Mapping[str, torch.Tensor]) -> float:
    norms = _norms([t for t in update.values() if t.is_floating_point()])
    return math.sqrt(sum(n * n for n in norms))
