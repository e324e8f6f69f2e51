"""Tiny synthetic nnU-Net v2 raw datasets for demos and tests.

Each case is a "body" (nonzero ellipsoid, zero outside so nnU-Net's crop-to-nonzero
has something to do) containing bright ellipsoids (label 1) and darker cubes
(label 2). Sites differ in voxel spacing, intensity scale/shift and noise so that
merging their fingerprints is a real statistical problem, not a no-op.

``make_demo_federation(..., hard=True)`` is a harder federation for quality benchmarks:
sites of different size, with low contrast and strong noise at some, thick slices at
one, and different class balance (one site rarely has a cube), so that a site trained
alone has clearly less to learn from than the federation.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

LABELS = {"background": 0, "sphere": 1, "cube": 2}
CHANNEL_NAMES = {"0": "MRI"}

# Per-site acquisition differences used by make_demo_federation (cycled if more sites).
_SITE_VARIANTS = (
    {"spacing": (2.0, 0.8, 0.8), "intensity_scale": 1.0, "intensity_shift": 0.0, "noise": 0.05},
    {"spacing": (3.0, 0.7, 0.7), "intensity_scale": 1.8, "intensity_shift": 60.0, "noise": 0.10},
    {"spacing": (2.5, 1.0, 1.0), "intensity_scale": 0.6, "intensity_shift": -20.0, "noise": 0.15},
)

# The hard profile (cycled if more sites): (tissue, sphere, cube) means set the contrast,
# cube_prob the class balance, num_cases the site size.
_HARD_SITE_VARIANTS = (
    {  # small site, thick slices, noisy, low contrast, cubes rare
        "num_cases": 6,
        "spacing": (4.0, 0.7, 0.7),
        "intensity_scale": 1.0,
        "intensity_shift": 0.0,
        "noise": 0.30,
        "label_means": (100.0, 150.0, 65.0),
        "cube_prob": 0.4,
    },
    {  # large site, fine spacing, bright scanner, clean, cubes nearly always
        "num_cases": 12,
        "spacing": (1.5, 0.9, 0.9),
        "intensity_scale": 2.5,
        "intensity_shift": 150.0,
        "noise": 0.08,
        "label_means": (100.0, 220.0, 40.0),
        "cube_prob": 0.95,
    },
    {  # mid-size site, coarse in-plane spacing, dark scanner, weak sphere contrast
        "num_cases": 9,
        "spacing": (2.5, 1.2, 1.2),
        "intensity_scale": 0.5,
        "intensity_shift": -30.0,
        "noise": 0.20,
        "label_means": (100.0, 135.0, 60.0),
        "cube_prob": 0.7,
    },
)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def _ellipsoid(grid: tuple[np.ndarray, ...], center, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii, strict=True)) <= 1.0


def _make_case(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    intensity_scale: float,
    intensity_shift: float,
    noise: float,
    label_means: tuple[float, float, float] = (100.0, 220.0, 40.0),
    cube_prob: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair; label 1 bright ellipsoids, label 2 dark cubes.

    ``cube_prob`` < 1 leaves the cube out of some cases (class balance); the default draws
    exactly the random numbers it always drew, so the default demo data never changes.
    """
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    shp = np.array(shape, dtype=float)
    # Body: random size/position so shapes_after_crop and relative sizes vary by case.
    body_c = shp / 2 + rng.uniform(-0.08, 0.08, 3) * shp
    body_r = shp * rng.uniform(0.30, 0.46, 3)
    body = _ellipsoid(grid, body_c, body_r)

    label = np.zeros(shape, dtype=np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        r = body_r * rng.uniform(0.30, 0.45, 3)
        c = body_c + rng.uniform(-0.35, 0.35, 3) * body_r
        label[_ellipsoid(grid, c, r) & body] = 1
    half = np.maximum((body_r * rng.uniform(0.2, 0.3)).astype(int), 1)
    c = (body_c + rng.uniform(-0.4, 0.4, 3) * body_r).astype(int)
    sl = tuple(slice(max(ci - h, 0), ci + h) for ci, h in zip(c, half, strict=True))
    cube = np.zeros(shape, dtype=bool)
    cube[sl] = True
    if cube_prob >= 1.0 or rng.uniform() < cube_prob:
        label[cube & body] = 2

    # Default: tissue 100, spheres 220, cubes 40, all with a per-case gain (scanner drift).
    tissue, sphere, cube_mean = label_means
    base = np.where(label == 1, sphere, np.where(label == 2, cube_mean, tissue))
    gain = rng.uniform(0.9, 1.1)
    img = base * gain * (1.0 + noise * rng.standard_normal(shape))
    img = img * intensity_scale + intensity_shift
    img = np.where(body, img, 0.0).astype(np.float32)
    # Nonzero inside the body is what crop_to_nonzero relies on; avoid exact zeros there.
    img[body & (img == 0)] = np.float32(1e-3)
    return img, label


def _write(arr: np.ndarray, spacing: Sequence[float], path: Path) -> None:
    import SimpleITK as sitk

    itk = sitk.GetImageFromArray(arr)
    # numpy/nnU-Net order is (z, y, x); SimpleITK wants (x, y, z).
    itk.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing))))
    sitk.WriteImage(itk, str(path))


def _write_dataset_json(folder: Path, num_training: int, file_ending: str) -> None:
    ds = {
        "channel_names": CHANNEL_NAMES,
        "labels": LABELS,
        "numTraining": num_training,
        "file_ending": file_ending,
        "name": folder.name,
        "description": "fednnunet synthetic demo data",
    }
    (folder / "dataset.json").write_text(json.dumps(ds, indent=2))


def make_demo_dataset(
    raw_root: Path,
    dataset_id: int,
    name: str,
    num_cases: int = 8,
    shape=(32, 64, 64),
    spacing=(2.0, 0.8, 0.8),
    intensity_scale: float = 1.0,
    intensity_shift: float = 0.0,
    noise: float = 0.1,
    seed: int = 0,
    file_ending: str = ".nii.gz",
    label_means: tuple[float, float, float] = (100.0, 220.0, 40.0),
    cube_prob: float = 1.0,
) -> Path:
    """Write ``raw_root/DatasetXXX_name`` (imagesTr, labelsTr, dataset.json); deterministic."""
    folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng([seed, dataset_id])
    prefix = name.lower()
    for i in range(num_cases):
        img, lab = _make_case(
            rng,
            tuple(shape),
            intensity_scale,
            intensity_shift,
            noise,
            label_means=label_means,
            cube_prob=cube_prob,
        )
        case = f"{prefix}_{i:03d}"
        _write(img, spacing, folder / "imagesTr" / f"{case}_0000{file_ending}")
        _write(lab, spacing, folder / "labelsTr" / f"{case}{file_ending}")
    _write_dataset_json(folder, num_cases, file_ending)
    return folder


def make_demo_federation(
    raw_root: Path,
    dataset_ids: Sequence[int] = (901, 902, 903),
    num_cases: int = 8,
    shape=(32, 64, 64),
    seed: int = 0,
    hard: bool = False,
) -> list[Path]:
    """One demo dataset per site, each with its own spacing / intensity profile / noise.

    ``hard``: the harder profile (see the module docstring); each site then has its own
    number of cases and ``num_cases`` is ignored, and datasets are named ``HardSiteN``.
    """
    out = []
    for k, ds_id in enumerate(dataset_ids):
        if hard:
            variant = dict(_HARD_SITE_VARIANTS[k % len(_HARD_SITE_VARIANTS)])
            name, cases = f"HardSite{k + 1}", int(variant.pop("num_cases"))
        else:
            variant = dict(_SITE_VARIANTS[k % len(_SITE_VARIANTS)])
            name, cases = f"DemoSite{k + 1}", num_cases
        out.append(
            make_demo_dataset(
                raw_root, ds_id, name, num_cases=cases, shape=shape, seed=seed, **variant
            )
        )
    return out
