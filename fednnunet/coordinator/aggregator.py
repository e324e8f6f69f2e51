"""Aggregation of one round from S3 objects: verify, quarantine, stream FedAvg, publish.

Each update is downloaded once into a local cache keyed by sha256 (verified),
validated, then added to a streaming accumulator: peak memory is the global
model plus one update, whatever the number of sites.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import (
    encode_weights,
    load_weights_file,
    read_file_header,
    save_weights_file,
)
from fednnunet.core.aggregation import StreamingFedAvg, common_layers
from fednnunet.core.tensors import join_aliases
from fednnunet.core.update_checks import l2_norm, update_problems
from fednnunet.errors import FedError
from fednnunet.messages import ArtifactRef, SiteReport


@dataclass
class AggregationResult:
    global_weights: ArtifactRef | None
    participants: list[str]
    quarantined: dict[str, str] = field(default_factory=dict)
    layers_averaged: int = 0
    seconds: float = 0.0


def screen_update_file(
    path: Path,
    expected_shapes: Mapping[str, tuple[int, ...]] | None,
    reference_norm: float | None,
) -> list[str]:
    """Reasons to quarantine the update in ``path`` (one update in memory at a time)."""
    tensors = load_weights_file(path)
    return update_problems(tensors, expected_shapes=expected_shapes, reference_norm=reference_norm)


def average_files(
    paths: Sequence[Path], weights: Sequence[float]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weighted FedAvg of safetensors update files: (full state with aliases, layers averaged).

    Only the headers are read up front; updates are then loaded one at a time,
    so peak memory is the accumulator plus one update whatever ``len(paths)``.
    The alias map of the first update that has one is applied to the result,
    so sites can rebuild nnU-Net's full key set.
    """
    if not paths or len(paths) != len(weights):
        raise ValueError("need one weight per update file, and at least one file")
    headers = []
    aliases_of_first: dict[str, str] = {}
    for path in paths:
        shapes, aliases, _ = read_file_header(path)
        headers.append(shapes)
        if not aliases_of_first:
            aliases_of_first = aliases
    names = common_layers(headers)
    acc = StreamingFedAvg(names)
    dtypes: dict = {}
    for path, weight in zip(paths, weights, strict=True):
        update = load_weights_file(path, names)
        if not dtypes:
            dtypes = {n: t.dtype for n, t in update.items()}
        acc.add(update, float(weight), owned=True)
        del update
    result = acc.result(dtypes)
    full = join_aliases(result, {a: c for a, c in aliases_of_first.items() if c in result})
    return full, names


def aggregate_files(
    paths: Sequence[Path],
    weights: Sequence[float],
    out_path: Path,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """:func:`average_files` written to ``out_path``; returns the layers averaged."""
    full, names = average_files(paths, weights)
    save_weights_file(full, out_path, metadata=metadata)
    return names


def aggregate_round(
    store: ArtifactStore,
    reports: Sequence[SiteReport],
    target_bucket: str,
    target_key: str,
    previous_global: ArtifactRef | None,
    min_participants: int = 1,
    strict_shapes: bool = True,
) -> AggregationResult:
    """Average the verified, sane updates of ``reports`` into a new global object.

    ``strict_shapes`` (FFE): every layer of the previous global must keep its shape.
    """
    t0 = time.perf_counter()
    quarantined: dict[str, str] = {}
    ref_shapes: dict[str, tuple[int, ...]] | None = None
    ref_norm: float | None = None
    if previous_global is not None:
        prev_path = store.get_file(previous_global)
        ref_shapes, _, _ = read_file_header(prev_path)
        ref_norm = l2_norm(load_weights_file(prev_path))

    accepted: list[tuple[SiteReport, Path]] = []
    for report in reports:
        if report.artifact is None or report.num_cases <= 0:
            quarantined[report.site_id] = "no update or no training cases"
            continue
        try:
            path = store.get_file(report.artifact)
            # With differing plans (AsymFedAvg) shapes legitimately differ between sites.
            expected = ref_shapes if strict_shapes else None
            problems = screen_update_file(path, expected, ref_norm)
        except (FedError, ValueError, OSError) as exc:
            quarantined[report.site_id] = str(exc)
            continue
        if problems:
            quarantined[report.site_id] = "; ".join(problems[:3])
            continue
        accepted.append((report, path))

    if len(accepted) < min_participants:
        return AggregationResult(
            None, [r.site_id for r, _ in accepted], quarantined, seconds=time.perf_counter() - t0
        )

    full, names = average_files(
        [path for _, path in accepted], [float(r.num_cases) for r, _ in accepted]
    )
    # Serialized in memory and uploaded from there (one hash pass, no temporary file);
    # the store keeps a verified copy, so next round's screening downloads nothing.
    data = encode_weights(full, {"participants": ",".join(r.site_id for r, _ in accepted)})
    del full
    ref = store.put_bytes(target_bucket, target_key, data, kind="global_weights", cache=True)
    return AggregationResult(
        ref,
        [r.site_id for r, _ in accepted],
        quarantined,
        layers_averaged=len(names),
        seconds=time.perf_counter() - t0,
    )
