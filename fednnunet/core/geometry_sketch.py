"""Aggregate-only scan geometry: mergeable sketches and a planner-ready synthetic fingerprint.

Why: nnU-Net's planner reads only a few order statistics of the per-case ``spacings`` and
``shapes_after_crop`` lists (nnunetv2 2.8.1, ``ExperimentPlanner``):

- per axis ``np.percentile(spacings, 50)`` (target spacing, transpose, printed median),
- on the anisotropic axis ``np.percentile(spacings[:, axis], 10)``,
- per axis ``np.percentile(shapes_after_crop, 50)`` (anisotropy test, printed median),
- per axis ``np.median(round(spacing_i / target * shape_i))`` (median shape after
  resampling; drives patch size, 3d_lowres and the network).

The last one needs the target spacing, known only after merging. Because rounding and
dividing by a constant are monotonic, its order statistics are those of the physical
extent ``e_i = spacing_i * shape_i`` (mm) mapped through ``round(e / target)``; so every
site sends, in one phase, sketches of spacing, shape after crop and extent per axis
(plus relative size after cropping), and no second federated phase is needed.

Sketch: fixed log buckets (relative width ``2 * relative_accuracy``, edges independent
of the site) that hold ``[mass, min, max]``; merging adds masses and takes min/max. An
order statistic is exact when its bucket holds one distinct value (``min == max``), when it
is the bucket's first or last element (then it is ``min``/``max``), or, for the resampled
shape, when ``round(min / t) == round(max / t)``. Otherwise it is within the bucket (error
at most ``2 * relative_accuracy`` relative) and the merge reports it as approximate.

The fingerprint handed to nnU-Net then holds *synthetic* per-axis lists (see
:func:`synthetic_geometry`) whose percentiles/medians under nnU-Net's exact formulas are
the merged aggregates; none of their entries is a case of any site. Pure: numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fednnunet.errors import DatasetError

GEOMETRY_SKETCH = {"kind": "log-bucket-minmax", "relative_accuracy": 1e-3}
# nnU-Net's default (nnunetv2.configuration.ANISO_THRESHOLD); checked against it in tests.
ANISOTROPY_THRESHOLD = 3
# Synthetic lists have this many rows (+1 for an even case count): enough that the
# 10th-percentile slots sit above the rows that carry the resampled-shape medians.
MIN_SYNTHETIC_ROWS = 21


def _log_gamma(relative_accuracy: float) -> float:
    a = float(relative_accuracy)
    return math.log((1.0 + a) / (1.0 - a))


def bucket_of(value: float, relative_accuracy: float) -> int:
    """Index ``k`` of the bucket ``(gamma^(k-1), gamma^k]`` that holds a positive value."""
    return int(math.ceil(math.log(value) / _log_gamma(relative_accuracy)))


def bucket_bounds(k: int, relative_accuracy: float) -> tuple[float, float]:
    lg = _log_gamma(relative_accuracy)
    return math.exp((k - 1) * lg), math.exp(k * lg)


def sketch_values(values: Iterable[float], relative_accuracy: float) -> dict[str, list[float]]:
    """Sketch of positive values: ``{bucket: [count, min, max]}`` (JSON-ready)."""
    out: dict[str, list[float]] = {}
    for v in values:
        v = float(v)
        if not (v > 0 and math.isfinite(v)):
            raise DatasetError(f"geometry value {v!r} is not a positive finite number")
        k = str(bucket_of(v, relative_accuracy))
        if k in out:
            b = out[k]
            b[0] += 1.0
            b[1], b[2] = min(b[1], v), max(b[2], v)
        else:
            out[k] = [1.0, v, v]
    return out


def merge_sketches(sketches: Iterable[Mapping[str, Sequence[float]]]) -> dict[str, list[float]]:
    """Add masses, keep min/max; ``fsum`` so the result does not depend on site order."""
    parts: dict[str, list[Sequence[float]]] = {}
    for s in sketches:
        for k, b in s.items():
            parts.setdefault(k, []).append(b)
    return {
        k: [math.fsum(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs)]
        for k, bs in parts.items()
    }


def add_noise(
    sketch: Mapping[str, Sequence[float]], scale: float, rng: np.random.Generator
) -> dict[str, list[float]]:
    """Laplace noise on the masses, clipped at 0 and rescaled to the same total.

    The total (the site's case count) is declared anyway; what the noise blurs is how
    many cases fall into which bucket. Min/max are not noised (see docs/privacy.md).
    """
    keys = sorted(sketch, key=int)
    masses = np.array([float(sketch[k][0]) for k in keys])
    total = float(masses.sum())
    noisy = np.clip(masses + rng.laplace(0.0, scale, size=masses.size), 0.0, None)
    if scale <= 0 or noisy.sum() <= 0:
        return {
            k: [float(m), float(sketch[k][1]), float(sketch[k][2])]
            for k, m in zip(keys, masses, strict=True)
        }
    noisy *= total / noisy.sum()
    return {
        k: [float(m), float(sketch[k][1]), float(sketch[k][2])]
        for k, m in zip(keys, noisy, strict=True)
        if m > 0
    }


def summarize_geometry(
    cases: Sequence[Mapping],
    geometry: Mapping = GEOMETRY_SKETCH,
    noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> dict:
    """Per-axis sketches of spacing, shape after crop and extent (mm); optional noise.

    ``cases``: dicts with ``spacing``, ``shape_after_crop``, ``relative_size_after_cropping``
    (computed at the site; only the sketches leave it).
    """
    acc = float(geometry["relative_accuracy"])
    n_axes = len(cases[0]["spacing"])
    rng = rng if rng is not None else np.random.default_rng()

    def sk(values) -> dict:
        out = sketch_values(values, acc)
        return add_noise(out, noise, rng) if noise > 0 else out

    return {
        "spacing": [sk(c["spacing"][a] for c in cases) for a in range(n_axes)],
        "shape_after_crop": [sk(c["shape_after_crop"][a] for c in cases) for a in range(n_axes)],
        # spacing * shape as nnU-Net's compute_new_shape multiplies them (see geometry_sketch)
        "extent_mm": [
            sk(float(c["spacing"][a]) * float(c["shape_after_crop"][a]) for c in cases)
            for a in range(n_axes)
        ],
        "relative_size_after_cropping": sk(c["relative_size_after_cropping"] for c in cases),
    }


def order_statistic(
    sketch: Mapping[str, Sequence[float]], rank: int, total: int
) -> tuple[float, float, float]:
    """The ``rank``-th smallest (0-based) of ``total`` values: ``(estimate, low, high)``.

    ``low == high`` means the value is known exactly. Masses are rescaled to ``total`` so
    that noisy sketches still address ranks 0..total-1.
    """
    items = sorted(((int(k), b) for k, b in sketch.items() if b[0] > 0), key=lambda t: t[0])
    if not items:
        raise DatasetError("empty geometry sketch")
    mass = math.fsum(b[0] for _, b in items)
    scale = total / mass
    # Element ``rank`` occupies cumulative mass [rank, rank + 1); look up its centre, so
    # that noisy masses (drift < 0.5 case) still find the same bucket.
    centre = rank + 0.5
    cum = 0.0
    for i, (_, (m, lo, hi)) in enumerate(items):
        m = m * scale
        last = i == len(items) - 1
        if centre < cum + m or last:
            if lo == hi:
                return lo, lo, hi
            if centre - cum < 1.0:
                return lo, lo, lo  # first element of the bucket is its minimum
            if cum + m - centre <= 1.0:
                return hi, hi, hi  # last element is its maximum
            est = math.sqrt(lo * hi)  # log-midpoint of what the bucket holds
            return est, lo, hi
        cum += m
    raise AssertionError("unreachable")


def _numpy_percentile(values_at: Mapping[int, float], n: int, q: float) -> float:
    """``np.percentile`` of an ``n``-list whose needed order statistics are given.

    Builds a sorted stand-in list (each needed rank holds its value, the rest copy their
    neighbours) and calls numpy itself, so the interpolation is bit-identical.
    """
    ranks = sorted(values_at)
    arr = np.empty(n, dtype=np.float64)
    for i in range(n):
        below = [r for r in ranks if r <= i]
        arr[i] = values_at[below[-1] if below else ranks[0]]
    return float(np.percentile(arr, q))


def percentile_ranks(n: int, q: float) -> tuple[int, int]:
    """The two ranks numpy's linear percentile interpolates between (as numpy computes them)."""
    vi = float(np.true_divide(q, 100) * (n - 1))
    return int(math.floor(vi)), int(math.ceil(vi))


class GeometryQuery:
    """Answers percentiles from a merged sketch and records which answers were approximate."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.approximate: list[str] = []

    def stats(self, sketch: Mapping, ranks: Iterable[int], what: str) -> dict[int, float]:
        out = {}
        for r in sorted(set(ranks)):
            est, lo, hi = order_statistic(sketch, r, self.total)
            if lo != hi:
                self.approximate.append(f"{what} rank {r} in [{lo:.6g}, {hi:.6g}]")
            out[r] = est
        return out

    def percentile(self, sketch: Mapping, q: float, what: str) -> float:
        ranks = percentile_ranks(self.total, q)
        return _numpy_percentile(self.stats(sketch, ranks, what), self.total, q)


def target_spacing(
    median_spacing: Sequence[float],
    p10_spacing: Sequence[float],
    median_shape: Sequence[float],
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """nnU-Net's ``determine_fullres_target_spacing`` from the aggregates it reads."""
    target = np.array(median_spacing, dtype=np.float64)
    target_size = np.array(median_shape, dtype=np.float64)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacings = [target[i] for i in others]
    other_sizes = [target_size[i] for i in others]
    aniso_spacing = target[worst] > (anisotropy_threshold * max(other_spacings))
    aniso_voxels = target_size[worst] * anisotropy_threshold < min(other_sizes)
    if aniso_spacing and aniso_voxels:
        t = p10_spacing[worst]
        if t < max(other_spacings):
            t = max(max(other_spacings), t) + 1e-5
        target[worst] = t
    return target


def resampled_shape_ranks(
    extent_sketch: Mapping, ranks: Iterable[int], target: float, query: GeometryQuery, what: str
) -> dict[int, int]:
    """Order statistics of ``round(extent / target)`` (nnU-Net's ``compute_new_shape``)."""
    out = {}
    for r in sorted(set(ranks)):
        est, lo, hi = order_statistic(extent_sketch, r, query.total)
        if lo != hi and round(lo / target) != round(hi / target):
            query.approximate.append(f"{what} rank {r} in [{lo:.6g}, {hi:.6g}] mm")
        out[r] = int(round(est / target))
    return out


def synthetic_geometry(
    n_cases: int,
    spacing_p50: Sequence[float],
    spacing_p10: Sequence[float],
    shape_p50: Sequence[float],
    new_shape_mid: Sequence[Sequence[int]],
    target: Sequence[float],
) -> tuple[list[list[float]], list[list[float]]]:
    """``spacings`` and ``shapes_after_crop`` lists that make nnU-Net plan as on the pool.

    Per axis, with ``L`` rows (21, or 22 when ``n_cases`` is even, so that the
    resampled-shape median averages the same two integers as on the pool; nnU-Net never
    uses the list length), rows are of five kinds:

    - D (1 or 2 rows): tiny spacing, huge shape chosen so ``round(s / t * h)`` is exactly
      the pooled middle resampled shape(s) -> bottom of spacings, top of shapes;
    - A: (p10 spacing, tiny shape), B: (median spacing, tiny shape) -> resampled 0;
    - C (1 or 2 rows): (huge spacing, median shape) -> top, so the shape median is exact;
    - E: (huge, huge).

    Each needed percentile slot holds the exact pooled value on both interpolation
    neighbours, so numpy returns it bit for bit. Rows are per axis; no row is a case.
    """
    n_axes = len(target)
    d = 1 if n_cases % 2 else 2
    rows = MIN_SYNTHETIC_ROWS + (d == 2)  # constant: the list length reveals nothing
    c10 = percentile_ranks(rows, 10)[1]
    c50 = percentile_ranks(rows, 50)[1]
    n_a, n_b = c10 - d + 1, c50 - c10
    n_e = rows - 1 - c50 - d
    columns_s, columns_h = [], []
    for ax in range(n_axes):
        t = float(target[ax])
        mids = [int(v) for v in new_shape_mid[ax]][:d]
        if min(mids) < 1:
            raise DatasetError(f"median shape after resampling is 0 on axis {ax}")
        s50, s10, h50 = float(spacing_p50[ax]), float(spacing_p10[ax]), float(shape_p50[ax])
        s_lo = min(s10, min(mids) * t / h50) * 1e-3
        h_lo = 1e-3 * t / max(s50, s10)
        s_hi = max(s50, max(mids) * t / h50) * 1e3
        h_hi = max(h50, max(mids)) * 1e3
        s_col = [s_lo] * d + [s10] * n_a + [s50] * n_b + [s_hi] * d + [s_hi] * n_e
        h_col = [m / (s_lo / t) for m in mids] + [h_lo] * (n_a + n_b) + [h50] * d + [h_hi] * n_e
        columns_s.append(s_col)
        columns_h.append(h_col)
    spacings = [[columns_s[a][i] for a in range(n_axes)] for i in range(rows)]
    shapes = [[columns_h[a][i] for a in range(n_axes)] for i in range(rows)]
    _check_synthetic(spacings, shapes, spacing_p50, spacing_p10, shape_p50, new_shape_mid, target)
    return spacings, shapes


def _check_synthetic(spacings, shapes, s50, s10, h50, mids, target) -> None:
    """Recompute with nnU-Net's formulas; a mismatch is a bug here, never silently planned."""
    sp, sh = np.vstack(spacings), np.vstack(shapes)
    new = np.array(
        [
            [int(round(i / j * k)) for i, j, k in zip(a, target, b, strict=True)]
            for a, b in zip(spacings, shapes, strict=True)
        ]
    )
    ok = (
        np.array_equal(np.percentile(sp, 50, 0), np.asarray(s50, dtype=np.float64))
        and np.array_equal(np.percentile(sp, 10, 0), np.asarray(s10, dtype=np.float64))
        and np.array_equal(np.percentile(sh, 50, 0), np.asarray(h50, dtype=np.float64))
        and np.array_equal(np.median(new, 0), np.array([np.mean(m) for m in mids]))
    )
    if not ok:
        raise AssertionError("synthetic geometry does not reproduce the merged aggregates")
