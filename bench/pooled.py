"""The pooled (centralized) baseline's data and the leak-free splits every comparison uses.

A centralized model is only comparable with a site's model if neither has trained on the
cases it is scored on. nnU-Net's default split of the pooled dataset is a fresh 5-fold
split of all pooled cases, unrelated to the sites' own splits, so a site's validation
case usually lands in the pooled training set. Here the pooled ``splits_final.json`` is
built from the sites' splits instead: pooled fold k train = union of the sites' fold-k
train cases, pooled fold k val = union of their fold-k val cases. Site splits are the
ones nnU-Net itself writes (``generate_crossval_split`` on the sorted case names, seed
12345), and they are written into every run's preprocessed folder before it starts, so
federated, local-only and centralized runs all train and validate on the same cases.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from fednnunet.nnunet.demo_data import dataset_folder_name

Splits = list[dict[str, list[str]]]
NNUNET_SPLIT_SEED = 12345  # what nnUNetTrainer.do_split uses
NUM_FOLDS = 5
_POOLED_NAME = re.compile(r"^d(\d{3,})_(.+)$")


def find_dataset(root: Path, dataset_id: int) -> Path:
    """The one ``DatasetXXX_*`` folder of ``dataset_id`` under an nnU-Net root folder."""
    hits = sorted(Path(root).glob(f"Dataset{dataset_id:03d}_*"))
    if len(hits) != 1:
        from fednnunet.errors import DatasetError

        raise DatasetError(f"expected one Dataset{dataset_id:03d}_* in {root}, found {len(hits)}")
    return hits[0]


def pooled_case_name(site_id: int, case: str) -> str:
    """Name of a site's case in the pooled dataset (a prefix, so equal names cannot collide)."""
    return f"d{site_id:03d}_{case}"


def site_of_pooled_case(name: str) -> tuple[int, str]:
    """Inverse of :func:`pooled_case_name`: (site dataset id, site case name)."""
    m = _POOLED_NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a pooled case name")
    return int(m.group(1)), m.group(2)


def make_pooled_dataset(
    raw_root: Path, source_ids: Sequence[int], pooled_id: int, name: str = "Pooled"
) -> Path:
    """Copy every site's cases into one raw dataset (the centralized baseline).

    Case names become :func:`pooled_case_name` so they map back to the site's case.
    """
    sources = [find_dataset(raw_root, i) for i in source_ids]
    ds_jsons = [json.loads((s / "dataset.json").read_text()) for s in sources]
    file_ending = ds_jsons[0]["file_ending"]
    folder = Path(raw_root) / dataset_folder_name(pooled_id, name)
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    n = 0
    for src_id, src in zip(source_ids, sources, strict=True):
        for sub in ("imagesTr", "labelsTr"):
            for f in sorted((src / sub).glob(f"*{file_ending}")):
                shutil.copyfile(f, folder / sub / pooled_case_name(src_id, f.name))
        n += len(list((src / "labelsTr").glob(f"*{file_ending}")))
    ds = dict(ds_jsons[0])
    ds.update({"numTraining": n, "name": folder.name})
    (folder / "dataset.json").write_text(json.dumps(ds, indent=2))
    return folder


def raw_case_names(raw_dataset: Path) -> list[str]:
    """Case identifiers of a raw dataset, as nnU-Net derives them (label file minus ending)."""
    ending = json.loads((raw_dataset / "dataset.json").read_text())["file_ending"]
    return sorted(p.name[: -len(ending)] for p in (raw_dataset / "labelsTr").glob(f"*{ending}"))


def site_splits(case_names: Sequence[str]) -> Splits:
    """The split nnU-Net writes for a dataset with these cases (``do_split``'s own call)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits = generate_crossval_split(sorted(case_names), seed=NNUNET_SPLIT_SEED, n_splits=NUM_FOLDS)
    return [
        {"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]} for s in splits
    ]


def pooled_splits(per_site: Mapping[int, Splits]) -> Splits:
    """Pooled fold k = union over sites of their fold-k train / val cases (pooled names)."""
    folds = {len(s) for s in per_site.values()}
    if len(folds) != 1:
        raise ValueError(f"sites have different numbers of folds: {sorted(folds)}")
    out: Splits = []
    for k in range(folds.pop()):
        out.append(
            {
                part: sorted(
                    pooled_case_name(site, c) for site, s in per_site.items() for c in s[k][part]
                )
                for part in ("train", "val")
            }
        )
    return out


def leak_free_splits(
    raw_root: Path, site_ids: Sequence[int], pooled_id: int | None = None
) -> dict[int, Splits]:
    """Every site's nnU-Net split and, if ``pooled_id`` is given, the pooled one built from them."""
    per_site = {ds: site_splits(raw_case_names(find_dataset(raw_root, ds))) for ds in site_ids}
    out = dict(per_site)
    if pooled_id is not None:
        pooled = pooled_splits(per_site)
        names = set(raw_case_names(find_dataset(raw_root, pooled_id)))
        for k, fold in enumerate(pooled):
            if set(fold["train"]) | set(fold["val"]) != names:
                raise ValueError(f"pooled fold {k} does not cover the pooled dataset's cases")
        out[pooled_id] = pooled
    return out


def write_splits(preprocessed_root: Path, raw_root: Path, splits: Mapping[int, Splits]) -> None:
    """Write ``splits_final.json`` into each dataset's preprocessed folder (before training).

    nnU-Net's trainer uses an existing ``splits_final.json`` as is; planning and
    preprocessing leave it alone (they only replace the configuration's data folder).
    """
    for ds, s in splits.items():
        folder = Path(preprocessed_root) / find_dataset(raw_root, ds).name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "splits_final.json").write_text(json.dumps(s, indent=4))


def read_splits(preprocessed_root: Path, raw_root: Path, dataset_id: int) -> Splits:
    folder = Path(preprocessed_root) / find_dataset(raw_root, dataset_id).name
    return json.loads((folder / "splits_final.json").read_text())


def foreground_dice_of_cases(summary: dict, case_names: set[str] | None = None) -> float:
    """nnU-Net's ``foreground_mean`` Dice recomputed over a subset of a ``summary.json``'s cases.

    Same arithmetic as ``compute_metrics_on_folder``: per label the NaN-ignoring mean over
    cases, then the plain mean over labels. ``None``: all cases (equals the file's own
    ``foreground_mean``).
    """
    import numpy as np

    labels = [k for k in summary["mean"] if str(k) != "0"]
    chosen = []
    for case in summary["metric_per_case"]:
        name = _case_of_file(case["reference_file"])
        if case_names is None or name in case_names:
            chosen.append(case)
    if not chosen:
        raise ValueError("no case of the requested set in this summary")
    per_label = [np.nanmean([float(c["metrics"][lab]["Dice"]) for c in chosen]) for lab in labels]
    return float(np.mean(per_label))


def pooled_dice_by_site(summary: dict) -> dict[int, float]:
    """Per-site foreground Dice of a pooled model's validation, its cases mapped back to sites."""
    sites: dict[int, set[str]] = {}
    for case in summary["metric_per_case"]:
        name = _case_of_file(case["reference_file"])
        sites.setdefault(site_of_pooled_case(name)[0], set()).add(name)
    return {site: foreground_dice_of_cases(summary, names) for site, names in sorted(sites.items())}


def _case_of_file(path: str) -> str:
    """Case name of a segmentation file (case names carry no dot; endings may have two)."""
    return Path(path).name.split(".", 1)[0]
