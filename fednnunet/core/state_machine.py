"""The experiment's state machine: pure, no I/O, no clock of its own.

The coordinator loads the state, feeds it events (site reports, heartbeats,
results of its own actions) and asks :func:`next_actions` what to do now. The
decision depends only on the state and ``now`` (level-triggered), so a freshly
started coordinator, or one that lost a message, reaches the same decision.

Phases::

    ffe : fingerprint -> plan -> train(1..R) -> evaluate -> validate -> done
    asym:                plan -> train(1..R) -> evaluate -> validate -> done
    any : -> failed | cancelled

Every train round starts with each site scoring the global it received (federated
evaluation); ``evaluate`` scores the last global the same way, so that the best global
by nnU-Net's EMA rule is known before ``validate`` writes each site's checkpoints.

Per site, per phase/round: pending -> queued -> running -> done | failed | late
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from fednnunet.core import async_rounds as asy
from fednnunet.core.global_eval import case_weighted_dice, is_new_best, next_ema
from fednnunet.messages import ArtifactRef, ExperimentOptions, Metrics, ShortText, SiteReport
from fednnunet.phases import TERMINAL, ExperimentPhase, Outcome, Phase

__all__ = ["TERMINAL", "ExperimentPhase", "ExperimentState", "Outcome", "Phase"]

SiteState = Literal["pending", "queued", "running", "done", "failed", "late"]


class SiteStatus(BaseModel):
    state: SiteState = "pending"
    attempt: int = 0
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: ShortText | None = None
    retryable: bool = True  # False: another attempt cannot help (e.g. a malformed dataset)
    report: SiteReport | None = None


class RoundRecord(BaseModel):
    round: int
    participants: list[str]
    late: list[str] = Field(default_factory=list)
    quarantined: dict[str, str] = Field(default_factory=dict)
    global_weights: ArtifactRef | None = None
    metrics: dict[str, Metrics] = Field(default_factory=dict)
    num_cases: dict[str, int] = Field(default_factory=dict)
    # The normalised FedAvg weight each participant got (after any max_site_weight cap).
    weights: dict[str, float] = Field(default_factory=dict)
    opened_at: float = 0.0
    closed_at: float = 0.0
    aggregation_s: float = 0.0
    # Async versions: each applied update (site, epoch, base_version, staleness, weight).
    updates: list[dict[str, Any]] = Field(default_factory=list)
    # The previous round's global model as the participants scored it before training
    # (case-weighted pseudo-Dice) and nnU-Net's EMA of that series so far.
    global_dice: float | None = None
    global_dice_ema: float | None = None

    def overhead_s(self) -> float | None:
        """Round wall time not spent in the slowest participant's local training."""
        train = [self.metrics.get(s, {}).get("train_s") for s in self.participants]
        train = [t for t in train if t is not None]
        if not train or not self.closed_at:
            return None
        return (self.closed_at - self.opened_at) - max(train)


class ExperimentState(BaseModel):
    """Everything needed to resume an experiment; stored in Redis, journaled in S3.

    Bounded in size whatever the round number: the round history is not part of it
    (one Redis hash entry and one S3 object per closed round); it keeps the count of
    closed rounds and the last round's record.
    """

    experiment_id: str
    sites: list[str]
    options: ExperimentOptions  # as the spec gave them, for the whole experiment
    phase: ExperimentPhase = Phase.FINGERPRINT
    # mode async: where the FedBuff train phase stands (core/async_rounds.py).
    asynchronous: asy.AsyncProgress | None = None
    round: int = 0
    seq: int = 0
    phase_opened_at: float = 0.0
    created_at: float = 0.0
    finished_at: float | None = None
    sites_status: dict[str, SiteStatus] = Field(default_factory=dict)
    merged_fingerprint: ArtifactRef | None = None
    plans_sha256: dict[str, str] = Field(default_factory=dict)
    # Training cases each site declared when it planned: its FedAvg weight for the whole
    # experiment (a round report claiming another count is refused).
    declared_cases: dict[str, int] = Field(default_factory=dict)
    global_weights: ArtifactRef | None = None
    # Rounds closed so far (records 1..rounds_closed live in the round history), the
    # newest record, and when round 1 opened (for the ETA without reading the history).
    rounds_closed: int = 0
    last_round: RoundRecord | None = None
    train_started_at: float | None = None
    # Round records 1..history_in_s3 are known to be written to S3 (no re-check needed).
    history_in_s3: int = 0
    # Read side only, never saved with the state: filled by
    # RedisState.load(..., with_history=True) for reports, tests and plots.
    history: list[RoundRecord] = Field(default_factory=list, exclude=True)
    # Federated evaluation: EMA of the case-weighted global-model pseudo-Dice, and the
    # global with the best EMA (every site's checkpoint_best.pth).
    global_dice_ema: float | None = None
    best_global: ArtifactRef | None = None
    best_global_round: int | None = None
    best_global_dice_ema: float | None = None
    # The last global as each site scored it in the evaluate phase, and case-weighted.
    final_global_eval: dict[str, Metrics] = Field(default_factory=dict)
    final_global_dice: float | None = None
    final_metrics: dict[str, Metrics] = Field(default_factory=dict)
    # Site -> metric -> why it has no value (e.g. nnU-Net's NaN Dice for an absent label).
    final_missing: dict[str, dict[str, str]] = Field(default_factory=dict)
    error: ShortText | None = None
    ignored_reports: int = 0
    refused_reports: int = 0
    # Seconds each site spent on its train tasks (as reported), counted once per round or
    # async epoch: idle = train phase wall - busy.
    busy_s: dict[str, float] = Field(default_factory=dict)
    busy_round: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _options_from_old_layout(cls, data: Any) -> Any:
        """A state stored before the options were one model kept some at the top level."""
        if isinstance(data, dict) and "method" in data:
            data = dict(data)
            top = {k: data.pop(k) for k in _OLD_TOP_LEVEL_OPTIONS if k in data}
            data["options"] = {**(data.get("options") or {}), **top}
        return data

    @property
    def quorum(self) -> int:
        """Sites a round needs (the option, or every site)."""
        return self.options.quorum or len(self.sites)


_OLD_TOP_LEVEL_OPTIONS = (
    "method",
    "rounds",
    "quorum",
    "round_deadline_s",
    "heartbeat_timeout_s",
    "max_attempts",
    "stop_after",
    "max_site_weight",
    "aggregation",
)


# ---------------------------------------------------------------- actions
@dataclass(frozen=True)
class Dispatch:
    """Send this site the task for the current phase/round (attempt n)."""

    site: str
    phase: Phase
    round: int
    attempt: int


@dataclass(frozen=True)
class MergeFingerprints:
    reports: tuple[SiteReport, ...]


@dataclass(frozen=True)
class Aggregate:
    round: int
    reports: tuple[SiteReport, ...]
    late: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Fail:
    reason: str


@dataclass(frozen=True)
class GiveUp:
    """A site used up its attempts without an answer: exclude it (quorum permitting)."""

    site: str
    reason: str


Action = Dispatch | MergeFingerprints | Aggregate | Fail | GiveUp | asy.ApplyBuffer


# ---------------------------------------------------------------- creation
def new_experiment(
    experiment_id: str,
    sites: list[str],
    options: ExperimentOptions,
    now: float,
    global_weights: ArtifactRef | None = None,
) -> ExperimentState:
    """A new experiment in its first phase; ``global_weights``: a pretrained round-0 model."""
    state = ExperimentState(
        experiment_id=experiment_id,
        sites=list(sites),
        options=options,
        created_at=now,
        global_weights=global_weights,
        asynchronous=asy.new_progress(options, len(sites)),
    )
    _open_phase(state, options.strategy.first_phase, 0, now)
    return state


def _open_phase(state: ExperimentState, phase: ExperimentPhase, round_: int, now: float) -> None:
    state.phase, state.round = phase, round_
    state.phase_opened_at = now
    state.seq += 1
    state.sites_status = (
        {s: SiteStatus() for s in state.sites} if phase not in TERMINAL else state.sites_status
    )
    if phase in TERMINAL:
        state.finished_at = now


# ---------------------------------------------------------------- events
def apply_dispatched(state: ExperimentState, action: Dispatch, now: float) -> None:
    st = state.sites_status[action.site]
    if asy.is_async_train(state) and action.phase == Phase.TRAIN:
        if not asy.apply_async_dispatched(state, action.site, action.round, now):
            return
    elif action.phase != state.phase or action.round != state.round or st.state in ("done", "late"):
        return
    st.state, st.attempt, st.dispatched_at = "queued", action.attempt, now
    st.started_at, st.error, st.retryable = None, None, True


def apply_heartbeat(state: ExperimentState, site: str, phase: str, round_: int, now: float) -> None:
    """A site said it is working on (phase, round): queued -> running."""
    st = state.sites_status.get(site)
    if st is None or phase != state.phase or round_ != asy.site_round(state, site):
        return
    if st.state == "queued":
        st.state, st.started_at = "running", now


def is_current(state: ExperimentState, report: SiteReport) -> bool:
    """The report answers the site's task in flight (async train: its current epoch)."""
    return (
        report.site_id in state.sites_status
        and report.phase == state.phase
        and report.round == asy.site_round(state, report.site_id)
    )


def record_busy(state: ExperimentState, report: SiteReport) -> None:
    """Count a train report's task time once per (site, round or epoch), late ones too."""
    site = report.site_id
    if report.phase != Phase.TRAIN or site not in state.sites_status or not report.ok:
        return
    if report.round > state.busy_round.get(site, 0):
        state.busy_round[site] = report.round
        state.busy_s[site] = state.busy_s.get(site, 0.0) + report.seconds


def apply_report(state: ExperimentState, report: SiteReport, now: float) -> bool:
    """Record a site's report. Returns False when it is ignored (stale, unknown, duplicate)."""
    st = state.sites_status.get(report.site_id)
    if (
        st is None
        or state.phase in TERMINAL
        or not is_current(state, report)
        or st.state in ("done", "late")
    ):
        state.ignored_reports += 1
        return False
    if asy.is_async_train(state):
        asy.apply_async_report(state, report, now)
        return True
    st.finished_at = now
    if report.ok:
        st.state, st.report, st.error = "done", report, None
    else:
        st.state, st.error = "failed", report.error or "site reported failure"
        st.retryable = report.retryable
    return True


def report_problem(state: ExperimentState, report: SiteReport, bucket_prefix: str) -> str | None:
    """Why a (current, well-formed) report must be refused, or None.

    The coordinator believes nothing it can check: the artifact must be the one object
    of this experiment, phase, round and site in the site's own bucket, and a round's
    case count must be the one the site declared when it planned.
    """
    from fednnunet.keys import site_artifact_key, site_bucket

    if not report.ok:
        return None
    expected_key = site_artifact_key(
        state.experiment_id, report.phase, report.round, report.site_id
    )
    ref = report.artifact
    if expected_key is None:
        if ref is not None:
            return f"a {report.phase} report carries no artifact, got {ref.key!r}"
    elif ref is None:
        return f"a {report.phase} report must reference its artifact"
    elif ref.bucket != site_bucket(bucket_prefix, report.site_id) or ref.key != expected_key:
        return (
            f"artifact s3://{ref.bucket}/{ref.key} is not this site's "
            f"s3://{site_bucket(bucket_prefix, report.site_id)}/{expected_key}"
        )
    if report.phase == Phase.PLAN and report.num_cases < 1:
        return "a plan report must declare the site's training cases (at least 1)"
    if report.phase == Phase.TRAIN and asy.is_async_train(state):
        problem = asy.async_report_problem(state, report)
        if problem is not None:
            return problem
    if report.phase == Phase.TRAIN:
        declared = state.declared_cases.get(report.site_id)
        if declared is not None and report.num_cases != declared:
            return (
                f"claims {report.num_cases} training cases in round {report.round}, "
                f"declared {declared} when planning"
            )
    return None


def apply_refused(state: ExperimentState, site: str, reason: str, now: float) -> None:
    """A site's report was refused: the site failed this attempt (retries are bounded)."""
    state.refused_reports += 1
    st = state.sites_status.get(site)
    if st is None or st.state in ("done", "late"):
        return
    st.state, st.error, st.report, st.finished_at = "failed", f"refused: {reason}", None, now


def apply_gave_up(state: ExperimentState, site: str, reason: str, now: float) -> None:
    """No more attempts for this site in this phase/round (quorum decides what follows)."""
    st = state.sites_status.get(site)
    if st is None or st.state in ("done", "late"):
        return
    st.state, st.error, st.retryable, st.finished_at = "failed", reason, False, now
    state.seq += 1  # a decision worth journaling; the quorum check follows in the next pass


def apply_merged(state: ExperimentState, ref: ArtifactRef, now: float) -> None:
    if state.phase != Phase.FINGERPRINT:
        return
    state.merged_fingerprint = ref
    after = Outcome.DONE if state.options.stop_after == Phase.FINGERPRINT else Phase.PLAN
    _open_phase(state, after, 0, now)


def apply_plans_checked(state: ExperimentState, now: float) -> Fail | None:
    """Close the plan phase: FFE requires identical plans everywhere."""
    reports = {s: st.report for s, st in state.sites_status.items() if st.report}
    state.plans_sha256 = {s: r.plans_sha256 or "" for s, r in reports.items()}
    state.declared_cases = {s: r.num_cases for s, r in reports.items()}
    problem = state.options.strategy.plans_problem(state.plans_sha256)
    if problem is not None:
        return Fail(problem)
    after = Outcome.DONE if state.options.stop_after == Phase.PLAN else Phase.TRAIN
    _open_phase(state, after, 1, now)
    if state.phase == Phase.TRAIN:
        asy.open_async(state, now)
    return None


def _score_global(
    state: ExperimentState,
    global_round: int,
    ref: ArtifactRef | None,
    metrics: dict[str, dict[str, float]],
    sites: list[str],
    cases: dict[str, int],
) -> tuple[float | None, float | None]:
    """Fold one global model's federated evaluation into the EMA; track the best global.

    A global without an object (round 0 without pretrained weights) updates the EMA but
    cannot become the best: there is nothing to hand the sites.
    """
    dice = case_weighted_dice(metrics, cases, sites)
    if dice is None:
        return None, None
    state.global_dice_ema = next_ema(state.global_dice_ema, dice)
    if ref is not None and is_new_best(state.best_global_dice_ema, state.global_dice_ema):
        state.best_global, state.best_global_round = ref, global_round
        state.best_global_dice_ema = state.global_dice_ema
    return dice, state.global_dice_ema


def apply_aggregated(state: ExperimentState, record: RoundRecord, now: float) -> None:
    if state.phase != Phase.TRAIN or record.round != state.round:
        return
    record.closed_at = now
    # The participants scored the previous global (the one this round started from).
    record.global_dice, record.global_dice_ema = _score_global(
        state,
        record.round - 1,
        state.global_weights,
        record.metrics,
        record.participants,
        record.num_cases,
    )
    state.last_round = record
    state.rounds_closed = record.round
    if state.train_started_at is None or record.round == 1:
        state.train_started_at = record.opened_at
    state.global_weights = record.global_weights
    if state.round < state.options.rounds:
        _open_phase(state, Phase.TRAIN, state.round + 1, now)
    else:
        _open_phase(state, Phase.EVALUATE, 0, now)


def apply_evaluated(state: ExperimentState, now: float) -> None:
    """The last global's scores are in: the best global is final; validation follows."""
    reports = {s: st.report for s, st in state.sites_status.items() if st.report}
    state.final_global_eval = {s: dict(r.metrics) for s, r in reports.items()}
    last_round = state.rounds_closed
    state.final_global_dice, _ = _score_global(
        state,
        last_round,
        state.global_weights,
        state.final_global_eval,
        list(reports),
        state.declared_cases or {s: r.num_cases for s, r in reports.items()},
    )
    if state.best_global is None and state.global_weights is not None:
        # No global was ever scored: nnU-Net's rule (no best yet) keeps the last one.
        state.best_global, state.best_global_round = state.global_weights, last_round
    _open_phase(state, Phase.VALIDATE, 0, now)


def apply_async_closed(state: ExperimentState, reason: str, now: float) -> None:
    """The async train phase ends (target reached or wall limit): every site scores the
    last version (best-model rule, as after sync rounds), then validates.

    Sites still in the middle of an epoch see the closed marker and abandon it."""
    if not asy.is_async_train(state):
        return
    asy.close_async(state, reason, now)
    _open_phase(state, Phase.EVALUATE, 0, now)


def score_async_version(
    state: ExperimentState, version: int, updates: list[asy.BufferedUpdate]
) -> tuple[float | None, float | None]:
    """The federated score of version ``version`` (the newest before this buffer): the
    updates that started from it scored it at their site before training. Updates from
    older versions scored those; they arrive out of order and stay out of the EMA."""
    fresh = [u for u in updates if u.base_version == version]
    return _score_global(
        state,
        version,
        state.global_weights,
        {u.site: dict(u.metrics) for u in fresh},
        sorted({u.site for u in fresh}, key=state.sites.index),
        {u.site: u.num_cases for u in fresh},
    )


def async_complete(state: ExperimentState, now: float) -> str | None:
    """Why the async train phase closes now: it must end and its last buffer is applied."""
    if not asy.is_async_train(state):
        return None
    reason = asy.finishing(state, now)
    return reason if reason is not None and not state.asynchronous.buffer else None  # type: ignore[union-attr]


def apply_validated(state: ExperimentState, now: float) -> None:
    reports = {s: st.report for s, st in state.sites_status.items() if st.report}
    state.final_metrics = {s: dict(r.metrics) for s, r in reports.items()}
    state.final_missing = {
        s: dict(r.missing_metrics) for s, r in reports.items() if r.missing_metrics
    }
    _open_phase(state, Outcome.DONE, 0, now)


def apply_failed(state: ExperimentState, reason: str, now: float) -> None:
    state.error = reason
    _open_phase(state, Outcome.FAILED, state.round, now)


def apply_cancelled(state: ExperimentState, now: float) -> None:
    if state.phase not in TERMINAL:
        state.error = "cancelled by user"
        _open_phase(state, Outcome.CANCELLED, state.round, now)


# ---------------------------------------------------------------- decisions
def _needs_all_sites(state: ExperimentState) -> bool:
    # Fingerprints and plans define the shared architecture: every site must take part.
    return state.phase in (Phase.FINGERPRINT, Phase.PLAN)


# An idle beat this long after a dispatch means the site's worker is not doing the task.
IDLE_GRACE_S = 10.0


def next_actions(
    state: ExperimentState,
    now: float,
    heartbeats: dict[str, float] | None = None,
    idle_since: dict[str, float] | None = None,
) -> list[Action]:
    """What the coordinator must do now. Pure: same state and clock, same answer.

    ``heartbeats``: last beat per site for this experiment; ``idle_since``: last time each
    site's worker said it had no task at all (coordinator clock, both).
    """
    if state.phase in TERMINAL:
        return []
    heartbeats = heartbeats or {}
    idle_since = idle_since or {}
    actions: list[Action] = []
    statuses = state.sites_status

    asynchronous = asy.is_async_train(state)
    if asynchronous:
        apply = asy.buffer_action(state, now)
        if apply is not None:  # first, so that the next dispatches carry the new version
            actions.append(apply)
        if asy.finishing(state, now) is not None:
            return actions  # nothing new is dispatched; the coordinator closes the phase

    def again(site: str, st: SiteStatus, why: str) -> Action:
        # Every re-dispatch path counts attempts and ends: no site is asked forever.
        if st.attempt >= state.options.max_attempts:
            return GiveUp(site, f"{why} after {st.attempt} attempt(s)")
        return Dispatch(site, state.phase, asy.site_round(state, site), st.attempt + 1)

    for site, st in statuses.items():
        if st.state == "pending" or (asynchronous and st.state == "done"):
            # Async: a site that delivered its epoch starts the next one right away.
            next_round = asy.site_round(state, site) + (1 if asynchronous else 0)
            actions.append(Dispatch(site, state.phase, next_round, 1))
        elif st.state == "failed" and st.retryable and st.attempt < state.options.max_attempts:
            actions.append(Dispatch(site, state.phase, asy.site_round(state, site), st.attempt + 1))
        elif (
            st.state == "queued"
            and idle_since.get(site, 0.0) > (st.dispatched_at or now) + IDLE_GRACE_S
        ):
            # The worker is up and idle, yet never started the task: it was lost (e.g. the
            # worker died between acknowledging it and its first heartbeat).
            actions.append(again(site, st, "task lost (worker idle)"))
        elif st.state == "running":
            last = max(heartbeats.get(site, 0.0), st.started_at or 0.0)
            if now - last > state.options.heartbeat_timeout_s:
                # The worker died mid-task (its message was acked on receipt): send it again.
                actions.append(again(site, st, "no heartbeat"))

    done = [s for s, st in statuses.items() if st.state == "done"]
    exhausted = _exhausted(state)
    needed = len(state.sites) if _needs_all_sites(state) else state.quorum
    if len(state.sites) - len(exhausted) < needed:
        why = "; ".join(f"{s}: {statuses[s].error}" for s in sorted(exhausted))
        return [Fail(f"{state.phase} failed at {len(exhausted)} site(s), {needed} needed: {why}")]

    if asynchronous:
        return actions
    reports = tuple(statuses[s].report for s in done if statuses[s].report)  # type: ignore[misc]
    all_done = len(done) == len(state.sites)
    # Every site either answered or is out of attempts: nobody else will report.
    settled = len(done) + len(exhausted) == len(state.sites)
    deadline_passed = (
        state.options.round_deadline_s is not None
        and now - state.phase_opened_at > state.options.round_deadline_s
    )
    if state.phase == Phase.FINGERPRINT and all_done:
        return [MergeFingerprints(reports)]
    if state.phase == Phase.PLAN and all_done:
        return []  # the coordinator closes it with apply_plans_checked (pure, no action needed)
    closing = state.options.strategy.round_closes(
        len(done), state.quorum, all_done, settled, deadline_passed
    )
    if state.phase == Phase.TRAIN and closing:
        late = tuple(s for s in state.sites if s not in done)
        return [Aggregate(state.round, reports, late)]
    if state.phase in (Phase.EVALUATE, Phase.VALIDATE) and closing:
        return []
    return actions


def _exhausted(state: ExperimentState) -> list[str]:
    """Sites that failed this phase/round for good (no attempt left, or not retryable)."""
    return [
        s
        for s, st in state.sites_status.items()
        if st.state == "failed" and (st.attempt >= state.options.max_attempts or not st.retryable)
    ]


def phase_complete(state: ExperimentState, now: float) -> bool:
    """Plan/evaluate/validate phases close without an action of their own (next_actions)."""
    if state.phase not in (Phase.PLAN, Phase.EVALUATE, Phase.VALIDATE):
        return False
    done = sum(st.state == "done" for st in state.sites_status.values())
    if done == len(state.sites):
        return True
    if state.phase == Phase.PLAN or done < state.quorum:
        return False
    deadline_passed = (
        state.options.round_deadline_s is not None
        and now - state.phase_opened_at > state.options.round_deadline_s
    )
    return deadline_passed or done + len(_exhausted(state)) == len(state.sites)
