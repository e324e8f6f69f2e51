"""Run nnU-Net's own planning and preprocessing at a site, optionally from a merged fingerprint.

FFE (federated fingerprint extraction): every site plans from the same merged fingerprint,
so the plans - and hence the network - agree everywhere except for fields that nnU-Net
derives from the local dataset itself (see ``SITE_SPECIFIC_FIELDS``). AsymFedAvg: each
site plans from its own fingerprint.

nnU-Net 2.8.1 reads ``nnUNet_raw``/``nnUNet_preprocessed`` from the environment at each use
(``nnunetv2.paths._EnvPath``), so callers set those variables as for plain nnU-Net.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fednnunet.errors import DatasetError
from fednnunet.nnunet.compat import (
    POOL_MIN_CASES,
    crossval_split,
    dataset_identifiers,
    inline_pools,
)
from fednnunet.settings import require_nnunet_paths, resolve_under

# Plans fields that differ between sites planned from the same fingerprint. Measured on
# nnU-Net 2.8.1: ``dataset_name`` and every configuration's ``batch_size`` (capped to 5 % of
# the *local* dataset, via dataset.json's numTraining). ``image_reader_writer`` follows the
# local file format. None of them changes the network's architecture or parameters.
SITE_SPECIFIC_FIELDS: tuple[str, ...] = ("dataset_name", "image_reader_writer")
SITE_SPECIFIC_CONFIG_FIELDS: tuple[str, ...] = ("batch_size",)

_MARKER = ".fednnunet_preprocessed.json"


def _comparable_plans(plans: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(plans)
    for key in SITE_SPECIFIC_FIELDS:
        out.pop(key, None)
    for conf in out.get("configurations", {}).values():
        for key in SITE_SPECIFIC_CONFIG_FIELDS:
            conf.pop(key, None)
    return out


def plans_sha256(plans: dict[str, Any]) -> str:
    """Hash of the plans without site-specific fields: equal hashes mean equal networks."""
    canon = json.dumps(_comparable_plans(plans), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _one_line(exc: BaseException) -> str:
    msg = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
    msg = " ".join(msg.split()) or type(exc).__name__
    return msg if len(msg) <= 400 else msg[:397] + "..."


def _dataset_name(dataset_id: int) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    try:
        return convert_id_to_dataset_name(dataset_id)
    except (RuntimeError, AssertionError) as exc:
        raise DatasetError(f"dataset {dataset_id}: {_one_line(exc)}") from exc


def _verify(raw_folder: Path, num_processes: int) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    dataset_json = raw_folder / "dataset.json"
    try:
        json.loads(dataset_json.read_text())
    except FileNotFoundError as exc:
        raise DatasetError(f"{raw_folder.name}: dataset.json missing") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{raw_folder.name}: dataset.json is not valid JSON ({exc})") from exc
    try:
        verify_dataset_integrity(str(raw_folder), num_processes)
    except (AssertionError, RuntimeError, FileNotFoundError, KeyError, ValueError) as exc:
        raise DatasetError(f"{raw_folder.name}: {_one_line(exc)}") from exc


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _inputs_sha256(raw_folder: Path, plans: dict[str, Any]) -> str:
    """What preprocessing depends on: the exact plans and the raw files (name, size, mtime)."""
    files = sorted(
        (str(p.relative_to(raw_folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in raw_folder.rglob("*")
        if p.is_file()
    )
    blob = json.dumps({"plans": plans, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _already_preprocessed(pp_folder: Path, inputs_sha: str, configurations: Sequence[str]) -> bool:
    """True if a previous call completed preprocessing of these configurations from these inputs."""
    try:
        done = json.loads((pp_folder / _MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return done.get("inputs_sha256") == inputs_sha and set(configurations) <= set(
        done.get("configurations", [])
    )


def plan_and_preprocess(
    dataset_id: int,
    configurations: Sequence[str],
    fingerprint: dict[str, Any] | None = None,
    plans_identifier: str = "nnUNetPlans",
    num_processes: int = 2,
    verify_dataset_integrity: bool = True,
    inline: bool | None = None,
) -> dict[str, Any]:
    """Plan and preprocess one local dataset with nnU-Net; return the plans dict.

    ``fingerprint`` given (FFE): it replaces the site's ``dataset_fingerprint.json``.
    Otherwise (AsymFedAvg) the site's own fingerprint is extracted. Idempotent: the plans
    file is regenerated from scratch (nnU-Net would otherwise keep stale configurations),
    and preprocessing is skipped when a completed run with identical plans is recorded.

    ``inline`` (default: below :data:`POOL_MIN_CASES` cases or one process) runs
    nnU-Net's per-case pools in this process instead of spawning workers.
    """
    if not configurations:
        raise DatasetError("no nnU-Net configuration requested for preprocessing")
    paths = require_nnunet_paths("nnUNet_raw", "nnUNet_preprocessed")
    name = _dataset_name(dataset_id)
    raw_folder = paths["nnUNet_raw"] / name
    if inline is None:
        inline = num_processes <= 1 or _num_training_cases(raw_folder) < POOL_MIN_CASES
    with inline_pools(inline):
        return _plan_and_preprocess(
            dataset_id,
            name,
            raw_folder,
            paths["nnUNet_preprocessed"] / name,
            configurations,
            fingerprint,
            plans_identifier,
            num_processes,
            verify_dataset_integrity,
        )


def _num_training_cases(raw_folder: Path) -> int:
    try:
        return int(json.loads((raw_folder / "dataset.json").read_text())["numTraining"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # _verify words the problem


def _plan_and_preprocess(
    dataset_id: int,
    name: str,
    raw_folder: Path,
    pp_folder: Path,
    configurations: Sequence[str],
    fingerprint: dict[str, Any] | None,
    plans_identifier: str,
    num_processes: int,
    verify_dataset_integrity: bool,
) -> dict[str, Any]:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    if verify_dataset_integrity:
        _verify(raw_folder, num_processes)
    pp_folder.mkdir(parents=True, exist_ok=True)
    try:
        if fingerprint is not None:
            _write_json_atomic(pp_folder / "dataset_fingerprint.json", fingerprint)
        else:
            extract_fingerprint_dataset(
                dataset_id, num_processes=num_processes, clean=True, verbose=False
            )
        # Deleted and rewritten below: it must be a plain file inside this dataset's folder.
        plans_file = resolve_under(pp_folder, f"{plans_identifier}.json")
        plans_file.unlink(missing_ok=True)
        overwrite = None if plans_identifier == "nnUNetPlans" else plans_identifier
        plans, _ = plan_experiment_dataset(dataset_id, overwrite_plans_name=overwrite)
        plans = json.loads(plans_file.read_text())  # as written: JSON types, like trainers see
        missing = [c for c in configurations if c not in plans["configurations"]]
        if missing:
            raise DatasetError(
                f"{name}: nnU-Net planned no configuration {', '.join(missing)} "
                f"(available: {', '.join(plans['configurations'])})"
            )
        inputs_sha = _inputs_sha256(raw_folder, plans)
        if not _already_preprocessed(pp_folder, inputs_sha, configurations):
            (pp_folder / _MARKER).unlink(missing_ok=True)
            preprocess_dataset(
                dataset_id,
                plans_identifier,
                list(configurations),
                [num_processes] * len(configurations),
                verbose=False,
                show_progress_bar=False,
            )
            _write_json_atomic(
                pp_folder / _MARKER,
                {"inputs_sha256": inputs_sha, "configurations": sorted(configurations)},
            )
    except DatasetError:
        raise
    except (AssertionError, FileNotFoundError, KeyError, ValueError) as exc:
        raise DatasetError(f"{name}: nnU-Net planning failed: {_one_line(exc)}") from exc
    return plans


def training_case_count(
    dataset_id: int, configuration: str, fold: int | str, plans_identifier: str = "nnUNetPlans"
) -> int:
    """How many cases the site's trainer will train on in ``fold``: its FedAvg weight,
    declared at planning and fixed for the experiment.

    Mirrors nnUNetTrainer.do_split (2.8.1): fold 'all' trains on every case; otherwise
    the folds of ``splits_final.json``, which is written here exactly as do_split would
    (seeded 5-fold split of the sorted identifiers) so that the trainer reads the same.
    """
    paths = require_nnunet_paths("nnUNet_preprocessed")
    pp_folder = paths["nnUNet_preprocessed"] / _dataset_name(dataset_id)
    plans = json.loads(resolve_under(pp_folder, f"{plans_identifier}.json").read_text())
    data_id = plans["configurations"][configuration]["data_identifier"]
    data_folder = resolve_under(pp_folder, data_id)
    identifiers = dataset_identifiers(data_folder)
    if fold == "all" or len(identifiers) < 5:
        # Too few cases for nnU-Net's 5-fold split (its trainer refuses such a fold):
        # the weight is the whole cohort.
        return len(identifiers)
    splits_file = pp_folder / "splits_final.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())
    else:
        splits = crossval_split(identifiers)
        _write_json_atomic(splits_file, splits)
    fold = int(fold)
    if fold < len(splits):
        return len(splits[fold]["train"])
    return int(len(identifiers) * 0.8)  # nnU-Net's random 80:20 split for a missing fold
