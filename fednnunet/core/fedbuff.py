"""Buffered asynchronous aggregation (FedBuff): pure, streaming, no I/O.

A site trains from global version ``b`` and sends its weights ``w_i``; when the
buffer holds K updates the coordinator publishes

    w <- w + server_lr * sum_i s(tau_i) n_i (w_i - G_{b_i}) / sum_i s(tau_i) n_i

with tau_i = current version - b_i, s(tau) = (1 + tau) ** -exponent (FedBuff:
exponent 1/2) and n_i the site's declared training cases. Only the shared layers
(the reference's names) move; everything else of the current global is kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch


def staleness_weight(tau: int, exponent: float) -> float:
    """s(tau) = (1 + tau)^-exponent: how much an update ``tau`` versions old still counts."""
    if tau < 0:
        raise ValueError(f"staleness cannot be negative, got {tau}")
    return float((1.0 + tau) ** -exponent)


def buffer_weights(entries: Iterable[tuple[int, int]], exponent: float) -> list[float]:
    """Normalised weight of each buffered (staleness, cases) entry: s(tau)·n / sum s·n."""
    raw = [staleness_weight(tau, exponent) * n for tau, n in entries]
    total = sum(raw)
    if not raw or not total > 0:
        raise ValueError("a buffer needs at least one update with positive cases")
    return [r / total for r in raw]


class StreamingFedBuff:
    """sum_i c_i (w_i - base_i) over fixed layer names, one update in memory at a time."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names = list(names)
        self._sum: dict[str, torch.Tensor] = {}
        self._total = 0.0
        self.count = 0

    def add(
        self,
        weights: Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor],
        factor: float,
    ) -> None:
        """Add ``factor`` × (weights - base) for every floating layer."""
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"factor must be positive and finite, got {factor}")
        for name in self._names:
            w = weights[name]
            if not w.is_floating_point():
                continue  # counters have no meaningful delta: the global's stay
            dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
            delta = w.to(dtype) - base[name].to(dtype)
            acc = self._sum.get(name)
            if acc is None:
                self._sum[name] = delta.mul_(factor)
            else:
                acc.add_(delta, alpha=factor)
        self._total += factor
        self.count += 1

    def apply(
        self, current: Mapping[str, torch.Tensor], server_lr: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """current + server_lr × (weighted mean delta), each layer in its own dtype."""
        if self.count == 0:
            raise ValueError("no update was added")
        out = dict(current)
        for name, acc in self._sum.items():
            cur = current[name]
            out[name] = (cur.to(acc.dtype) + acc * (server_lr / self._total)).to(cur.dtype)
        return out
