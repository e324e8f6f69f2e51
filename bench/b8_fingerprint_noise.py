"""B8 (P-noise): how much noise on fingerprint sketch masses
(``FEDNNUNET_FINGERPRINT_NOISE``) leaves
the plans unchanged.

nnU-Net's planner reads from the merged fingerprint only the aggregates in
``fingerprint["fednnunet"]["geometry"]`` (pooled median/10th-percentile spacing, median
shape after crop, median shape after resampling, median relative size against 0.75) plus
the intensity properties; the synthetic lists are a function of those aggregates. So the
plans' networks, patch sizes and spacings are unchanged exactly when these aggregates are
(tests/nnunet/test_aggregate_planning.py shows the plans equal pooled nnU-Net's when they
are exact). The product noises geometry sketches only; the last column shows what the
same noise would do to the intensity percentiles if the histogram were noised too.

Federations (per-case geometry only, no images: fast, pure): the 3 demo sites (8 cases
each), the anisotropic one (5 mm site), and a larger one (3 x 40 cases, 2 protocols per
site). Laplace scale in cases, per bucket; 40 trials per scale.

Run: ``.venv/bin/python -m bench.b8_fingerprint_noise`` (about a minute on 2 cores).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fednnunet.core.fingerprint_merge import (
    DEFAULT_SKETCH,
    merge_fingerprint_summaries,
    summarize_channel_cases,
)
from fednnunet.core.fingerprint_schema import SCHEMA
from fednnunet.core.geometry_sketch import GEOMETRY_SKETCH, summarize_geometry

SCALES = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
TRIALS = 30
PLAN_KEYS = (
    "median_spacing",
    "median_shape_after_crop",
    "target_spacing",
    "median_shape_after_resampling",
)


def federation(kind: str, rng: np.random.Generator) -> list[dict]:
    """Per site: cases (geometry) and per-case foreground intensities."""
    if kind == "demo":
        plan = [((2.0, 0.8, 0.8), 8), ((3.0, 0.7, 0.7), 8), ((2.5, 1.0, 1.0), 8)]
        protos = [[p] for p in plan]
    elif kind == "aniso":
        protos = [[((5.0, 0.7, 0.7), 4)], [((3.0, 0.7, 0.7), 3)], [((1.0, 0.7, 0.7), 3)]]
    else:
        protos = [
            [((1.0, 0.8, 0.8), 25), ((1.5, 0.8, 0.8), 15)],
            [((1.25, 0.9, 0.9), 30), ((3.0, 0.7, 0.7), 10)],
            [((0.8, 0.75, 0.75), 20), ((1.0, 0.75, 0.75), 20)],
        ]
    sites = []
    for k, site in enumerate(protos):
        cases, values = [], []
        for spacing, n in site:
            for _ in range(n):
                cases.append(
                    {
                        "spacing": list(spacing),
                        "shape_after_crop": [
                            int(v) for v in rng.integers([20, 40, 40], [32, 64, 64])
                        ],
                        "relative_size_after_cropping": float(rng.uniform(0.4, 0.9)),
                    }
                )
                values.append(rng.normal(100 + 40 * k, 15 + 5 * k, 2000))
        sites.append({"cases": cases, "values": values})
    return sites


def _noisy_hist(hist: Mapping, scale: float, rng) -> dict:
    """Laplace noise on intensity histogram masses (in cases), total kept (see add_noise)."""
    keys = [("zero", None)] + [(side, k) for side in ("pos", "neg") for k in hist[side]]
    masses = np.array([hist["zero"] if s == "zero" else hist[s][k] for s, k in keys])
    total = float(masses.sum())
    noisy = np.clip(masses + rng.laplace(0.0, scale, size=masses.size), 0.0, None)
    if noisy.sum() <= 0:
        return dict(hist)
    noisy *= total / noisy.sum()
    out: dict = {"zero": float(noisy[0]), "pos": {}, "neg": {}}
    for (side, k), m in zip(keys[1:], noisy[1:], strict=True):
        if m > 0:
            out[side][k] = float(m)
    return out


def summary(
    site: dict, noise: float, rng: np.random.Generator, name: str, intensity_noise: float = 0.0
) -> dict:
    """The site summary with product noise on geometry (``noise``) and, to show why the
    product does not do it, optional noise on the intensity histogram."""
    channel = summarize_channel_cases(site["values"])
    if intensity_noise > 0:
        channel["hist"] = _noisy_hist(channel["hist"], intensity_noise, rng)
    return json.loads(
        json.dumps(
            {
                "schema": SCHEMA,
                "dataset_name": name,
                "num_cases": len(site["cases"]),
                "channel_names": {"0": "MRI"},
                "labels": {"background": 0, "a": 1},
                "file_ending": ".nii.gz",
                "sketch": dict(DEFAULT_SKETCH),
                "geometry_sketch": dict(GEOMETRY_SKETCH),
                **summarize_geometry(site["cases"], GEOMETRY_SKETCH, noise, rng),
                "intensity_per_channel": {"0": channel},
                "noise": {"scale": noise},
            }
        )
    )


def plan_inputs(merged: dict) -> tuple:
    geo = merged["fednnunet"]["geometry"]
    return tuple(tuple(geo[k]) for k in PLAN_KEYS) + (
        merged["median_relative_size_after_cropping"] < 0.75,
    )


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for kind in ("demo", "aniso", "large"):
        sites = federation(kind, rng)
        exact = merge_fingerprint_summaries(
            [summary(s, 0.0, rng, f"s{i}") for i, s in enumerate(sites)]
        )
        ref_plan = plan_inputs(exact)
        ref_int = exact["foreground_intensity_properties_per_channel"]["0"]
        for scale in SCALES:
            same, worst_q, worst_shape, worst_spacing = 0, 0.0, 0.0, 0.0
            ref_geo = exact["fednnunet"]["geometry"]
            for _ in range(TRIALS):
                merged = merge_fingerprint_summaries(
                    [summary(s, scale, rng, f"s{i}") for i, s in enumerate(sites)]
                )
                same += plan_inputs(merged) == ref_plan
                geo = merged["fednnunet"]["geometry"]
                worst_shape = max(
                    worst_shape,
                    *np.abs(
                        np.subtract(
                            geo["median_shape_after_resampling"],
                            ref_geo["median_shape_after_resampling"],
                        )
                    ),
                )
                worst_spacing = max(
                    worst_spacing,
                    *np.abs(np.divide(geo["target_spacing"], ref_geo["target_spacing"]) - 1),
                )
                with_int = merge_fingerprint_summaries(
                    [summary(s, 0.0, rng, f"s{i}", scale) for i, s in enumerate(sites)]
                )
                got = with_int["foreground_intensity_properties_per_channel"]["0"]
                for k in ("percentile_00_5", "median", "percentile_99_5"):
                    worst_q = max(worst_q, abs(got[k] - ref_int[k]) / abs(ref_int[k]))
            n = sum(len(s["cases"]) for s in sites)
            rows.append(
                {
                    "federation": kind,
                    "cases": n,
                    "scale": scale,
                    "plans_unchanged": same / TRIALS,
                    "max_abs_change_median_resampled_shape_voxels": float(worst_shape),
                    "max_rel_change_target_spacing": float(worst_spacing),
                    "max_rel_change_intensity_percentiles_if_noised": worst_q,
                }
            )
            print(
                f"{kind:6s} N={n:3d} noise={scale:5.2f}  plans unchanged {same:2d}/{TRIALS}; "
                f"median resampled shape moves <= {worst_shape:g} vox, target spacing <= "
                f"{worst_spacing:.1%} "
                f"(if the intensity histogram were noised too: percentiles move up to "
                f"{worst_q:.1%})"
            )
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "fingerprint_noise.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
