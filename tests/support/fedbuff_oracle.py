"""An independent FedBuff step for tests (not the product's code)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def fedbuff_oracle(
    previous: Mapping[str, torch.Tensor],
    updates: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], int, int]],
    exponent: float,
    server_lr: float,
) -> dict[str, torch.Tensor]:
    """previous + lr × Σ s(τ)·n·(w − base) / Σ s(τ)·n, s(τ) = (1+τ)^−a, in float64.

    ``updates``: (weights, base global, staleness τ, cases n).
    """
    raw = [(1.0 + tau) ** (-exponent) * n for _, _, tau, n in updates]
    total = sum(raw)
    out = {}
    for name, cur in previous.items():
        delta = sum(
            r * (w[name].double() - b[name].double())
            for r, (w, b, _, _) in zip(raw, updates, strict=True)
        )
        out[name] = (cur.double() + server_lr * delta / total).to(cur.dtype)
    return out


def first_version_oracle(
    updates: Sequence[tuple[Mapping[str, torch.Tensor], int]], names: list[str]
) -> dict[str, torch.Tensor]:
    """The first version: case-weighted mean of the weights (all started from one model)."""
    total = sum(n for _, n in updates)
    return {k: sum(w[k].double() * n for w, n in updates) / total for k in names}
