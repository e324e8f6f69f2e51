"""Asynchronous federation (``mode: async``): the train phase as FedBuff. Pure, no I/O.

Each site trains continuously: a task is one site-epoch (``round`` = the site's own
epoch counter) started from the newest global version. Its report enters a buffer
with the version it started from; K buffered updates make the next version
(:mod:`fednnunet.core.fedbuff`). An update is applied at most once: it is current
only for the site's epoch in flight, the buffer survives a coordinator restart in
the stored state, and each version's global object is written once.

The phase ends when the applied site-epochs reach ``rounds × sites × local_epochs``
(the sync run's total training) or after ``max_wall_s``; the last buffer is applied
first. Work still in flight then is abandoned (the site sees the ``closed`` marker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from fednnunet.core.fedbuff import staleness_weight
from fednnunet.messages import ArtifactRef, ExperimentOptions, Metrics, SiteReport
from fednnunet.phases import Phase

if TYPE_CHECKING:
    from fednnunet.core.state_machine import ExperimentState


def default_buffer_size(num_sites: int) -> int:
    return max(1, math.ceil(num_sites / 2))


class BufferedUpdate(BaseModel):
    site: str
    epoch: int
    base_version: int
    num_cases: int
    artifact: ArtifactRef
    received_at: float
    metrics: Metrics = Field(default_factory=dict)


class AsyncProgress(BaseModel):
    """Where the asynchronous train phase stands (part of the stored state)."""

    buffer_size: int = Field(ge=1)  # K (the option, or ceil(sites / 2))
    target_epochs: int  # site-epochs to consume: rounds × sites × local_epochs
    epochs_per_update: int = 1  # local_epochs
    version: int = 0  # newest published global version (0: initial or none)
    consumed_epochs: int = 0  # site-epochs inside published versions
    opened_at: float | None = None
    closed_at: float | None = None
    closed_reason: str | None = None
    buffer: list[BufferedUpdate] = Field(default_factory=list)
    site_epoch: dict[str, int] = Field(default_factory=dict)  # the site's current task
    site_base: dict[str, int] = Field(default_factory=dict)  # version it started from
    applied_epochs: dict[str, int] = Field(default_factory=dict)  # per site, in versions
    last_staleness: dict[str, int] = Field(default_factory=dict)
    stale_refused: int = 0
    quarantined: int = 0

    def key(self, update: BufferedUpdate) -> str:
        return f"{update.site}/v{update.base_version}/e{update.epoch}"


@dataclass(frozen=True)
class ApplyBuffer:
    """Publish version ``version`` from these buffered updates."""

    version: int
    updates: tuple[BufferedUpdate, ...]
    final: bool = False


@dataclass
class VersionResult:
    """What the coordinator made of an :class:`ApplyBuffer`."""

    global_weights: ArtifactRef | None
    applied: list[str]  # keys of the updates inside the new version
    quarantined: dict[str, str] = field(default_factory=dict)  # key -> why
    weights: dict[str, float] = field(default_factory=dict)  # key -> normalised weight
    seconds: float = 0.0


def new_progress(options: ExperimentOptions, num_sites: int) -> AsyncProgress | None:
    """The async bookkeeping of a new experiment (None in sync mode)."""
    if options.mode != "async":
        return None
    return AsyncProgress(
        buffer_size=options.buffer_size or default_buffer_size(num_sites),
        target_epochs=options.rounds * num_sites * options.local_epochs,
        epochs_per_update=options.local_epochs,
    )


def is_async_train(state: ExperimentState) -> bool:
    return state.phase == Phase.TRAIN and state.asynchronous is not None


def site_round(state: ExperimentState, site: str) -> int:
    """The round number the site's current task carries (async: its own epoch)."""
    if is_async_train(state):
        return state.asynchronous.site_epoch.get(site, 0)  # type: ignore[union-attr]
    return state.round


def open_async(state: ExperimentState, now: float) -> None:
    prog = state.asynchronous
    if prog is not None and prog.opened_at is None:
        prog.opened_at = now


def apply_async_dispatched(state: ExperimentState, site: str, epoch: int, now: float) -> bool:
    """The coordinator sent ``site`` its epoch ``epoch`` from the current version."""
    prog = state.asynchronous
    assert prog is not None  # noqa: S101 - only called in async train
    if epoch not in (prog.site_epoch.get(site, 0), prog.site_epoch.get(site, 0) + 1):
        return False
    if epoch != prog.site_epoch.get(site, 0):
        prog.site_epoch[site] = epoch
        prog.site_base[site] = prog.version
    return True


def async_report_problem(state: ExperimentState, report: SiteReport) -> str | None:
    """The version an update started from is the coordinator's record, not the site's word."""
    prog = state.asynchronous
    if prog is None or not report.ok:
        return None
    want = prog.site_base.get(report.site_id, 0)
    if report.base_version != want:
        return f"claims base version {report.base_version}, its task started from {want}"
    return None


def apply_async_report(state: ExperimentState, report: SiteReport, now: float) -> str:
    """Buffer a current update. Returns "buffered", "stale" (refused: too old) or "failed"."""
    prog = state.asynchronous
    st = state.sites_status[report.site_id]
    assert prog is not None  # noqa: S101
    st.finished_at = now
    if not report.ok:
        st.state, st.error = "failed", report.error or "site reported failure"
        st.retryable = report.retryable
        return "failed"
    base = prog.site_base.get(report.site_id, 0)
    tau = prog.version - base
    prog.last_staleness[report.site_id] = tau
    st.state, st.report, st.error = "done", report, None
    limit = state.options.max_staleness
    if limit is not None and tau > limit:
        prog.stale_refused += 1
        return "stale"
    assert report.artifact is not None  # noqa: S101 - report_problem requires it
    prog.buffer.append(
        BufferedUpdate(
            site=report.site_id,
            epoch=report.round,
            base_version=base,
            num_cases=state.declared_cases.get(report.site_id, report.num_cases),
            artifact=report.artifact,
            received_at=now,
            metrics=report.metrics,
        )
    )
    return "buffered"


def finishing(state: ExperimentState, now: float) -> str | None:
    """Why the async phase must end now (None: it goes on)."""
    prog = state.asynchronous
    assert prog is not None  # noqa: S101
    if prog.closed_reason is not None:
        return prog.closed_reason
    buffered = len(prog.buffer) * prog.epochs_per_update
    if prog.consumed_epochs + buffered >= prog.target_epochs:
        return f"{prog.target_epochs} site-epochs consumed"
    wall = state.options.max_wall_s
    if wall is not None and prog.opened_at is not None and now - prog.opened_at > wall:
        return f"max_wall_s={wall:g} reached"
    return None


def buffer_action(state: ExperimentState, now: float) -> ApplyBuffer | None:
    """A full buffer (or the last one, when the phase ends) becomes the next version."""
    prog = state.asynchronous
    assert prog is not None  # noqa: S101
    final = finishing(state, now) is not None
    # AsymFedAvg: the layers all sites share are known once every site sent an update.
    if (
        not final
        and prog.version == 0
        and not state.options.strategy.exact_architecture
        and {u.site for u in prog.buffer} < set(active_sites(state))
    ):
        return None
    if prog.buffer and (final or len(prog.buffer) >= prog.buffer_size):
        return ApplyBuffer(prog.version + 1, tuple(prog.buffer), final)
    return None


def active_sites(state: ExperimentState) -> list[str]:
    """Sites still taking part (not failed for good)."""
    return [
        s
        for s, st in state.sites_status.items()
        if not (st.state == "failed" and (st.attempt >= state.max_attempts or not st.retryable))
    ]


def staleness_of(state: ExperimentState, update: BufferedUpdate) -> int:
    return state.asynchronous.version - update.base_version  # type: ignore[union-attr]


def factors(
    state: ExperimentState, updates: tuple[BufferedUpdate, ...], shares: dict[str, float]
) -> dict[str, float]:
    """Each update's s(tau)·n (``shares``: the site's case weight after any cap)."""
    prog = state.asynchronous
    assert prog is not None  # noqa: S101
    exponent = state.options.staleness_exponent
    return {
        prog.key(u): staleness_weight(staleness_of(state, u), exponent) * shares[u.site]
        for u in updates
    }


def apply_version(
    state: ExperimentState, action: ApplyBuffer, result: VersionResult, now: float
) -> None:
    """Version ``action.version`` is published (or every update of the buffer was
    quarantined): those updates leave the buffer, applied ones count as consumed."""
    from fednnunet.core.state_machine import RoundRecord, score_async_version

    prog = state.asynchronous
    assert prog is not None  # noqa: S101
    if action.version != prog.version + 1:
        return
    taken = {prog.key(u) for u in action.updates}
    prog.buffer = [u for u in prog.buffer if prog.key(u) not in taken]
    prog.quarantined += len(result.quarantined)
    state.seq += 1
    if result.global_weights is None:
        return
    applied = [u for u in action.updates if prog.key(u) in set(result.applied)]
    global_dice, global_dice_ema = score_async_version(state, prog.version, applied)
    prog.version = action.version
    prog.consumed_epochs += len(applied) * prog.epochs_per_update
    for u in applied:
        prog.applied_epochs[u.site] = prog.applied_epochs.get(u.site, 0) + prog.epochs_per_update
    state.global_weights = result.global_weights
    participants = sorted({u.site for u in applied}, key=state.sites.index)
    site_weight: dict[str, float] = {}
    for u in applied:
        site_weight[u.site] = site_weight.get(u.site, 0.0) + result.weights.get(prog.key(u), 0)
    state.rounds_closed = action.version
    if state.train_started_at is None:
        state.train_started_at = prog.opened_at
    state.last_round = RoundRecord(
        round=action.version,
        participants=participants,
        quarantined=result.quarantined,
        global_weights=result.global_weights,
        metrics={u.site: dict(u.metrics) for u in applied},
        num_cases={u.site: u.num_cases for u in applied},
        weights=site_weight,
        opened_at=min(u.received_at for u in applied),
        closed_at=now,
        aggregation_s=result.seconds,
        global_dice=global_dice,
        global_dice_ema=global_dice_ema,
        updates=[
            {
                "key": prog.key(u),
                "site": u.site,
                "epoch": u.epoch,
                "base_version": u.base_version,
                "staleness": action.version - 1 - u.base_version,
                "weight": result.weights.get(prog.key(u), 0.0),
            }
            for u in applied
        ],
    )


def close_async(state: ExperimentState, reason: str, now: float) -> None:
    prog = state.asynchronous
    assert prog is not None  # noqa: S101
    prog.closed_at, prog.closed_reason = now, reason
