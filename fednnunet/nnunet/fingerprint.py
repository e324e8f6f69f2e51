"""Site-side fingerprint: nnU-Net's own ``dataset_fingerprint.json`` plus a mergeable summary.

The summary (schema ``fednnunet.fingerprint_summary/2``) is what leaves the site. It holds
only aggregates, never a per-case list: per-axis sketches of spacing, shape after crop and
physical extent, a sketch of relative size after cropping (see
``fednnunet.core.geometry_sketch``), and per channel exact moments, min/max and a
fixed-edge intensity histogram (see ``fednnunet.core.fingerprint_merge``). No voxel values.

Site policy (environment, read at extraction): ``FEDNNUNET_MIN_CASES`` (default 3) - a site
with fewer training cases refuses to send statistics; ``FEDNNUNET_FINGERPRINT_NOISE``
(default 0) - Laplace noise scale (in cases) on every geometry sketch mass. Intensity
histograms are not noised: their masses are fractions of a case per bucket over thousands
of buckets, so noise in case units swamps them (bench/b8_fingerprint_noise.py).

Each case is read and cropped exactly as nnU-Net's ``DatasetFingerprintExtractor`` does
(same reader/writer, ``crop_to_nonzero``, foreground = label > 0), but all foreground
voxels are used instead of a random sample, so the merged result is the expectation of
what nnU-Net computes on the pooled data.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fednnunet.core.fingerprint_merge import (
    DEFAULT_SKETCH,
    SCHEMA,
    merge_channel_summaries,
    summarize_channel_cases,
)
from fednnunet.core.fingerprint_schema import validate_summary
from fednnunet.core.geometry_sketch import GEOMETRY_SKETCH, summarize_geometry
from fednnunet.errors import DatasetError
from fednnunet.nnunet.compat import POOL_MIN_CASES, inline_pools, nnunet_env


def summarize_case(
    image_files: list[str], seg_file: str, reader_writer_class, sketch: Mapping
) -> dict:
    """Per-case geometry and per-channel foreground summaries (never leaves the site)."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    rw = reader_writer_class()
    images, props = rw.read_images(image_files)
    seg, _ = rw.read_seg(seg_file)
    cropped, seg_cropped, _ = crop_to_nonzero(images, seg)
    fg = seg_cropped[0] > 0
    channels = {}
    for c in range(cropped.shape[0]):
        channels[str(c)] = summarize_channel_cases([cropped[c][fg]], sketch)
    return {
        "spacing": [float(s) for s in props["spacing"]],
        "shape_after_crop": [int(s) for s in cropped.shape[1:]],
        "relative_size_after_cropping": float(
            np.prod(cropped.shape[1:], dtype=np.float64) / np.prod(images.shape[1:])
        ),
        "channels": channels,
    }


def _run_nnunet_extractor(dataset_id: int, num_processes: int) -> dict:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )

    fpe = DatasetFingerprintExtractor(dataset_id, num_processes=num_processes)
    fpe.show_progress_bar = False
    return fpe.run(overwrite_existing=True)


DEFAULT_MIN_CASES = 3


def site_privacy_policy() -> tuple[int, float]:
    """``(min_cases, fingerprint_noise)`` from the site's environment (clear error if bad)."""
    try:
        min_cases = int(os.environ.get("FEDNNUNET_MIN_CASES", DEFAULT_MIN_CASES))
        noise = float(os.environ.get("FEDNNUNET_FINGERPRINT_NOISE", 0.0))
    except ValueError as exc:
        raise DatasetError(f"bad site privacy setting: {exc}") from None
    if min_cases < 1 or not (0.0 <= noise < float("inf")):
        raise DatasetError("FEDNNUNET_MIN_CASES must be >= 1 and FEDNNUNET_FINGERPRINT_NOISE >= 0")
    return min_cases, noise


def summarize_dataset(
    dataset_id: int,
    num_processes: int = 2,
    sketch: Mapping = DEFAULT_SKETCH,
    min_cases: int | None = None,
    fingerprint_noise: float | None = None,
    rng=None,
) -> dict:
    """The mergeable site summary; nnU-Net paths must already point at the dataset.

    Refuses (DatasetError) with fewer than ``min_cases`` training cases: below a minimum
    cohort even aggregates describe individual patients.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    name = maybe_convert_to_dataset_name(dataset_id)
    folder = Path(os.fspath(nnUNet_raw)) / name
    ds_json = check_raw_dataset(folder)
    inline = num_processes <= 1 or int(ds_json["numTraining"]) < POOL_MIN_CASES
    with inline_pools(inline):
        dataset = get_filenames_of_train_images_and_targets(str(folder), ds_json)
    if not dataset:
        raise DatasetError(f"{name}: no training cases found in {folder}")
    keys = list(dataset)
    policy_min, policy_noise = site_privacy_policy()
    min_cases = policy_min if min_cases is None else min_cases
    noise = policy_noise if fingerprint_noise is None else fingerprint_noise
    if len(keys) < min_cases:
        raise DatasetError(
            f"{name}: {len(keys)} training cases, fewer than the minimum cohort of "
            f"{min_cases}; this site does not contribute statistics"
        )
    rw_class = determine_reader_writer_from_dataset_json(ds_json, dataset[keys[0]]["images"][0])
    args = [(dataset[k]["images"], dataset[k]["label"], rw_class, dict(sketch)) for k in keys]
    if num_processes > 1 and len(keys) >= POOL_MIN_CASES:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            cases = pool.starmap(summarize_case, args)
    else:
        cases = [summarize_case(*a) for a in args]

    channel_names = ds_json.get("channel_names", ds_json.get("modality"))
    rng = rng if rng is not None else np.random.default_rng()
    per_channel = {
        ch: merge_channel_summaries([c["channels"][ch] for c in cases]) for ch in channel_names
    }
    summary = {
        "schema": SCHEMA,
        "dataset_name": name,
        "num_cases": len(cases),
        "channel_names": dict(channel_names),
        "labels": dict(ds_json["labels"]),
        "file_ending": ds_json["file_ending"],
        "sketch": dict(sketch),
        "geometry_sketch": dict(GEOMETRY_SKETCH),
        **summarize_geometry(cases, GEOMETRY_SKETCH, noise, rng),
        "intensity_per_channel": per_channel,
        "noise": {"scale": float(noise)},
    }
    return validate_summary(json.loads(json.dumps(summary, allow_nan=False)))


REQUIRED_DATASET_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


def check_raw_dataset(folder: Path) -> dict:
    """Catch the common mistakes in an nnU-Net raw dataset with one clear line each.

    Returns the parsed dataset.json. (nnU-Net's own integrity check runs at planning.)
    """
    name = folder.name
    ds_file = folder / "dataset.json"
    if not ds_file.is_file():
        raise DatasetError(f"{name}: dataset.json missing in {folder}")
    try:
        ds_json = json.loads(ds_file.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{name}: dataset.json is not valid JSON (line {exc.lineno}, "
            f"column {exc.colno}: {exc.msg})"
        ) from None
    if not isinstance(ds_json, dict):
        raise DatasetError(f"{name}: dataset.json must be a JSON object")
    if "modality" in ds_json and "channel_names" not in ds_json:
        ds_json["channel_names"] = ds_json["modality"]
    missing = [k for k in REQUIRED_DATASET_KEYS if k not in ds_json]
    if missing:
        raise DatasetError(f"{name}: dataset.json lacks {', '.join(missing)}")
    if "dataset" in ds_json:  # explicit file lists: nnU-Net checks them at planning
        return ds_json
    ending = ds_json["file_ending"]
    images = folder / "imagesTr"
    labels = folder / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        raise DatasetError(f"{name}: imagesTr/ and labelsTr/ are required")
    n_channels = len(ds_json["channel_names"])
    cases = sorted({p.name[: -len(ending) - 5] for p in images.glob(f"*_0000{ending}")})
    if not cases:
        others = sorted({"".join(p.suffixes) for p in images.iterdir() if p.is_file()})
        raise DatasetError(
            f"{name}: no images ending in _0000{ending} in imagesTr "
            f"(found endings: {', '.join(others) or 'none'}; check file_ending)"
        )
    for case in cases:
        for ch in range(n_channels):
            if not (images / f"{case}_{ch:04d}{ending}").is_file():
                raise DatasetError(
                    f"{name}: case {case} lacks channel {ch} ({case}_{ch:04d}{ending})"
                )
        if not (labels / f"{case}{ending}").is_file():
            raise DatasetError(f"{name}: case {case} has no label file labelsTr/{case}{ending}")
    if int(ds_json["numTraining"]) != len(cases):
        raise DatasetError(
            f"{name}: dataset.json says numTraining={ds_json['numTraining']} "
            f"but imagesTr has {len(cases)} cases"
        )
    return ds_json


def local_case_identifiers(dataset_id: int, raw_root: Path | None = None) -> set[str]:
    """Every case identifier this site's raw dataset names (what must never leave it).

    Taken from the file names in imagesTr/labelsTr (channel suffix and ending removed),
    whatever state the dataset is in; an unreadable dataset yields what could be read.
    """
    found: set[str] = set()
    try:
        with nnunet_env(raw_root, None):
            from nnunetv2.paths import nnUNet_raw
            from nnunetv2.utilities.dataset_name_id_conversion import (
                maybe_convert_to_dataset_name,
            )

            folder = Path(os.fspath(nnUNet_raw)) / maybe_convert_to_dataset_name(dataset_id)
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            for path in (folder / sub).glob("*"):
                stem = path.name.split(".", 1)[0]
                found.add(stem)
                if sub != "labelsTr" and re.fullmatch(r".+_\d{4}", stem):
                    found.add(stem[:-5])
    except (OSError, RuntimeError, TypeError, ValueError):
        pass
    return found


def extract_site_fingerprint(
    dataset_id: int,
    num_processes: int = 2,
    raw_root: Path | None = None,
    preprocessed_root: Path | None = None,
    run_nnunet: bool = True,
    min_cases: int | None = None,
    fingerprint_noise: float | None = None,
) -> dict:
    """Run nnU-Net's fingerprint extraction locally and return the mergeable site summary.

    nnU-Net's ``dataset_fingerprint.json`` is (re)written to the preprocessed folder so the
    site keeps a normal nnU-Net setup; ``run_nnunet=False`` skips that (faster, tests).
    """
    with nnunet_env(raw_root, preprocessed_root):
        try:
            from nnunetv2.paths import nnUNet_raw
            from nnunetv2.utilities.dataset_name_id_conversion import (
                maybe_convert_to_dataset_name,
            )

            check_raw_dataset(
                Path(os.fspath(nnUNet_raw)) / maybe_convert_to_dataset_name(dataset_id)
            )
            if run_nnunet:
                _run_nnunet_extractor(dataset_id, num_processes)
            summary = summarize_dataset(
                dataset_id, num_processes, min_cases=min_cases, fingerprint_noise=fingerprint_noise
            )
        except DatasetError:
            raise
        except (RuntimeError, FileNotFoundError, KeyError, ValueError, AssertionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DatasetError(f"fingerprint of dataset {dataset_id} failed: {first}") from e
    # Round-trip proves the summary is plain JSON (it travels through S3).
    return json.loads(json.dumps(summary, allow_nan=False))
