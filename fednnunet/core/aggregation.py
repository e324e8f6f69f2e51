"""Federated averaging over arrays: pure, streaming, one update in memory at a time.

FedAvg weights each site by its number of training cases. Only layers with the
same name and shape at every participating site are averaged (this is the
whole of AsymFedAvg; with FFE every layer is common). Peak memory is the
accumulator (one model) plus the update being added.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

Shape = tuple[int, ...]


def common_layers(shapes_per_site: Sequence[Mapping[str, Shape]]) -> list[str]:
    """Names present at every site with the same shape, in the first site's order."""
    if not shapes_per_site:
        return []
    first = shapes_per_site[0]
    out = []
    for name, shape in first.items():
        if all(
            tuple(other.get(name, ())) == tuple(shape) and name in other
            for other in shapes_per_site[1:]
        ):
            out.append(name)
    return out


class StreamingFedAvg:
    """Weighted running sum of updates, restricted to a fixed set of layer names.

    Floating tensors are averaged in float32 (float64 for float64 inputs);
    integer tensors (counters) are taken from the first update, since their
    mean is not meaningful.
    """

    def __init__(
        self, layer_names: Iterable[str], like: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """``like``: tensors of the model's shapes and dtypes, to allocate the sum now
        (before the first update arrives). It starts at -0.0, the identity of float
        addition, so adding ``w * x`` to it gives bit for bit ``w * x``: the same sum as
        without ``like``."""
        self._names = list(layer_names)
        self._sum: dict[str, torch.Tensor] = {}
        for name in self._names if like is not None else ():
            t = like[name]
            if t.is_floating_point():
                self._sum[name] = torch.full(t.shape, -0.0, dtype=_sum_dtype(t))
        self._total_weight = 0.0
        self._count = 0
        self._result: dict[str, torch.Tensor] | None = None

    def add(self, update: Mapping[str, torch.Tensor], weight: float, owned: bool = False) -> None:
        """Add ``weight`` × ``update``.

        ``owned``: the caller gives up the update's tensors (e.g. freshly loaded
        from a file), so the first one can become the accumulator without a copy.
        """
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"update weight must be positive and finite, got {weight}")
        if self._result is not None:
            raise RuntimeError("result() was already taken; start a new StreamingFedAvg")
        for name in self._names:
            tensor = update[name]
            acc = self._sum.get(name)
            if acc is None:
                if tensor.is_floating_point():
                    dtype = _sum_dtype(tensor)
                    if owned and tensor.dtype == dtype and tensor.is_contiguous():
                        self._sum[name] = tensor.mul_(weight)  # in place: no copy
                    else:  # one pass: the product is the copy
                        self._sum[name] = tensor.to(dtype=dtype).mul(weight).contiguous()
                else:
                    self._sum[name] = tensor if owned else tensor.clone()
            elif acc.is_floating_point():
                acc.add_(tensor.to(acc.dtype), alpha=weight)
        self._total_weight += weight
        self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def result(self, dtypes: Mapping[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
        """The weighted mean; optionally cast back to each layer's original dtype.

        The mean is computed in place on the first call (no further add()).
        """
        if self._count == 0:
            raise ValueError("no update was added")
        if self._result is None:
            # Divide in place: a second model-sized buffer would raise the peak by one model.
            for acc in self._sum.values():
                if acc.is_floating_point():
                    acc.div_(self._total_weight)
            self._result = self._sum
        out = {}
        for name, value in self._result.items():
            if dtypes is not None and name in dtypes:
                value = value.to(dtypes[name])
            out[name] = value
        return out


def _sum_dtype(t: torch.Tensor) -> torch.dtype:
    """Floating layers are summed in float32 (float64 for float64 inputs)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def capped_weights(cases: Mapping[str, int], max_share: float | None = None) -> dict[str, float]:
    """Normalised FedAvg weights: proportional to each site's declared cases, no site
    above ``max_share`` of the total (the excess is shared out in proportion to the
    others' cases; when the cap is infeasible, i.e. ``max_share * n < 1``, all equal)."""
    if not cases or any(n <= 0 for n in cases.values()):
        raise ValueError(f"every site needs a positive case count, got {dict(cases)}")
    total = float(sum(cases.values()))
    weights = {s: n / total for s, n in cases.items()}
    if max_share is None or max_share >= 1:
        return weights
    if max_share * len(cases) < 1:
        return {s: 1.0 / len(cases) for s in cases}
    capped: set[str] = set()
    while True:
        over = [s for s, w in weights.items() if s not in capped and w > max_share + 1e-12]
        if not over:
            return weights
        capped.update(over)
        free = 1.0 - max_share * len(capped)
        rest = {s: cases[s] for s in cases if s not in capped}
        rest_total = float(sum(rest.values()))
        weights = {s: max_share for s in capped} | {
            s: free * n / rest_total for s, n in rest.items()
        }


def trimmed_mean(
    updates: Sequence[Mapping[str, torch.Tensor]], names: Iterable[str], trim: int
) -> dict[str, torch.Tensor]:
    """Coordinate-wise trimmed mean: per value, drop the ``trim`` lowest and highest
    site values, average the rest (unweighted). Robust to ``trim`` arbitrary updates;
    holds every update in memory (K x model), unlike the streaming FedAvg."""
    if trim < 0 or len(updates) <= 2 * trim:
        raise ValueError(f"trimming {trim} per side needs more than {2 * trim} updates")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        first = updates[0][name]
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        stacked = torch.stack([u[name].to(torch.float64) for u in updates])
        kept = stacked.sort(dim=0).values[trim : len(updates) - trim]
        out[name] = kept.mean(dim=0).to(first.dtype)
    return out
