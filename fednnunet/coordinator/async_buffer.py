"""Publishing one asynchronous global version from the buffer (FedBuff), from S3 objects.

The trust checks are the synchronous round's own (``core/update_checks.py``): every
update carries the reference model (the current global's tensors, dtypes and
aliases; before the first version, the architecture a majority sent (FFE) or the
layers every site shares (AsymFedAvg)), no NaN/Inf, a norm within bounds of the
current global's and the buffer's median; each site weighs its declared cases,
capped by ``max_site_weight``. Sites send their weights after the epoch; the
coordinator forms each delta against the exact global version the site started from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import encode_weights, load_weights_file, read_header
from fednnunet.coordinator.aggregator import (
    _one_line,
    _signature,
    average_files,
    screen_fetched,
)
from fednnunet.core import async_rounds as asy
from fednnunet.core.aggregation import capped_weights
from fednnunet.core.fedbuff import StreamingFedBuff
from fednnunet.core.state_machine import ExperimentState
from fednnunet.core.tensors import join_aliases
from fednnunet.core.update_checks import (
    Signature,
    common_signature,
    l2_norm,
    majority_signature,
)
from fednnunet.errors import FedError, ServiceUnreachable
from fednnunet.keys import global_weights_key
from fednnunet.messages import ArtifactRef


def apply_buffer(
    store: ArtifactStore,
    state: ExperimentState,
    updates: Sequence[asy.BufferedUpdate],
    target_bucket: str,
    target_key: str,
    *,
    exact_architecture: bool,
) -> asy.VersionResult:
    """Screen the buffered updates and write the next version (write-once object)."""
    t0 = time.perf_counter()
    prog = state.asynchronous
    assert prog is not None  # noqa: S101
    key_of = prog.key
    opts = state.options
    quarantined: dict[str, str] = {}
    current_path = store.get_file(state.global_weights) if state.global_weights else None
    first = prog.version == 0  # no published version yet: a pretrained model may differ
    reference: Signature | None = None
    ref_norm: float | None = None
    if current_path is not None:
        ref_norm = l2_norm(load_weights_file(current_path))
        if not first:
            reference = _signature(read_header(current_path))

    fetched: dict[str, tuple[asy.BufferedUpdate, Path, Signature]] = {}
    for u in updates:
        try:
            path = store.get_file(u.artifact)
            fetched[key_of(u)] = (u, path, _signature(read_header(path)))
        except ServiceUnreachable:
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed update is quarantined
            quarantined[key_of(u)] = _one_line(exc)
    if reference is None:
        sigs = {k: sig for k, (_, _, sig) in fetched.items()}
        reference = (
            majority_signature(sigs)
            if exact_architecture
            else common_signature(list(sigs.values()))
        )
        if reference is None:
            for k in sigs:
                quarantined[k] = "no architecture shared by a majority of the buffer"
            fetched.clear()
    shared = screen_fetched(fetched, reference, exact_architecture, ref_norm, quarantined)
    accepted = [fetched[key_of(u)][0] for u in updates if key_of(u) in fetched]
    if not accepted or reference is None:
        return asy.VersionResult(None, [], quarantined, seconds=time.perf_counter() - t0)

    factors = _factors(state, accepted)
    total = sum(factors.values())
    weights = {k: f / total for k, f in factors.items()}
    aliases = dict(reference.aliases)
    if current_path is None or first:
        # The first version: every update started from the same initial model, so the
        # weighted mean of the weights is that model plus the weighted mean delta
        # (server_lr applies from the second version on).
        paths = [fetched[key_of(u)][1] for u in accepted]
        full, _ = average_files(paths, [factors[key_of(u)] for u in accepted], shared, aliases)
    else:
        current = load_weights_file(current_path)
        acc = StreamingFedBuff(shared)
        bases: dict[int, dict[str, torch.Tensor]] = {}
        for u in accepted:
            base = bases.get(u.base_version)
            if base is None:
                base = bases[u.base_version] = _base_global(store, state, u.base_version, shared)
            acc.add(load_weights_file(fetched[key_of(u)][1], shared), base, factors[key_of(u)])
        del bases
        updated = acc.apply(current, opts.server_lr)
        full = join_aliases(updated, {a: c for a, c in aliases.items() if c in updated})
    # Which updates are inside (for a successor coordinator), never their case weights:
    # every site reads this header.
    meta = {
        "updates": ",".join(key_of(u) for u in accepted),
        "participants": ",".join(sorted({u.site for u in accepted})),
        "aggregation": "fedbuff",
    }
    data = encode_weights(full, meta)
    del full
    ref = store.put_bytes(target_bucket, target_key, data, kind="global_weights", cache=True)
    return asy.VersionResult(
        ref, list(weights), quarantined, weights, seconds=time.perf_counter() - t0
    )


def _factors(state: ExperimentState, accepted: Sequence[asy.BufferedUpdate]) -> dict[str, float]:
    """s(tau)·n of each accepted update (n: declared cases, capped by max_site_weight)."""
    cases = {u.site: u.num_cases for u in accepted}
    shares = (
        capped_weights(cases, state.options.max_site_weight)
        if state.options.max_site_weight is not None
        else {s: float(n) for s, n in cases.items()}
    )
    return asy.factors(state, tuple(accepted), shares)


def version_result_of(
    state: ExperimentState, action: asy.ApplyBuffer, ref: ArtifactRef, applied: list[str]
) -> asy.VersionResult:
    """The result of an already written version, from the update keys its header names."""
    prog = state.asynchronous
    assert prog is not None  # noqa: S101
    accepted = [u for u in action.updates if prog.key(u) in set(applied)]
    if len(accepted) != len(applied):
        raise FedError(f"version {action.version} names updates the buffer does not hold")
    factors = _factors(state, accepted)
    total = sum(factors.values())
    quarantined = {
        prog.key(u): "quarantined (reason logged by the coordinator that applied it)"
        for u in action.updates
        if prog.key(u) not in set(applied)
    }
    return asy.VersionResult(ref, applied, quarantined, {k: f / total for k, f in factors.items()})


def _base_global(
    store: ArtifactStore, state: ExperimentState, version: int, names: list[str]
) -> dict[str, torch.Tensor]:
    """The global a site started from: version ``version``'s object (version 0: the
    site started from its own initial model, so the current global stands in, which
    makes the update a FedAsync-style pull towards the site's weights)."""
    if version == 0:
        assert state.global_weights is not None  # noqa: S101
        return load_weights_file(store.get_file(state.global_weights), names)
    key = global_weights_key(state.experiment_id, version)
    ref = store.stat(state.global_weights.bucket, key)  # type: ignore[union-attr]
    if ref is None:
        raise FedError(f"global version {version} is missing from S3")
    return load_weights_file(store.get_file(ref), names)
