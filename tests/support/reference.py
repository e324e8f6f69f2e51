"""Reference computations that only tests use (the product has streaming versions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fednnunet.core.aggregation import StreamingFedAvg, common_layers
from fednnunet.core.fingerprint_merge import channel_statistics, merge_channel_summaries


def fedavg(updates: Sequence[tuple[Mapping[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """FedAvg of in-memory updates over their common layers (StreamingFedAvg, at once)."""
    names = common_layers([{k: tuple(v.shape) for k, v in u.items()} for u, _ in updates])
    acc = StreamingFedAvg(names)
    for update, weight in updates:
        acc.add(update, weight)
    first = updates[0][0]
    return acc.result({n: first[n].dtype for n in names})


def naive_average_fingerprint(summaries: Sequence[Mapping]) -> dict:
    """The reference (FednnU-Net-style) merge, kept only to measure how much worse it is.

    Site statistics are averaged with equal site weight; pooled std becomes the mean std.
    """
    sketch = summaries[0]["sketch"]
    props = {}
    for ch in sorted(summaries[0]["channel_names"], key=int):
        per_site = [
            channel_statistics(merge_channel_summaries([s["intensity_per_channel"][ch]]), sketch)
            for s in summaries
        ]
        props[ch] = {k: float(np.mean([p[k] for p in per_site])) for k in per_site[0]}
    return {"foreground_intensity_properties_per_channel": props}
