"""FedAvg written out by hand, independent of ``fednnunet.core.aggregation``.

Tests compare the product's global weights with this, so a bug in the product's
averaging cannot hide behind the same bug in the expected value (a circular oracle).
The formula is the textbook one: for every layer that all updates share with the
same shape, ``sum(n_i * w_i) / sum(n_i)`` in float64 numpy; integer tensors (counters)
are not averaged and keep the first update's value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


def fedavg_oracle(
    updates: Sequence[tuple[Mapping[str, torch.Tensor], float]],
) -> dict[str, torch.Tensor]:
    """Case-weighted mean of ``(state_dict, num_cases)`` pairs over their shared layers."""
    if not updates:
        raise ValueError("no update")
    first = updates[0][0]
    shared = [
        name
        for name, tensor in first.items()
        if all(name in u and tuple(u[name].shape) == tuple(tensor.shape) for u, _ in updates)
    ]
    total = float(sum(n for _, n in updates))
    out: dict[str, torch.Tensor] = {}
    for name in shared:
        if not first[name].is_floating_point():
            out[name] = first[name].clone()
            continue
        weighted = sum(n * u[name].detach().cpu().to(torch.float64).numpy() for u, n in updates)
        mean = np.asarray(weighted / total, dtype=np.float64)
        out[name] = torch.from_numpy(mean).to(first[name].dtype)
    return out
