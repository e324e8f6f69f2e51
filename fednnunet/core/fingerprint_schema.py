"""Strict schema of the fingerprint summary a site sends (nothing else is accepted).

Why: the coordinator believes nothing a site says that it can check. A summary with
10^6 cases and tiny spacings would set every site's target spacing (preprocessing then
fills disks everywhere); NaN or huge histogram masses ruin normalisation. Every number
here is finite and range-checked, sketch totals agree with the declared case count, and
sizes are bounded, so a bad summary fails with one line naming the site and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fednnunet.core.geometry_sketch import bucket_bounds
from fednnunet.errors import DatasetError

SCHEMA = "fednnunet.fingerprint_summary/2"


class FingerprintRejected(DatasetError):
    """A fingerprint summary that fails the schema or its range checks."""


@dataclass(frozen=True)
class SummaryLimits:
    """Bounds a coordinator enforces on every site summary (configurable per deployment)."""

    max_cases: int = 100_000
    min_spacing_mm: float = 1e-3
    max_spacing_mm: float = 1000.0  # 2d data uses 999 for the dummy axis
    max_shape: int = 100_000
    max_buckets: int = 20_000
    max_abs_intensity: float = 1e12
    max_voxels_per_case: int = 10**10
    min_relative_accuracy: float = 1e-5
    max_relative_accuracy: float = 0.05


_Finite = Annotated[float, Field(allow_inf_nan=False)]
_NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class IntensitySketchSpec(_Strict):
    kind: Literal["ddsketch-log"]
    relative_accuracy: Annotated[float, Field(gt=0, lt=0.5, allow_inf_nan=False)]
    min_abs: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]


class GeometrySketchSpec(_Strict):
    kind: Literal["log-bucket-minmax"]
    relative_accuracy: Annotated[float, Field(gt=0, lt=0.5, allow_inf_nan=False)]


class Histogram(_Strict):
    zero: _NonNeg
    pos: dict[str, _NonNeg]
    neg: dict[str, _NonNeg]

    @field_validator("pos", "neg")
    @classmethod
    def _int_keys(cls, v: dict[str, float]) -> dict[str, float]:
        for k in v:
            if not k.lstrip("-").isdigit() or abs(int(k)) > 10**6:
                raise ValueError(f"bucket key {k!r} is not a bounded integer")
        return v


class ChannelSummary(_Strict):
    weight: _NonNeg
    num_voxels: Annotated[int, Field(ge=0)]
    mean: _Finite
    m2: _NonNeg
    min: _Finite | None
    max: _Finite | None
    hist: Histogram


class FingerprintNoise(_Strict):
    scale: _NonNeg = 0.0


class FingerprintSummary(_Strict):
    """What a site sends: counts, sketches and moments only, never a per-case list."""

    schema_: Literal["fednnunet.fingerprint_summary/2"] = Field(alias="schema")
    dataset_name: Annotated[str, Field(max_length=200)]
    num_cases: Annotated[int, Field(ge=1)]
    channel_names: dict[str, Annotated[str, Field(max_length=200)]]
    labels: dict[str, Any]
    file_ending: Annotated[str, Field(max_length=20)]
    sketch: IntensitySketchSpec
    geometry_sketch: GeometrySketchSpec
    spacing: list[dict[str, list[float]]]
    shape_after_crop: list[dict[str, list[float]]]
    extent_mm: list[dict[str, list[float]]]
    relative_size_after_cropping: dict[str, list[float]]
    intensity_per_channel: dict[str, ChannelSummary]
    noise: FingerprintNoise = FingerprintNoise()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _check_geometry(
    name: str,
    what: str,
    sk: dict[str, list[float]],
    n: int,
    lo: float,
    hi: float,
    acc: float,
    limits: SummaryLimits,
) -> None:
    if not sk:
        raise FingerprintRejected(f"{name}: {what} sketch is empty")
    if len(sk) > limits.max_buckets:
        raise FingerprintRejected(
            f"{name}: {what} sketch has {len(sk)} buckets (max {limits.max_buckets})"
        )
    total = 0.0
    for k, b in sk.items():
        if not k.lstrip("-").isdigit() or abs(int(k)) > 10**6:
            raise FingerprintRejected(f"{name}: {what} bucket key {k!r} is not a bounded integer")
        if len(b) != 3 or not all(isinstance(x, int | float) and math.isfinite(x) for x in b):
            raise FingerprintRejected(f"{name}: {what} bucket {k} is not [mass, min, max] finite")
        mass, vmin, vmax = (float(x) for x in b)
        if mass < 0 or mass > n * (1 + 1e-9):
            raise FingerprintRejected(f"{name}: {what} bucket {k} mass {mass} outside [0, {n}]")
        if not (lo <= vmin <= vmax <= hi):
            raise FingerprintRejected(
                f"{name}: {what} values [{vmin}, {vmax}] outside the allowed [{lo}, {hi}]"
            )
        b_lo, b_hi = bucket_bounds(int(k), acc)
        if not (b_lo * (1 - 1e-9) <= vmin and vmax <= b_hi * (1 + 1e-9)):
            raise FingerprintRejected(f"{name}: {what} bucket {k} min/max lie outside the bucket")
        total += mass
    if abs(total - n) > 1e-6 * n:
        raise FingerprintRejected(
            f"{name}: {what} sketch holds {total:g} cases but the summary declares {n}"
        )


def validate_summary(raw: Any, limits: SummaryLimits = SummaryLimits(), index: int = 0) -> dict:
    """Parse and range-check one site summary; returns it as a plain dict or raises one line."""
    label = f"site #{index}"
    if isinstance(raw, dict) and isinstance(raw.get("dataset_name"), str):
        label = raw["dataset_name"][:80]
    if isinstance(raw, dict) and raw.get("schema") != SCHEMA:
        raise FingerprintRejected(
            f"{label}: fingerprint summary schema {raw.get('schema')!r}, expected {SCHEMA!r}"
        )
    try:
        s = FingerprintSummary.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise FingerprintRejected(
            f"{label}: invalid fingerprint summary at {where}: {err['msg']}"
        ) from None
    n = s.num_cases
    if n > limits.max_cases:
        raise FingerprintRejected(f"{label}: {n} cases exceeds the cap of {limits.max_cases}")
    acc = s.geometry_sketch.relative_accuracy
    for spec in (acc, s.sketch.relative_accuracy):
        if not (limits.min_relative_accuracy <= spec <= limits.max_relative_accuracy):
            raise FingerprintRejected(f"{label}: sketch relative accuracy {spec} out of range")
    n_axes = len(s.spacing)
    if n_axes not in (2, 3) or len(s.shape_after_crop) != n_axes or len(s.extent_mm) != n_axes:
        raise FingerprintRejected(f"{label}: geometry sketches must cover the same 2 or 3 axes")
    for ax in range(n_axes):
        _check_geometry(
            label,
            f"spacing axis {ax}",
            s.spacing[ax],
            n,
            limits.min_spacing_mm,
            limits.max_spacing_mm,
            acc,
            limits,
        )
        _check_geometry(
            label,
            f"shape axis {ax}",
            s.shape_after_crop[ax],
            n,
            1.0,
            float(limits.max_shape),
            acc,
            limits,
        )
        _check_geometry(
            label,
            f"extent axis {ax}",
            s.extent_mm[ax],
            n,
            limits.min_spacing_mm,
            limits.max_spacing_mm * limits.max_shape,
            acc,
            limits,
        )
    _check_geometry(
        label, "relative size", s.relative_size_after_cropping, n, 1e-12, 1.0, acc, limits
    )
    if set(s.intensity_per_channel) != set(s.channel_names):
        raise FingerprintRejected(f"{label}: intensity summary does not match channel_names")
    for ch, c in s.intensity_per_channel.items():
        _check_channel(label, ch, c, n, limits)
    return s.model_dump(by_alias=True)


def _check_channel(label: str, ch: str, c: ChannelSummary, n: int, limits: SummaryLimits) -> None:
    where = f"{label}: channel {ch}"
    if c.weight > n:
        raise FingerprintRejected(f"{where}: weight {c.weight} exceeds the {n} cases")
    if c.num_voxels > limits.max_voxels_per_case * n:
        raise FingerprintRejected(f"{where}: {c.num_voxels} voxels is beyond any plausible scan")
    if len(c.hist.pos) + len(c.hist.neg) > limits.max_buckets:
        raise FingerprintRejected(f"{where}: histogram has too many buckets")
    if c.weight == 0:
        return
    big = limits.max_abs_intensity
    if c.min is None or c.max is None or not (-big <= c.min <= c.mean <= c.max <= big):
        raise FingerprintRejected(f"{where}: min/mean/max not ordered or beyond +-{big:g}")
    if c.m2 > c.weight * (c.max - c.min) ** 2 * (1 + 1e-9) + 1e-12:
        raise FingerprintRejected(f"{where}: variance larger than the value range allows")
    mass = c.hist.zero + sum(c.hist.pos.values()) + sum(c.hist.neg.values())
    if abs(mass - c.weight) > 1e-6 * max(c.weight, 1.0):
        raise FingerprintRejected(
            f"{where}: histogram mass {mass:g} differs from weight {c.weight:g}"
        )


def describe_summary(summary: dict) -> list[str]:
    """What a fingerprint summary tells the coordinator, in words (for the egress audit)."""
    n = summary.get("num_cases", "?")
    acc = summary.get("geometry_sketch", {}).get("relative_accuracy", "?")
    lines = [f"fingerprint summary ({summary.get('schema', '?')}): {n} cases"]
    for field, words in (
        ("spacing", "spacing sketch"),
        ("shape_after_crop", "shape-after-crop sketch"),
        ("extent_mm", "physical extent sketch"),
    ):
        axes = summary.get(field) or []
        if axes:
            buckets = "/".join(str(len(a)) for a in axes)
            lines.append(
                f"{words}: {len(axes)} axes, {buckets} buckets (relative width {acc}), {n} cases"
            )
    rel = summary.get("relative_size_after_cropping")
    if rel:
        lines.append(f"relative-size sketch: {len(rel)} buckets, {n} cases")
    for ch, c in sorted((summary.get("intensity_per_channel") or {}).items()):
        h = c.get("hist", {})
        nb = len(h.get("pos", {})) + len(h.get("neg", {})) + (1 if h.get("zero") else 0)
        lines.append(
            f"intensity channel {ch}: {nb} histogram buckets, mean/variance/min/max over "
            f"{c.get('num_voxels', '?')} foreground voxels of {c.get('weight', 0):g} cases"
        )
    noise = (summary.get("noise") or {}).get("scale", 0.0)
    lines.append(f"noise on sketch masses: Laplace scale {noise:g}" if noise else "no noise added")
    if any(k in summary for k in ("spacings", "shapes_after_crop")):
        lines.append("WARNING: per-case lists present (old schema)")
    return lines
