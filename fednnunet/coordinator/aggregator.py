"""Aggregation of one round from S3 objects: verify, quarantine, stream FedAvg, publish.

Each update is downloaded once, verified, checked against the round's reference model,
then added to a streaming accumulator, whatever the number of sites. Folding on arrival
(:class:`RoundFold`) keeps it all in memory: the accumulator, the last global (the next
round's reference) and each screened update until its fold, at most one per report
thread. The batch path (:func:`aggregate_round` without a fold) reads updates from the
on-disk cache one at a time: the accumulator plus one update.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import (
    WeightsHeader,
    decode_weights,
    encode_weights_sha256,
    header_of,
    load_weights_file,
    read_header,
    save_weights_file,
)
from fednnunet.core.aggregation import (
    StreamingFedAvg,
    capped_weights,
    common_layers,
    trimmed_mean,
)
from fednnunet.core.tensors import join_aliases
from fednnunet.core.update_checks import (
    Signature,
    common_signature,
    l2_norm,
    majority_signature,
    norm_outliers,
    screen_values,
    signature_problems,
    update_problems,
)
from fednnunet.errors import ServiceUnreachable
from fednnunet.messages import ArtifactRef, SiteReport


@dataclass
class AggregationResult:
    global_weights: ArtifactRef | None
    participants: list[str]
    quarantined: dict[str, str] = field(default_factory=dict)
    layers_averaged: int = 0
    seconds: float = 0.0
    weights: dict[str, float] = field(default_factory=dict)
    # The global's bytes as uploaded (not kept anywhere else): the next round's fold
    # takes its reference from them instead of reading the object back.
    encoded: bytearray | None = field(default=None, repr=False)


def screen_update_file(
    path: Path,
    expected_shapes: Mapping[str, tuple[int, ...]] | None,
    reference_norm: float | None,
) -> list[str]:
    """Reasons to quarantine the update in ``path`` (one update in memory at a time)."""
    tensors = load_weights_file(path)
    return update_problems(tensors, expected_shapes=expected_shapes, reference_norm=reference_norm)


def average_files(
    paths: Sequence[Path],
    weights: Sequence[float],
    names: Sequence[str] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weighted FedAvg of safetensors update files: (full state with aliases, layers averaged).

    Only the headers are read up front; updates are then loaded one at a time,
    so peak memory is the accumulator plus one update whatever ``len(paths)``.
    ``names``/``aliases`` default to the layers common to all files and the first
    file's alias map (the coordinator passes its reference model's instead).
    """
    if not paths or len(paths) != len(weights):
        raise ValueError("need one weight per update file, and at least one file")
    if names is None or aliases is None:
        headers = [read_header(path) for path in paths]
        names = common_layers([h.shapes for h in headers]) if names is None else names
        aliases = (
            next((h.aliases for h in headers if h.aliases), {}) if aliases is None else aliases
        )
    names = list(names)
    acc = StreamingFedAvg(names)
    dtypes: dict = {}
    for path, weight in zip(paths, weights, strict=True):
        update = load_weights_file(path, names)
        if not dtypes:
            dtypes = {n: t.dtype for n, t in update.items()}
        acc.add(update, float(weight), owned=True)
        del update
    result = acc.result(dtypes)
    full = join_aliases(result, {a: c for a, c in aliases.items() if c in result})
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


def _signature(header: WeightsHeader) -> Signature:
    return Signature(
        {n: (shape, header.dtypes[n]) for n, shape in header.shapes.items()}, header.aliases
    )


class RoundFold:
    """One round's FedAvg, folded as each accepted update arrives (off the critical path).

    For rounds whose reference model is known before any update arrives (the previous
    global: rounds >= 2) and plain FedAvg by declared cases. Each update is screened on
    arrival with exactly the checks of :func:`aggregate_round` (cached per site and
    sha256) and added to the running sum. The sum is always the fold of a list of
    updates *in the round's canonical order* (the order the coordinator accepted the
    reports): when the final list differs from what was folded (a median-norm outlier,
    a site left out, another coordinator took reports) the sum is rebuilt in that order.
    So the global never depends on arrival timing or on a coordinator restart: it is
    bit for bit what folding the accepted updates in that order gives.
    """

    def __init__(
        self,
        store: ArtifactStore,
        previous_global: ArtifactRef,
        exact: bool,
        encoded: bytearray | None = None,
    ) -> None:
        """``encoded``: the previous global's bytes, when this process published them
        (verified against ``previous_global``); else they are fetched."""
        encoded = _global_bytes(store, previous_global, encoded)
        self.previous = previous_global
        self.reference = _signature(header_of(encoded))
        reference = decode_weights(encoded, expand_aliases=False)
        self.reference_norm = l2_norm(reference)
        self.exact = exact
        self.names = list(self.reference.tensors)
        self._verdicts: dict[tuple[str, str], tuple[list[str], float | None]] = {}
        # Screened updates not folded yet, in memory (at most one per report in flight).
        self._screened: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        # The sum is allocated now, before any report: the first fold is an addition.
        self._acc: StreamingFedAvg | None = StreamingFedAvg(self.names, like=reference)
        self._folded: list[tuple[str, str, float]] = []  # (site, sha256, weight), in order
        self._dtypes: dict[str, torch.dtype] = {}

    def screen(
        self, store: ArtifactStore, report: SiteReport, data: bytearray | None = None
    ) -> tuple[list[str], float | None]:
        """(reasons to quarantine, L2 norm) of the report's update; computed once.

        The update is read into memory (``data``: already read and verified) and kept
        there until it is folded: no disk on the round's critical path."""
        ref = report.artifact
        if ref is None:
            return ["no update"], None
        ident = (report.site_id, ref.sha256)
        with self._lock:
            known = self._verdicts.get(ident)
        if known is not None:
            return known
        if data is None:  # no disk copy: a rebuild or a restart fetches again
            data = store.get_bytes(ref)
        problems = signature_problems(_signature(header_of(data)), self.reference, self.exact)
        norm = None
        tensors = None
        if not problems:
            tensors = _subset(decode_weights(data, expand_aliases=False), self.names)
            problems, norm = screen_values(tensors, reference_norm=self.reference_norm)
        verdict = (problems[:3], None if problems else norm)
        with self._lock:
            self._verdicts[ident] = verdict
            if tensors is not None and not problems:
                self._screened[ident] = tensors
        return verdict

    def fold(self, store: ArtifactStore, ordered: Sequence[tuple[SiteReport, float]]) -> None:
        """Make the sum the fold of exactly ``ordered`` ((report, weight), in this order):
        only what is not folded yet is added, unless the folded list is no prefix of it."""
        want = [(r.site_id, r.artifact.sha256 if r.artifact else "", w) for r, w in ordered]
        if self._acc is None or self._folded != want[: len(self._folded)]:
            self._acc, self._folded, self._dtypes = StreamingFedAvg(self.names), [], {}
        for (report, weight), ident in zip(
            ordered[len(self._folded) :], want[len(self._folded) :], strict=True
        ):
            if report.artifact is None:
                raise ValueError(f"{report.site_id} has no update to fold")
            with self._lock:
                update = self._screened.pop(ident[:2], None)
            if update is None:  # folded before and rebuilt, or screened by another process
                data = store.get_bytes(report.artifact)
                update = _subset(decode_weights(data, expand_aliases=False), self.names)
            if not self._dtypes:
                self._dtypes = {n: t.dtype for n, t in update.items()}
            self._acc.add(update, float(weight))
            del update
            self._folded.append(ident)

    @property
    def folded_sites(self) -> list[str]:
        return [site for site, _, _ in self._folded]

    def result(self) -> dict[str, torch.Tensor]:
        """The weighted mean of what is folded (idempotent: the same tensors again)."""
        if self._acc is None:
            raise ValueError("nothing folded")
        return self._acc.result(self._dtypes)


def _global_bytes(store: ArtifactStore, ref: ArtifactRef, kept: bytearray | None) -> bytearray:
    """A global's bytes: those this process kept when it published ``ref`` (the caller
    matched them to ``ref``; hashed while they were encoded, not again), else fetched
    and verified."""
    if kept is not None and len(kept) == ref.size:
        return kept
    return store.get_bytes(ref, cache=True)


def _subset(tensors: dict[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors (the screening has checked they are all there)."""
    return {name: tensors[name] for name in names}


def _aggregate_folded(
    store: ArtifactStore,
    fold: RoundFold,
    reports: Sequence[SiteReport],
    cases: Mapping[str, int] | None,
    min_participants: int,
) -> tuple[dict[str, torch.Tensor] | None, list[str], dict[str, str], dict[str, float]]:
    """The batch rules of :func:`aggregate_round` on a :class:`RoundFold`'s cached verdicts
    and running sum: (averaged tensors or None, participants, quarantined, weights)."""
    quarantined: dict[str, str] = {}
    norms: dict[str, float] = {}
    for report in reports:
        try:
            problems, norm = fold.screen(store, report)
        except ServiceUnreachable:
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed update is quarantined
            problems, norm = [_one_line(exc)], None
        if problems:
            quarantined[report.site_id] = "; ".join(problems)
        else:
            norms[report.site_id] = float(norm or 0.0)
    outliers = norm_outliers(norms)
    quarantined |= outliers
    accepted = [r for r in reports if r.site_id in norms and r.site_id not in outliers]
    participants = [r.site_id for r in accepted]
    if len(accepted) < max(1, min_participants):
        return None, participants, quarantined, {}
    declared = {r.site_id: (cases or {}).get(r.site_id, r.num_cases) for r in accepted}
    fold.fold(store, [(r, declared[r.site_id]) for r in accepted])
    return fold.result(), participants, quarantined, capped_weights(declared, None)


def aggregate_round(
    store: ArtifactStore,
    reports: Sequence[SiteReport],
    target_bucket: str,
    target_key: str,
    previous_global: ArtifactRef | None,
    *,
    cases: Mapping[str, int] | None = None,
    max_site_weight: float | None = None,
    exact_architecture: bool = True,
    aggregation: str = "fedavg",
    min_participants: int = 1,
    previous_defines_model: bool = True,
    fold: RoundFold | None = None,
    previous_encoded: bytearray | None = None,
) -> AggregationResult:
    """Average the verified, sane updates of ``reports`` into a new global object.

    Every update must carry the reference model (the previous global's tensors, dtypes
    and aliases; in the first round, FFE: the architecture a majority of sites sent,
    AsymFedAvg: the layers all sites share). Aliases come from that reference, never
    from one site. Updates with NaN/Inf or a norm far above the previous global's or
    the round's median are quarantined. Each site weighs its ``cases`` (declared at
    planning; else the report's), capped at ``max_site_weight``.
    ``exact_architecture`` (FFE): one architecture everywhere, nothing more or less.
    ``fold``: this round's :class:`RoundFold` (plain FedAvg, previous global defines the
    model): its cached verdicts and running sum are used, with the same rules.
    ``previous_encoded``: the previous global's bytes if this process published them
    (checked against ``previous_global``; else fetched).
    """
    t0 = time.perf_counter()
    if fold is not None:
        if not (
            aggregation == "fedavg"
            and max_site_weight is None
            and previous_defines_model
            and previous_global == fold.previous
        ):
            raise ValueError("this round cannot use a RoundFold")
        averaged, participants, quarantined, weights = _aggregate_folded(
            store, fold, reports, cases, min_participants
        )
        if averaged is None:
            return AggregationResult(
                None, participants, quarantined, seconds=time.perf_counter() - t0
            )
        aliases = {a: c for a, c in fold.reference.aliases.items() if c in averaged}
        return _publish(
            store, join_aliases(averaged, aliases), participants, quarantined, weights,
            aggregation, target_bucket, target_key, len(fold.names), t0,
        )  # fmt: skip
    quarantined: dict[str, str] = {}
    reference: Signature | None = None
    ref_norm: float | None = None
    if previous_global is not None:
        previous_encoded = _global_bytes(store, previous_global, previous_encoded)
        if previous_defines_model:
            reference = _signature(header_of(previous_encoded))
        ref_norm = l2_norm(decode_weights(previous_encoded, expand_aliases=False))

    # 1. Fetch, verify, read each header (nothing from a site may stop the others).
    fetched: dict[str, tuple[SiteReport, Path, Signature]] = {}
    for report in reports:
        if report.artifact is None:
            quarantined[report.site_id] = "no update"
            continue
        try:
            path = store.get_file(report.artifact)
            fetched[report.site_id] = (report, path, _signature(read_header(path)))
        except ServiceUnreachable:
            raise  # S3 is down: not the site's fault; the round is retried on the next tick
        except Exception as exc:  # noqa: BLE001 - any malformed update is quarantined
            quarantined[report.site_id] = _one_line(exc)

    # 2. The reference model of this round.
    if reference is None:
        sigs = {site: sig for site, (_, _, sig) in fetched.items()}
        if exact_architecture:
            reference = majority_signature(sigs)
            if reference is None and sigs:
                for site in sigs:
                    quarantined[site] = "no architecture shared by a majority of sites"
                fetched.clear()
        else:
            reference = common_signature(list(sigs.values()))

    # 3. Signatures, values (NaN/Inf, norms) and norm outliers.
    shared = screen_fetched(fetched, reference, exact_architecture, ref_norm, quarantined)

    accepted = [fetched[r.site_id] for r in reports if r.site_id in fetched]
    participants = [r.site_id for r, _, _ in accepted]
    if len(accepted) < max(1, min_participants) or reference is None:
        return AggregationResult(None, participants, quarantined, seconds=time.perf_counter() - t0)

    # 4. Average: case weights fixed at planning, capped; or a robust trimmed mean.
    declared = {r.site_id: (cases or {}).get(r.site_id, r.num_cases) for r, _, _ in accepted}
    weights = capped_weights(declared, max_site_weight)
    paths = [path for _, path, _ in accepted]
    aliases = dict(reference.aliases)
    if aggregation == "trimmed_mean" and len(accepted) >= 3:
        updates = [load_weights_file(p, shared) for p in paths]
        averaged = trimmed_mean(updates, shared, trim=max(1, len(accepted) // 5))
        del updates
        full = join_aliases(averaged, {a: c for a, c in aliases.items() if c in averaged})
    else:
        # Without a cap, the raw case counts (same result, and bit-identical to a plain
        # case-weighted FedAvg); with one, the capped shares.
        factors = weights if max_site_weight is not None else declared
        full, _ = average_files(paths, [factors[s] for s in participants], shared, aliases)
    return _publish(
        store, full, participants, quarantined, weights, aggregation, target_bucket,
        target_key, len(shared), t0,
    )  # fmt: skip


def _publish(
    store: ArtifactStore,
    full: dict[str, torch.Tensor],
    participants: list[str],
    quarantined: dict[str, str],
    weights: Mapping[str, float],
    aggregation: str,
    target_bucket: str,
    target_key: str,
    layers: int,
    t0: float,
) -> AggregationResult:
    """Encode and upload the global (once); participants and weights in its metadata."""
    # Serialized in memory and uploaded from there (one hash pass, no temporary file);
    # the bytes go back to the caller, so next round's screening downloads nothing.
    # No per-site weights here: every site reads this header (they follow from the
    # declared case counts, which the coordinator keeps to itself).
    meta = {"participants": ",".join(participants), "aggregation": aggregation}
    data, sha = encode_weights_sha256(full, meta)
    del full
    ref = store.put_bytes(target_bucket, target_key, data, kind="global_weights", sha256=sha)
    return AggregationResult(
        ref,
        participants,
        quarantined,
        layers_averaged=layers,
        seconds=time.perf_counter() - t0,
        weights={s: weights[s] for s in participants},
        encoded=data,
    )


def screen_fetched(
    fetched: dict[Any, tuple[Any, Path, Signature]],
    reference: Signature | None,
    exact_architecture: bool,
    ref_norm: float | None,
    quarantined: dict[Any, str],
) -> list[str]:
    """The per-update checks every aggregation path shares (sync rounds, async buffers):
    signature against the reference, then NaN/Inf and norm (one update in memory at a
    time), then median-norm outliers. Failing updates move from ``fetched`` to
    ``quarantined``; returns the names of the shared tensors."""
    for key, (_, _, sig) in list(fetched.items()):
        problems = signature_problems(sig, reference, exact_architecture) if reference else []
        if problems:
            quarantined[key] = "; ".join(problems[:3])
            del fetched[key]
    shared = list(reference.tensors) if reference else []
    norms: dict[Any, float] = {}
    for key, (_, path, _) in list(fetched.items()):
        try:
            tensors = load_weights_file(path, shared)
            problems, norms[key] = screen_values(tensors, reference_norm=ref_norm)
            del tensors
        except Exception as exc:  # noqa: BLE001 - e.g. a truncated or garbage body
            problems = [_one_line(exc)]
        if problems:
            quarantined[key] = "; ".join(problems[:3])
            del fetched[key]
            norms.pop(key, None)
    for key, why in norm_outliers(norms).items():
        quarantined[key] = why
        del fetched[key]
    return shared


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
