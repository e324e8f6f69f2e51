"""Statistically exact merge of per-site fingerprint summaries into one nnU-Net fingerprint.

Why not average site statistics (as the reference FednnU-Net does)? The pooled std
also contains the spread *between* sites' means, and the median/percentiles of a
mixture are not the mean of the sites' medians. Here every site ships mergeable
sufficient statistics instead, and the server computes what nnU-Net would have
computed on the pooled data.

Weighting follows nnU-Net: its extractor samples the same number of foreground
voxels from every case (``1e8 // num_cases``, with replacement), so its pooled
intensity statistics describe the *equal-weight mixture of the cases' foreground
distributions*. We compute that mixture's moments exactly (each case contributes
weight 1 spread over its foreground voxels) instead of Monte-Carlo sampling it.

Quantiles come from a DDSketch-style log-bucketed histogram whose bucket edges are
fixed (independent of the site), so sites' histograms merge by adding masses.
Error bound: for the exact lower weighted quantile ``q`` of the pooled data (the
smallest value whose cumulative weight reaches the target), the estimate satisfies
``|q_hat - q| <= alpha * |q|`` (alpha = ``relative_accuracy``), except that values
with ``|x| <= min_abs`` are collapsed to 0 (absolute error <= ``min_abs``). Estimates
are clamped to the exact pooled [min, max].

Everything here is pure: numpy and plain JSON-compatible dicts, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fednnunet.errors import DatasetError

SCHEMA = "fednnunet.fingerprint_summary/1"
DEFAULT_SKETCH = {"kind": "ddsketch-log", "relative_accuracy": 1e-3, "min_abs": 1e-8}
# nnU-Net's percentiles (fingerprint_extractor.py): 0.5, 50, 99.5.
_QUANTILES = {"percentile_00_5": 0.005, "median": 0.5, "percentile_99_5": 0.995}


# --------------------------------------------------------------------------- sketch


def _log_gamma(sketch: Mapping) -> float:
    a = float(sketch["relative_accuracy"])
    return math.log((1.0 + a) / (1.0 - a))


def _bucket_masses(x: np.ndarray, weight_each: float, sketch: Mapping) -> dict:
    """Histogram of ``x`` with every value carrying ``weight_each``; JSON-ready."""
    x = np.asarray(x, dtype=np.float64).ravel()
    min_abs = float(sketch["min_abs"])
    lg = _log_gamma(sketch)
    out: dict = {"zero": float(np.count_nonzero(np.abs(x) <= min_abs)) * weight_each}
    for side, sel in (("pos", x > min_abs), ("neg", x < -min_abs)):
        v = np.abs(x[sel])
        if v.size == 0:
            out[side] = {}
            continue
        idx = np.ceil(np.log(v) / lg).astype(np.int64)
        lo = int(idx.min())
        counts = np.bincount(idx - lo)  # bucket range is small: a few thousand at most
        out[side] = {
            str(lo + int(k)): float(counts[k]) * weight_each for k in np.flatnonzero(counts)
        }
    return out


def _add_masses(hists: Iterable[Mapping]) -> dict:
    """Sum histograms bucket-wise; fsum so the result does not depend on site order."""
    hists = list(hists)
    out: dict = {"zero": math.fsum(h["zero"] for h in hists)}
    for side in ("pos", "neg"):
        per_key: dict[str, list[float]] = {}
        for h in hists:
            for k, m in h[side].items():
                per_key.setdefault(k, []).append(m)
        out[side] = {k: math.fsum(ms) for k, ms in per_key.items()}
    return out


def _sketch_quantiles(hist: Mapping, qs: Sequence[float], sketch: Mapping) -> list[float]:
    """Lower weighted quantiles, each bucket represented by its relative-error midpoint."""
    gamma = math.exp(_log_gamma(sketch))
    items: list[tuple[float, float]] = []  # (representative value, mass), ascending
    for k, m in hist["neg"].items():
        items.append((-2.0 * gamma ** int(k) / (gamma + 1.0), m))
    if hist["zero"] > 0:
        items.append((0.0, hist["zero"]))
    for k, m in hist["pos"].items():
        items.append((2.0 * gamma ** int(k) / (gamma + 1.0), m))
    items.sort(key=lambda t: t[0])
    values = np.array([v for v, _ in items])
    cum = np.cumsum([m for _, m in items])
    total = cum[-1]
    out = []
    for q in qs:
        # tiny slack so that float rounding in the cumulative sum cannot skip a bucket
        i = int(np.searchsorted(cum, q * total * (1.0 - 1e-12), side="left"))
        out.append(float(values[min(i, len(values) - 1)]))
    return out


# --------------------------------------------------------------------------- channel stats


def _empty_channel() -> dict:
    """A channel without foreground voxels (weight 0: it contributes nothing when merged)."""
    hist = {"zero": 0.0, "pos": {}, "neg": {}}
    return {
        "weight": 0.0,
        "num_voxels": 0,
        "mean": 0.0,
        "m2": 0.0,
        "min": None,
        "max": None,
        "hist": hist,
    }


def summarize_channel_cases(
    values_per_case: Sequence[np.ndarray], sketch: Mapping = DEFAULT_SKETCH
) -> dict:
    """Mergeable summary of one channel's foreground intensities over a site's cases.

    Each case with foreground gets weight 1 (nnU-Net's equal-per-case sampling); moments
    are computed per case in float64 with two passes, then combined exactly.
    """
    parts = []
    for v in values_per_case:
        x = np.asarray(v, dtype=np.float64).ravel()
        if x.size == 0:
            continue  # nnU-Net likewise draws no samples from a case without foreground
        mean = float(x.mean())
        parts.append(
            {
                "weight": 1.0,
                "num_voxels": int(x.size),
                "mean": mean,
                # weighted M2 with weight 1/n per voxel = population variance of the case
                "m2": float(np.mean((x - mean) ** 2)),
                "min": float(x.min()),
                "max": float(x.max()),
                "hist": _bucket_masses(x, 1.0 / x.size, sketch),
            }
        )
    if not parts:
        return _empty_channel()
    return merge_channel_summaries(parts)


def merge_channel_summaries(parts: Sequence[Mapping]) -> dict:
    """Exact merge of (weight, mean, M2) plus min/max and histogram (Chan et al., k-way)."""
    parts = [p for p in parts if p["weight"] > 0]
    if not parts:
        return _empty_channel()
    w = math.fsum(p["weight"] for p in parts)
    mean = math.fsum(p["weight"] * p["mean"] for p in parts) / w
    m2 = math.fsum(
        [p["m2"] for p in parts] + [p["weight"] * (p["mean"] - mean) ** 2 for p in parts]
    )
    return {
        "weight": w,
        "num_voxels": int(sum(p["num_voxels"] for p in parts)),
        "mean": mean,
        "m2": m2,
        "min": min(p["min"] for p in parts),
        "max": max(p["max"] for p in parts),
        "hist": _add_masses(p["hist"] for p in parts),
    }


def channel_statistics(merged: Mapping, sketch: Mapping = DEFAULT_SKETCH) -> dict:
    """nnU-Net's per-channel intensity properties from a merged channel summary."""
    if merged["weight"] <= 0:
        nan = float("nan")
        return {k: nan for k in ("mean", "median", "std", "min", "max", *_QUANTILES)}
    lo, hi = merged["min"], merged["max"]
    qvals = _sketch_quantiles(merged["hist"], list(_QUANTILES.values()), sketch)
    q = {k: min(max(v, lo), hi) for k, v in zip(_QUANTILES, qvals, strict=True)}
    return {
        "mean": float(merged["mean"]),
        "median": q["median"],
        "std": math.sqrt(max(merged["m2"], 0.0) / merged["weight"]),
        "min": float(lo),
        "max": float(hi),
        "percentile_99_5": q["percentile_99_5"],
        "percentile_00_5": q["percentile_00_5"],
    }


# --------------------------------------------------------------------------- site summaries


def _site_name(s: Mapping, i: int) -> str:
    return str(s.get("dataset_name") or f"site #{i}")


def validate_compatible(summaries: Sequence[Mapping]) -> None:
    """Raise DatasetError (one line) unless all sites describe the same kind of dataset."""
    if not summaries:
        raise DatasetError("no fingerprint summaries to merge")
    for i, s in enumerate(summaries):
        if s.get("schema") != SCHEMA:
            raise DatasetError(
                f"{_site_name(s, i)}: fingerprint summary schema {s.get('schema')!r}, "
                f"expected {SCHEMA!r}"
            )
    ref = summaries[0]
    for field in ("channel_names", "labels", "file_ending", "sketch"):
        for i, s in enumerate(summaries[1:], start=1):
            if s.get(field) != ref.get(field):
                raise DatasetError(
                    f"sites disagree on {field}: {_site_name(ref, 0)} has {ref.get(field)!r}, "
                    f"{_site_name(s, i)} has {s.get(field)!r}"
                )
    for i, s in enumerate(summaries):
        n = s["num_cases"]
        if not (len(s["spacings"]) == len(s["shapes_after_crop"]) == n) or n == 0:
            raise DatasetError(f"{_site_name(s, i)}: inconsistent or empty case lists")
        if set(s["intensity_per_channel"]) != set(ref["channel_names"]):
            raise DatasetError(f"{_site_name(s, i)}: intensity summary lacks some channels")


def merge_fingerprint_summaries(summaries: Sequence[Mapping]) -> dict:
    """One ``dataset_fingerprint.json``-compatible dict for the pooled federation.

    Spacings and shapes are concatenated in the given site order; intensity statistics
    and the median relative size are order-independent.
    """
    validate_compatible(summaries)
    sketch = summaries[0]["sketch"]
    channels = sorted(summaries[0]["channel_names"], key=int)
    props = {}
    for ch in channels:
        merged = merge_channel_summaries([s["intensity_per_channel"][ch] for s in summaries])
        props[ch] = channel_statistics(merged, sketch)
    rel = [r for s in summaries for r in s["relative_sizes_after_cropping"]]
    return {
        "spacings": [list(map(float, sp)) for s in summaries for sp in s["spacings"]],
        "shapes_after_crop": [
            list(map(int, sh)) for s in summaries for sh in s["shapes_after_crop"]
        ],
        "foreground_intensity_properties_per_channel": props,
        "median_relative_size_after_cropping": float(np.median(rel)),
    }


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
