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

Scan geometry (spacings, shapes after crop, relative sizes) travels as per-axis sketches
too, never as per-case lists; ``fednnunet.core.geometry_sketch`` explains how the pooled
planner inputs are recovered from them and handed to nnU-Net's unchanged planner.

Everything here is pure: numpy and plain JSON-compatible dicts, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fednnunet.core.fingerprint_schema import (
    SCHEMA,
    FingerprintRejected,
    SummaryLimits,
    validate_summary,
)
from fednnunet.core.geometry_sketch import (
    GeometryQuery,
    merge_sketches,
    percentile_ranks,
    resampled_shape_ranks,
    synthetic_geometry,
    target_spacing,
)
from fednnunet.errors import DatasetError

__all__ = ["SCHEMA", "FingerprintRejected", "SummaryLimits", "merge_fingerprint_summaries"]
MERGED_SCHEMA = "fednnunet.merged_fingerprint/2"
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


def validate_compatible(
    summaries: Sequence[Mapping], limits: SummaryLimits = SummaryLimits()
) -> list[dict]:
    """Strictly parse every summary and check that all describe the same kind of dataset.

    Raises a one-line :class:`~fednnunet.errors.FedError` (``FingerprintRejected`` for a
    summary that breaks the schema or a range, ``DatasetError`` for incompatible sites).
    """
    if not summaries:
        raise DatasetError("no fingerprint summaries to merge")
    parsed = [validate_summary(s, limits, i) for i, s in enumerate(summaries)]
    ref = parsed[0]
    for field in ("channel_names", "labels", "file_ending", "sketch", "geometry_sketch"):
        for i, s in enumerate(parsed[1:], start=1):
            if s.get(field) != ref.get(field):
                raise DatasetError(
                    f"sites disagree on {field}: {_site_name(ref, 0)} has {ref.get(field)!r}, "
                    f"{_site_name(s, i)} has {s.get(field)!r}"
                )
    if any(len(s["spacing"]) != len(ref["spacing"]) for s in parsed):
        raise DatasetError("sites disagree on the number of image axes")
    total = sum(s["num_cases"] for s in parsed)
    if total > limits.max_cases:
        raise FingerprintRejected(f"{total} cases in all exceeds the cap of {limits.max_cases}")
    return parsed


def merge_geometry(summaries: Sequence[Mapping]) -> dict:
    """Pooled planner inputs from geometry sketches, as nnU-Net computes them on the pool.

    Returns the synthetic ``spacings``/``shapes_after_crop`` lists, the pooled
    ``median_relative_size_after_cropping`` and a record of the aggregates (and of any
    order statistic the sketches could not pin down exactly).
    """
    n = int(sum(s["num_cases"] for s in summaries))
    n_axes = len(summaries[0]["spacing"])
    q = GeometryQuery(n)

    def merged(field: str, ax: int | None = None) -> dict:
        return merge_sketches(s[field] if ax is None else s[field][ax] for s in summaries)

    s50 = [q.percentile(merged("spacing", a), 50, f"spacing axis {a}") for a in range(n_axes)]
    s10 = [q.percentile(merged("spacing", a), 10, f"spacing axis {a}") for a in range(n_axes)]
    h50 = [
        q.percentile(merged("shape_after_crop", a), 50, f"shape axis {a}") for a in range(n_axes)
    ]
    target = target_spacing(s50, s10, h50)
    mid_ranks = percentile_ranks(n, 50)
    mids = []
    for a in range(n_axes):
        by_rank = resampled_shape_ranks(
            merged("extent_mm", a), mid_ranks, float(target[a]), q, f"extent axis {a}"
        )
        mids.append([by_rank[r] for r in sorted(set(mid_ranks))] * (2 if n % 2 else 1))
    rel = q.percentile(merged("relative_size_after_cropping"), 50, "relative size")
    spacings, shapes = synthetic_geometry(n, s50, s10, h50, mids, target)
    return {
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "median_relative_size_after_cropping": rel,
        "aggregates": {
            "num_cases": n,
            "median_spacing": s50,
            "percentile_10_spacing": s10,
            "median_shape_after_crop": h50,
            "target_spacing": [float(t) for t in target],
            "median_shape_after_resampling": [float(np.mean(m)) for m in mids],
            "median_relative_size_after_cropping": rel,
            "approximate": q.approximate,
        },
    }


def merge_fingerprint_summaries(
    summaries: Sequence[Mapping], limits: SummaryLimits = SummaryLimits()
) -> dict:
    """One ``dataset_fingerprint.json`` for nnU-Net's unchanged planner, from aggregates only.

    ``spacings`` and ``shapes_after_crop`` are synthetic (see
    :func:`fednnunet.core.geometry_sketch.synthetic_geometry`): nnU-Net's planner computes
    from them exactly the pooled medians/percentiles, yet no entry is a site's case. The
    extra ``fednnunet`` key (ignored by nnU-Net) records the aggregates and whether any
    was approximate. Order-independent.
    """
    parsed = validate_compatible(summaries, limits)
    sketch = parsed[0]["sketch"]
    channels = sorted(parsed[0]["channel_names"], key=int)
    props = {}
    for ch in channels:
        merged = merge_channel_summaries([s["intensity_per_channel"][ch] for s in parsed])
        props[ch] = channel_statistics(merged, sketch)
    try:
        geo = merge_geometry(parsed)
    except (ValueError, ArithmeticError, AssertionError) as exc:  # never a hang or a crash
        raise DatasetError(f"geometry merge failed: {' '.join(str(exc).split())[:300]}") from exc
    return {
        "spacings": geo["spacings"],
        "shapes_after_crop": geo["shapes_after_crop"],
        "foreground_intensity_properties_per_channel": props,
        "median_relative_size_after_cropping": geo["median_relative_size_after_cropping"],
        "fednnunet": {
            "schema": MERGED_SCHEMA,
            "num_sites": len(parsed),
            "geometry": geo["aggregates"],
            "note": "spacings/shapes_after_crop are synthetic rows reproducing the pooled "
            "percentiles nnU-Net's planner reads; no row is a case",
        },
    }
