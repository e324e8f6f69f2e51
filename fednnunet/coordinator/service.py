"""The coordinator: applies the pure state machine to Redis state, S3 objects and tasks.

Every entry point (a site report, a tick, a start or cancel request) takes the
experiment's Redis lock, loads the state, lets :func:`next_actions` decide,
performs the actions and saves. Decisions are level-triggered, so a restarted
or second coordinator converges on the same result; artifacts are write-once
and tasks idempotent, so repeating an action is harmless. After every phase or
round transition the state is journaled to S3, from which it is restored if
Redis loses it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from fednnunet.adapters.redis_state import Fence, LockLost, RedisState
from fednnunet.adapters.s3_store import ArtifactStore, ObjectRefused
from fednnunet.adapters.weights_codec import read_file_header
from fednnunet.background import low_priority_pool
from fednnunet.coordinator.aggregator import AggregationResult, RoundFold, aggregate_round
from fednnunet.coordinator.async_buffer import apply_buffer, version_result_of
from fednnunet.core import async_rounds as asy
from fednnunet.core import state_machine as sm
from fednnunet.core.aggregation import capped_weights
from fednnunet.core.identity import SenderPolicy
from fednnunet.core.retention import expired_globals, stale_at_end
from fednnunet.errors import FedError, IntegrityError, ServiceUnreachable
from fednnunet.keys import (
    HISTORY,
    IDLE_EXPERIMENT,
    JOURNAL,
    async_closed_key,
    coordinator_bucket,
    final_summary_key,
    folder_prefix,
    global_bucket,
    global_weights_key,
    history_key,
    initial_weights_key,
    journal_key,
    merged_fingerprint_key,
    parse_artifact_key,
    parse_progress_routing_key,
    plot_key,
    rounds_of,
    site_bucket,
)
from fednnunet.messages import ArtifactRef, ProgressEvent, SiteReport, SiteTask
from fednnunet.phases import Phase
from fednnunet.settings import Settings
from fednnunet.spec import ExperimentSpec

log = logging.getLogger(__name__)


_HISTORY_LEN = "journal_history_rounds"  # in a snapshot: how many round records it counts


SendTask = Callable[[SiteTask], None]
T = TypeVar("T")
# The most that background work started by a pass waits for the pass to end (a pass
# that hangs on a service longer than this only delays it; never forever).
_PASS_WAIT_S = 30.0

# Largest object a site may reference per phase (weights: FEDNNUNET_MAX_OBJECT_BYTES):
# checked with a stat before any byte is downloaded.
MAX_REPORTED_BYTES = {Phase.FINGERPRINT: 64 << 20, Phase.PLAN: 8 << 20}


@dataclass
class _PassEnd:
    """What background work started by a pass waits for: its end, and whether it saved."""

    event: threading.Event = field(default_factory=threading.Event)
    saved: bool = False


class Refused(FedError):
    """A site message the coordinator does not believe (logged and counted)."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind, self.reason = kind, reason
        super().__init__(reason)


class Coordinator:
    def __init__(
        self,
        settings: Settings,
        state: RedisState,
        store: ArtifactStore,
        send_task: SendTask,
        clock: Callable[[], float] = time.time,
        render_plots: bool = True,
        plot_every_s: float = 0.0,
    ) -> None:
        self.settings = settings
        self.redis = state
        self.store = store
        self.send_task = send_task
        self.clock = clock
        self.global_bucket = global_bucket(settings.bucket_prefix)
        # Per-site facts (history, journal, summaries, plots): not for the sites' eyes.
        self.private_bucket = coordinator_bucket(settings.bucket_prefix)
        # Pictures are drawn off the critical path (the next round is already dispatched),
        # by a low-priority thread, at most every plot_every_s and once at the end: a
        # matplotlib render costs CPU that the sites' uploads and downloads need.
        self._plots = low_priority_pool("fednnunet-plot")
        self.render_plots = render_plots
        self.plot_every_s = plot_every_s
        self._last_plot: dict[str, tuple[tuple[int, bool], float]] = {}
        self._plot_history: dict[str, list[sm.RoundRecord]] = {}  # plot thread's copy
        # Experiment -> the running FedAvg of its open round (folded as reports arrive).
        # Each open round's fold, or its construction by the low-priority thread.
        self._folds: dict[str, RoundFold | Future[RoundFold]] = {}
        self._fold_builder = low_priority_pool("fednnunet-fold")
        # Retention deletes (core/retention.py): after the pass that made them safe.
        self._retention = low_priority_pool("fednnunet-retention")
        # Experiment -> what waits for its current pass to end (see _after_pass).
        self._pass_waiters: dict[str, list[_PassEnd]] = {}
        # The last global this process published, per experiment: next round's reference.
        self._published: dict[str, tuple[ArtifactRef, bytearray]] = {}
        self._folds_lock = threading.Lock()
        self.senders = SenderPolicy.from_settings(settings)

    # ------------------------------------------------------------ entry points
    def start(self, spec: ExperimentSpec, sender: str | None = None) -> sm.ExperimentState:
        """Create the experiment (idempotent for the same id) and dispatch its first phase.

        ``sender``: the broker user that asked (None: called in-process, trusted).
        """
        if sender is not None and not self.senders.is_operator(sender):
            self.refuse(spec.experiment_id, "start", f"start from non-operator {sender}", sender)
            return None  # type: ignore[return-value]
        for site in spec.sites:
            self.store.ensure_bucket(site_bucket(self.settings.bucket_prefix, site))
        self.store.ensure_bucket(self.global_bucket)
        self.store.ensure_bucket(self.private_bucket)
        initial = self._checked_initial_weights(spec)
        state = sm.new_experiment(
            spec.experiment_id, spec.sites, spec.options(), self.clock(), global_weights=initial
        )
        if self.redis.create(state):
            self._journal(state)
        return self.advance(spec.experiment_id)

    def _checked_initial_weights(self, spec: ExperimentSpec) -> ArtifactRef | None:
        """The pretrained initial global, only as round 0's object in the global bucket."""
        ref = spec.initial_weights
        if ref is None:
            return None
        want = initial_weights_key(spec.experiment_id)
        actual = self.store.stat(self.global_bucket, want)
        if ref.bucket != self.global_bucket or ref.key != want or actual != ref:
            raise FedError(
                f"initial weights must be s3://{self.global_bucket}/{want} as uploaded "
                f"by the operator, got s3://{ref.bucket}/{ref.key}"
            )
        return ref

    def on_report(self, report: SiteReport, sender: str | None = None) -> None:
        """Handle a site's report. ``sender``: its broker-validated user (None: trusted
        in-process caller). Nothing in a report can stop the coordinator: a report that
        cannot be believed or handled is refused, logged and counted."""
        exp = report.experiment_id
        if not self.senders.may_speak_for(sender, report.site_id):
            self.refuse(exp, "forged", f"report for site {report.site_id} from {sender!r}", sender)
            return
        refused: Refused | None = None
        # Fetch, verify and screen an update now, outside the lock: when the last site
        # reports, only its own update remains to be read before aggregating.
        fold = self._open_fold(report)
        data: bytearray | None = None
        try:
            ref, data = self._checked_reference(report, fetch=fold is not None)
        except Refused as exc:
            refused, ref = exc, None
        if ref is not None and report.phase == Phase.TRAIN:
            try:
                if fold is not None:
                    fold.screen(self.store, report, data)
                else:
                    self.store.get_file(ref)  # for the batch aggregation at the round's end
            except ServiceUnreachable:
                raise
            except Exception as exc:  # noqa: BLE001 - the locked screening refuses it, with why
                log.warning("prefetch of %s's update failed: %s", report.site_id, exc)
        with self.redis.locked(exp) as fence:
            state = self._load(exp)
            if state is None:
                self.refuse(None, "unknown-experiment", f"report for {exp!r}", sender)
                return
            current = sm.is_current(state, report)
            if refused is None:
                sm.record_busy(state, report)
            problem = refused.reason if refused is not None else None
            if report.site_id not in state.sites:
                state.ignored_reports += 1
                self.refuse(exp, "unknown-site", f"report from {report.site_id}", sender)
            elif problem is None and current:
                problem = sm.report_problem(state, report, self.settings.bucket_prefix)
            if report.site_id not in state.sites:
                pass
            elif problem is not None:
                kind = refused.kind if refused is not None else "bad-report"
                self.refuse(exp, kind, f"{report.site_id}: {problem}", sender)
                if current:  # the site's own report: it failed this attempt (bounded)
                    sm.apply_refused(state, report.site_id, problem, self.clock())
            elif not sm.apply_report(state, report, self.clock()):
                log.info(
                    "stale/duplicate report %s/%s r%s from %s ignored",
                    exp,
                    report.phase,
                    report.round,
                    report.site_id,
                )
            elif report.ok and report.phase == Phase.TRAIN:
                self._fold_accepted(state)
            self._advance_locked(state, fence)

    # ------------------------------------------------------------ streaming FedAvg
    def _round_fold(self, state: sm.ExperimentState) -> RoundFold | None:
        """The open round's fold, when its rules allow folding on arrival (FedAvg by
        declared cases, no cap, the previous global defines the model); else None."""
        if not self._folds_on_arrival(state):
            return None
        exp = state.experiment_id
        with self._folds_lock:
            fold = self._folds.get(exp)
        if isinstance(fold, Future):  # being built since the last round closed
            try:
                fold = fold.result()
            except Exception:  # noqa: BLE001 - built again below, where an error is seen
                fold = None
        with self._folds_lock:
            if fold is None or fold.previous != state.global_weights:
                exact = state.options.strategy.exact_architecture
                encoded = self._kept_global(exp, state.global_weights)
                fold = RoundFold(self.store, state.global_weights, exact, encoded)
            self._folds[exp] = fold
            return fold

    def _kept_global(self, experiment_id: str, ref: ArtifactRef | None) -> bytearray | None:
        """The bytes of ``ref`` if this process published it (kept since; not hashed
        again), else None: they are fetched and verified. (One dict read: safe with or
        without ``_folds_lock`` held.)"""
        kept = self._published.get(experiment_id)
        return kept[1] if kept is not None and ref is not None and kept[0] == ref else None

    @staticmethod
    def _folds_on_arrival(state: sm.ExperimentState) -> bool:
        return (
            state.phase == Phase.TRAIN
            and state.round > 1
            and state.global_weights is not None
            and state.options.aggregation == "fedavg"
            and state.options.max_site_weight is None
        )

    def _open_fold(self, report: SiteReport) -> RoundFold | None:
        """The fold of the round this report is for, if that round is open and folds on
        arrival (an unlocked read: the locked pass decides what counts)."""
        if report.phase != Phase.TRAIN or not report.ok or report.artifact is None:
            return None
        state = self.redis.load(report.experiment_id)
        if state is None or (report.phase, report.round) != (state.phase, state.round):
            return None
        return self._round_fold(state)

    def _fold_accepted(self, state: sm.ExperimentState) -> None:
        """Fold the accepted updates of the open round into its running sum, in the
        canonical order; those that fail screening are left for aggregation to refuse."""
        fold = self._round_fold(state)
        if fold is None:
            return
        ordered = []
        for report in self._canonical_reports(state):
            try:
                problems, _ = fold.screen(self.store, report)
            except ServiceUnreachable:
                raise
            except Exception:  # noqa: BLE001, S112 - quarantined by the aggregation, with why
                continue
            if not problems:
                cases = state.declared_cases.get(report.site_id, report.num_cases)
                ordered.append((report, cases))
        fold.fold(self.store, ordered)

    @staticmethod
    def _canonical_reports(state: sm.ExperimentState) -> list[SiteReport]:
        """The round's accepted reports in the order they were accepted (ties: site order).

        Kept in the state (finish times), so a restarted coordinator folds the same order.
        """
        done = [
            (st.finished_at or 0.0, state.sites.index(site), st.report)
            for site, st in state.sites_status.items()
            if st.state == "done" and st.report is not None
        ]
        return [report for _, _, report in sorted(done, key=lambda x: x[:2])]

    def _checked_reference(
        self, report: SiteReport, fetch: bool = False
    ) -> tuple[ArtifactRef | None, bytearray | None]:
        """The report's artifact, believed only after checking it against S3 itself:
        the claimed site's bucket and key layout, then a stat (size within the phase's
        limit and equal to the claim, same sha256) before any byte is downloaded.
        ``fetch``: the same checks on the GET's headers, then its body, read and
        verified (one request instead of two; None if the body failed verification,
        which the screening then refuses)."""
        ref = report.artifact
        if ref is None or not report.ok:
            return None, None
        want_bucket = site_bucket(self.settings.bucket_prefix, report.site_id)
        if ref.bucket != want_bucket:
            raise Refused("foreign-object", f"references bucket {ref.bucket}, not {want_bucket}")
        if not ref.key.startswith(folder_prefix(report.experiment_id, report.phase)):
            raise Refused("foreign-object", f"references key {ref.key[:200]!r}")
        limit = MAX_REPORTED_BYTES.get(report.phase, self.settings.max_object_bytes)
        try:
            if fetch:
                return ref, self.store.get_checked(ref, limit)
            self.store.stat_checked(ref, limit)
        except ObjectRefused as exc:
            raise Refused(exc.kind, exc.reason) from None
        except IntegrityError as exc:  # only a fetched body is verified
            log.warning("update of %s failed verification: %s", report.site_id, exc)
            return ref, None
        return ref, None

    def on_progress(self, event: ProgressEvent, routing_key: str, sender: str | None) -> None:
        """A progress event or heartbeat: the site comes from the routing key and the
        broker-validated sender, never from the body (a forged beat could keep a dead
        site "alive")."""
        parsed = parse_progress_routing_key(routing_key)
        if parsed is None:
            self.refuse(None, "bad-progress", f"routing key {routing_key[:120]!r}", sender)
            return
        experiment, site, _kind = parsed
        if not self.senders.may_speak_for(sender, site):
            where = None if experiment == IDLE_EXPERIMENT else experiment
            self.refuse(where, "forged-progress", f"progress for {site} from {sender!r}", sender)
            return
        if event.site_id != site or event.experiment_id != experiment:
            self.refuse(
                None, "bad-progress", f"body names {event.experiment_id}/{event.site_id}", sender
            )
            return
        self.redis.record_progress(event)

    def refuse(self, experiment: str | None, kind: str, reason: str, sender: str | None) -> None:
        log.warning("refused %s message (%s): %s", kind, sender, reason)
        try:
            self.redis.record_refusal(experiment, kind, reason, sender)
        except Exception:  # noqa: BLE001 - counting must not turn a refusal into a crash
            log.exception("could not record a refusal")

    def cancel(self, experiment_id: str, sender: str | None = None) -> sm.ExperimentState | None:
        if sender is not None and not self.senders.is_operator(sender):
            self.refuse(experiment_id, "cancel", f"cancel from non-operator {sender}", sender)
            return None
        with self.redis.locked(experiment_id) as fence:
            state = self._load(experiment_id)
            if state is not None:
                sm.apply_cancelled(state, self.clock())
                self._save(state, journal=True, fence=fence)
            return state

    def advance(self, experiment_id: str) -> sm.ExperimentState:
        with self.redis.locked(experiment_id) as fence:
            state = self._load(experiment_id)
            if state is None:
                raise FedError(f"unknown experiment {experiment_id}")
            return self._advance_locked(state, fence)

    def tick(self) -> None:
        """Periodic: recover lost Redis state, re-dispatch dead sites, close deadlines."""
        if not self.redis.is_alive_marked():
            self.recover_from_journal()
            self.redis.mark_alive()
        for exp in self.redis.experiments():
            try:  # one broken experiment must not stop the others
                state = self.redis.load(exp)
                if state is None or state.phase in sm.TERMINAL:
                    continue
                self.advance(exp)
            except Exception:  # noqa: BLE001
                log.exception("advancing %s failed", exp)

    # ------------------------------------------------------------ the loop
    def _advance_locked(self, state: sm.ExperimentState, fence: Fence) -> sm.ExperimentState:
        """Apply every decision due now, then save (and journal) once for the whole pass;
        then let go what waited for the pass to end (:meth:`_after_pass`)."""
        saved = False
        try:
            changed = self._decide_and_save(state, fence)
            saved = True
        finally:
            self._end_pass(state.experiment_id, saved)
        if state.phase != Phase.TRAIN:  # no round to fold: drop what was kept for one
            with self._folds_lock:
                self._folds.pop(state.experiment_id, None)
                self._published.pop(state.experiment_id, None)
        if changed:
            self._maybe_plot(state, self.clock())
        return state

    def _decide_and_save(self, state: sm.ExperimentState, fence: Fence) -> bool:
        """The pass itself; whether it changed the state."""
        closed_before = state.rounds_closed
        seq_at_load = state.seq
        try:
            for _ in range(8 + 4 * state.options.rounds):  # bounded: each pass moves a step
                now = self.clock()
                seq_before = state.seq
                self._apply_heartbeats(state, now)
                if state.phase == Phase.PLAN and sm.phase_complete(state, now):
                    failure = sm.apply_plans_checked(state, now)
                    if failure is not None:
                        sm.apply_failed(state, failure.reason, now)
                elif state.phase == Phase.EVALUATE and sm.phase_complete(state, now):
                    sm.apply_evaluated(state, now)
                elif state.phase == Phase.VALIDATE and sm.phase_complete(state, now):
                    sm.apply_validated(state, now)
                    self._write_final(state)
                    self._retention.submit(
                        self._after_pass(state.experiment_id, self._sweep_globals, True),
                        state.model_copy(),
                    )
                elif (closing := sm.async_complete(state, now)) is not None:
                    self._put_once_json(  # sites read it: they abandon the epoch in flight
                        self.global_bucket,
                        async_closed_key(state.experiment_id),
                        {"reason": closing},
                        kind="journal",
                    )
                    sm.apply_async_closed(state, closing, now)
                beats = self.redis.heartbeats(state.experiment_id)
                for action in sm.next_actions(state, now, beats, self.redis.idle_since()):
                    self._perform(state, action, now)
                if state.seq == seq_before:
                    break
        except LockLost:
            raise
        except Exception:
            # Keep what this pass already did (e.g. a closed round) before failing.
            self._save(state, state.seq != seq_at_load, fence, closed_before)
            raise
        changed = state.seq != seq_at_load
        self._save(state, journal=changed, fence=fence, closed_before=closed_before)
        return changed

    def _after_pass(
        self, experiment_id: str, fn: Callable[..., T], saved_only: bool = False
    ) -> Callable[..., T | None]:
        """``fn``, made to wait until this pass over the experiment has ended.

        For background work that a pass starts: begun at once, the next round's fold
        builder (a niced thread) took turns with this thread at the GIL while it sent
        the round's tasks and saved the state, and a niced thread holding the GIL on a
        busy machine stalls this one until the scheduler gets back to it.
        ``saved_only``: run only if the pass saved the state and its snapshot (a pass that
        failed, or that has not ended after ``_PASS_WAIT_S``, skips it)."""
        end = _PassEnd()
        self._pass_waiters.setdefault(experiment_id, []).append(end)

        def after(*args: object, **kwargs: object) -> T | None:
            ended = end.event.wait(_PASS_WAIT_S)
            if saved_only and not (ended and end.saved):
                log.info("%s skipped: the pass over %s did not save", fn.__name__, experiment_id)
                return None
            return fn(*args, **kwargs)

        return after

    def _end_pass(self, experiment_id: str, saved: bool) -> None:
        for end in self._pass_waiters.pop(experiment_id, []):
            end.saved = saved
            end.event.set()

    def _apply_heartbeats(self, state: sm.ExperimentState, now: float) -> None:
        progress = self.redis.progress(state.experiment_id)
        for site, event in progress.items():
            st = state.sites_status.get(site)
            if st is None or st.state != "queued" or st.dispatched_at is None:
                continue
            if event.get("received", 0.0) >= st.dispatched_at:
                sm.apply_heartbeat(
                    state, site, event.get("phase") or "", event.get("round", -1), now
                )

    def _perform(self, state: sm.ExperimentState, action: sm.Action, now: float) -> None:
        if isinstance(action, sm.Dispatch):
            self.send_task(self._task_for(state, action))
            sm.apply_dispatched(state, action, now)
        elif isinstance(action, sm.MergeFingerprints):
            try:
                ref = self._merge_fingerprints(state, action.reports)
            except (ServiceUnreachable, LockLost):
                raise  # not the sites' fault: retried on the next pass
            except Exception as exc:  # noqa: BLE001 - a crafted summary fails cleanly
                sm.apply_failed(state, f"fingerprint merge: {_one_line(exc)}", now)
                return
            sm.apply_merged(state, ref, now)
        elif isinstance(action, sm.Aggregate):
            self._aggregate(state, action, now)
        elif isinstance(action, asy.ApplyBuffer):
            self._apply_buffer(state, action, now)
        elif isinstance(action, sm.GiveUp):
            log.warning("giving up on %s in %s: %s", action.site, state.phase, action.reason)
            sm.apply_gave_up(state, action.site, action.reason, now)
        elif isinstance(action, sm.Fail):
            sm.apply_failed(state, action.reason, now)

    # ------------------------------------------------------------ actions
    def _task_for(self, state: sm.ExperimentState, action: sm.Dispatch) -> SiteTask:
        task = SiteTask(
            experiment_id=state.experiment_id,
            site_id=action.site,
            phase=action.phase,
            round=action.round,
            attempt=action.attempt,
            options=state.options,
        )
        strategy = state.options.strategy
        if action.phase == Phase.PLAN and strategy.federated_fingerprint:
            task.merged_fingerprint = state.merged_fingerprint
        if action.phase in (Phase.TRAIN, Phase.EVALUATE, Phase.VALIDATE):
            task.global_weights = state.global_weights
            task.plans_sha256 = strategy.expected_plans(state.plans_sha256)
        prog = state.asynchronous
        if action.phase == Phase.TRAIN and prog is not None:
            task.base_version = prog.version
            task.progress = min(1.0, prog.consumed_epochs / prog.target_epochs)
        if action.phase == Phase.VALIDATE:
            task.best_weights = state.best_global
            task.best_dice_ema = state.best_global_dice_ema
        return task

    def _apply_buffer(self, state: sm.ExperimentState, action: asy.ApplyBuffer, now: float) -> None:
        """Publish the next global version from the buffer, exactly once.

        The version's object is write-once and names the updates inside it: a coordinator
        killed between writing it and saving the state finds it and reuses it."""
        prog = state.asynchronous
        assert prog is not None  # noqa: S101
        key = global_weights_key(state.experiment_id, action.version)
        existing = self.store.stat(self.global_bucket, key)
        if existing is not None:
            # Written by a coordinator that died before saving the state: the header names
            # the updates inside it; their weights are the same pure function again (no
            # case-derived weights in a header every site can read).
            _, _, meta = read_file_header(self.store.get_file(existing))
            applied = [k for k in meta.get("updates", "").split(",") if k]
            if not applied:
                raise FedError(f"version {action.version} exists without its update list")
            result = version_result_of(state, action, existing, applied)
        else:
            result = apply_buffer(
                self.store,
                state,
                action.updates,
                self.global_bucket,
                key,
                exact_architecture=state.options.strategy.exact_architecture,
            )
        for k, why in result.quarantined.items():
            log.warning("async update %s quarantined: %s", k, why)
        state.refused_reports += len(result.quarantined)
        asy.apply_version(state, action, result, now)

    def _merge_fingerprints(
        self, state: sm.ExperimentState, reports: tuple[SiteReport, ...]
    ) -> ArtifactRef:
        from fednnunet.core.fingerprint_merge import (
            merge_fingerprint_summaries,
            validate_compatible,
        )

        ordered = sorted(reports, key=lambda r: state.sites.index(r.site_id))
        summaries = []
        for r in ordered:
            if r.artifact is None:
                raise FedError(f"site {r.site_id} sent no fingerprint")
            summaries.append(self.store.get_json(r.artifact))
        validate_compatible(summaries)
        merged = merge_fingerprint_summaries(summaries)
        key = merged_fingerprint_key(state.experiment_id)
        return self._put_once_json(self.global_bucket, key, merged, kind="merged_fingerprint")

    def _aggregate(self, state: sm.ExperimentState, action: sm.Aggregate, now: float) -> None:
        key = global_weights_key(state.experiment_id, action.round)
        in_order = {r.site_id: i for i, r in enumerate(self._canonical_reports(state))}
        reports = sorted(
            action.reports,
            key=lambda r: (in_order.get(r.site_id, len(in_order)), state.sites.index(r.site_id)),
        )
        res = self._aggregate_once(state, reports, key)
        result_ref, participants, quarantined = (
            res.global_weights,
            res.participants,
            res.quarantined,
        )
        agg_s = res.seconds
        if result_ref is None:
            # Too few acceptable updates. A quarantined site would only re-send the same
            # stored update, so it is excluded from this round (not retried): the round
            # closes once the others suffice, or the experiment fails naming why.
            for site, why in quarantined.items():
                st = state.sites_status[site]
                st.state, st.report = "failed", None
                st.error, st.retryable = f"update quarantined: {why}", False
            state.refused_reports += len(quarantined)
            log.warning("round %s not aggregated: %s", action.round, quarantined)
            return
        for site, why in quarantined.items():
            log.warning("update of %s quarantined in round %s: %s", site, action.round, why)
        record = sm.RoundRecord(
            round=action.round,
            participants=participants,
            late=list(action.late),
            quarantined=quarantined,
            global_weights=result_ref,
            metrics={r.site_id: dict(r.metrics) for r in reports},
            num_cases={r.site_id: r.num_cases for r in reports},
            weights=res.weights,
            opened_at=state.phase_opened_at,
            aggregation_s=agg_s,
        )
        for site in action.late:
            state.sites_status[site].state = "late"
        previous = state.global_weights
        best_before = state.best_global_round
        sm.apply_aggregated(state, record, now)
        keep = state.options.kept_rounds
        expired = expired_globals(action.round, keep, state.best_global_round, best_before)
        if expired:
            self._retention.submit(
                # Only once the state that no longer needs them is saved (and journaled):
                # a failed pass leaves a state that may still name them (the old best).
                self._after_pass(state.experiment_id, self._delete_globals, saved_only=True),
                state.experiment_id,
                expired,
                f"keep_rounds {keep} at round {action.round}",
            )
        with self._folds_lock:
            self._folds.pop(state.experiment_id, None)
            if res.encoded is not None and state.phase == Phase.TRAIN:
                self._published[state.experiment_id] = (result_ref, res.encoded)
                if self._folds_on_arrival(state):  # next round's, built while sites train
                    self._folds[state.experiment_id] = self._fold_builder.submit(
                        self._after_pass(state.experiment_id, RoundFold),
                        self.store,
                        result_ref,
                        state.options.strategy.exact_architecture,
                        res.encoded,
                    )
            else:
                self._published.pop(state.experiment_id, None)
        for r in reports:  # the cache holds one round at a time
            self.store.evict(r.artifact)
        if previous is not None and previous != result_ref:
            self.store.evict(previous)

    def _delete_globals(self, experiment_id: str, rounds: list[int], reason: str) -> None:
        """Retention: globals that left the window of kept rounds (a failure is logged:
        the object stays, the end-of-training sweep deletes it)."""
        try:
            for r in rounds:
                self.store.delete(self.global_bucket, global_weights_key(experiment_id, r), reason)
        except Exception:  # noqa: BLE001 - storage left behind must never stop training
            log.exception("deleting expired globals %s of %s failed", rounds, experiment_id)

    def _sweep_globals(self, state: sm.ExperimentState) -> None:
        """Retention at the end: what a restarted coordinator left behind (one LIST)."""
        keep = state.options.kept_rounds
        if keep is None:
            return
        exp = state.experiment_id
        try:
            keys = self.store.list_keys(self.global_bucket, folder_prefix(exp, Phase.TRAIN))
        except Exception:  # noqa: BLE001 - as in _delete_globals
            log.exception("listing the globals of %s failed", exp)
            return
        stored = rounds_of(keys, partial(global_weights_key, exp))
        expired = stale_at_end(stored, state.rounds_closed, keep, state.best_global_round)
        self._delete_globals(exp, expired, f"keep_rounds {keep} at the end")

    def _aggregate_once(
        self, state: sm.ExperimentState, reports: list[SiteReport], key: str
    ) -> AggregationResult:
        """Aggregate the round, or reuse the global object another coordinator wrote.

        The global object of a round is write-once (a conditional PUT): whoever writes it
        first defines the round, so the round is aggregated exactly once even with two
        coordinators. No stat first (it sat on the round's critical path): only after a
        coordinator died between its PUT and its state save is the object there, and then
        this write fails over to the stored one.
        """
        try:
            result = aggregate_round(
                self.store,
                reports,
                self.global_bucket,
                key,
                state.global_weights,
                cases=state.declared_cases,
                max_site_weight=state.options.max_site_weight,
                exact_architecture=state.options.strategy.exact_architecture,
                aggregation=state.options.aggregation,
                min_participants=min(state.quorum, len(reports)) or 1,
                # Round 1's previous global may be a pretrained model of another
                # task (another head): the sites' architecture decides, not it.
                previous_defines_model=state.round > 1,
                fold=self._round_fold(state),
                previous_encoded=self._kept_global(state.experiment_id, state.global_weights),
            )
            if result.global_weights is not None:
                return result
        except IntegrityError:  # the round's global is stored already
            existing = self.store.stat(self.global_bucket, key)
            if existing is None:
                raise
        else:  # too few acceptable updates now, yet a global stored by one that died
            existing = self.store.stat(self.global_bucket, key)
            if existing is None:
                return result
        _, _, meta = read_file_header(self.store.get_file(existing))
        participants = [p for p in meta.get("participants", "").split(",") if p]
        participants = participants or [r.site_id for r in reports]
        # The weights are not in the global's header (every site reads it, and they
        # would tell each site the others' case counts): the same pure function again.
        reported = {r.site_id: r.num_cases for r in reports}
        declared = {p: state.declared_cases.get(p, reported.get(p, 0)) for p in participants}
        try:
            weights = capped_weights(declared, state.options.max_site_weight)
        except ValueError:
            weights = {}
        return AggregationResult(existing, participants, weights=weights)

    def _write_final(self, state: sm.ExperimentState) -> None:
        if state.global_weights is None:
            return
        history = self.redis.history(state.experiment_id, 0, state.rounds_closed)
        summary = {
            "experiment_id": state.experiment_id,
            "global_weights": state.global_weights.model_dump(),
            "final_metrics": state.final_metrics,
            "final_missing": state.final_missing,
            "final_global_eval": state.final_global_eval,
            "final_global_dice": state.final_global_dice,
            "best_global": state.best_global.model_dump() if state.best_global else None,
            "best_global_round": state.best_global_round,
            "best_global_dice_ema": state.best_global_dice_ema,
            "rounds": [r.model_dump() for r in history],
        }
        key = final_summary_key(state.experiment_id)
        self._put_once_json(self.private_bucket, key, summary, kind="final_summary")

    def _maybe_plot(self, state: sm.ExperimentState, now: float) -> None:
        if not self.render_plots or not state.rounds_closed:
            return
        terminal = state.phase in sm.TERMINAL
        what = (state.rounds_closed, terminal)
        last_what, last_at = self._last_plot.get(state.experiment_id, ((0, False), -1e18))
        if what == last_what or (not terminal and now - last_at < self.plot_every_s):
            return
        self._last_plot[state.experiment_id] = (what, now)
        self._plots.submit(self._store_plot, state.model_copy(deep=True))

    def _store_plot(self, state: sm.ExperimentState) -> None:
        try:
            from fednnunet.coordinator.plots import render_png

            exp = state.experiment_id
            # The plot thread keeps the records it read and asks Redis for new rounds only.
            known = self._plot_history.setdefault(exp, [])
            known += self.redis.history(exp, len(known), state.rounds_closed)
            state.history = known[: state.rounds_closed]
            if state.phase in sm.TERMINAL:
                self._plot_history.pop(exp, None)
            key = plot_key(exp, state.rounds_closed)
            if self.store.stat(self.private_bucket, key) is None:
                self.store.put_bytes(self.private_bucket, key, render_png(state), kind="plot")
        except Exception:  # noqa: BLE001 - a picture must never stop training
            log.exception("rendering the progress plot failed")

    # ------------------------------------------------------------ persistence
    def _put_once_json(self, bucket: str, key: str, obj: object, kind: str) -> ArtifactRef:
        try:
            return self.store.put_json(bucket, key, obj, kind=kind)
        except IntegrityError:
            ref = self.store.stat(bucket, key)
            if ref is None:  # refused as existing, yet gone: S3 is not what we think it is
                raise
            return ref

    def _load(self, experiment_id: str) -> sm.ExperimentState | None:
        state = self.redis.load(experiment_id)
        if state is None:
            state = self._restore_from_journal(experiment_id)
        return state

    def _restore_from_journal(self, experiment_id: str) -> sm.ExperimentState | None:
        """Redis lost the experiment: its latest snapshot and every round record back.

        The only path that reads every past round (Redis must get them all again).
        """
        state = self._latest_journal(experiment_id)
        if state is None:
            return None
        _redispatch_unfinished(state)
        self.redis.save(state, records=state.history)
        state.history = []
        return state

    def _save(
        self,
        state: sm.ExperimentState,
        journal: bool,
        fence: Fence | None,
        closed_before: int | None = None,
    ) -> None:
        """Fenced: a holder that lost the lock raises LockLost before writing anything.

        The records of rounds closed in this pass go to S3 first (write-once, keyed by
        round), then with the state into Redis in one atomic, fenced step, then the
        snapshot: a snapshot never counts a round whose record is not in S3.
        """
        closed_before = state.rounds_closed if closed_before is None else closed_before
        records = self._records_to_s3(state, fence)
        new_records = [r for r in records if r.round > closed_before]
        self.redis.save(state, fence, records=new_records)
        if journal:
            if fence is not None:
                fence.check()
            self._journal(state)

    def _records_to_s3(
        self, state: sm.ExperimentState, fence: Fence | None
    ) -> list[sm.RoundRecord]:
        """Write the round records S3 does not hold yet (normally the one just closed);
        returns them as stored. The state counts how many are known written, so a
        restarted coordinator checks none of the past rounds again."""
        if state.history_in_s3 >= state.rounds_closed:
            return []
        if fence is not None:
            fence.check()
        exp = state.experiment_id
        last = state.last_round
        missing = range(state.history_in_s3 + 1, state.rounds_closed + 1)
        known = {
            r.round: r
            for r in self.redis.history(exp, state.history_in_s3, state.rounds_closed - 1)
        }
        if last is not None:
            known[last.round] = last
        stored = []
        for round_ in missing:
            record = known.get(round_)
            if record is None:
                raise FedError(f"round {round_} of {exp} has no record to journal")
            record = self._put_record(exp, record)
            if last is not None and record.round == last.round:
                state.last_round = record
            stored.append(record)
        state.history_in_s3 = state.rounds_closed
        return stored

    def _put_record(self, experiment_id: str, record: sm.RoundRecord) -> sm.RoundRecord:
        """Write-once: when an earlier pass (e.g. a coordinator killed before its Redis
        save) already stored this round's record, that one is the record."""
        key = history_key(experiment_id, record.round)
        try:
            self.store.put_json(
                self.private_bucket, key, record.model_dump(mode="json"), kind="journal"
            )
            return record
        except IntegrityError:
            ref = self.store.stat(self.private_bucket, key)
            if ref is None:
                raise
            return sm.RoundRecord.model_validate(self.store.get_json(ref))

    def _journal(self, state: sm.ExperimentState) -> None:
        """Snapshot the state to S3 (bounded: the history is one object per round).

        A snapshot stays a few KB however long the experiment runs (with the history,
        1000 rounds would mean ~1 MB per snapshot and GBs of journal).
        """
        snapshot = state.model_dump(mode="json")
        key = journal_key(state.experiment_id, state.round, state.seq, state.phase)
        self._put_once_json(self.private_bucket, key, snapshot, kind="journal")

    def _latest_journal(self, experiment_id: str) -> sm.ExperimentState | None:
        """The newest snapshot, with ``history`` filled from the S3 round records."""
        keys = self.store.list_keys(self.private_bucket, folder_prefix(experiment_id, JOURNAL))
        if not keys:
            return None
        latest = max(keys, key=lambda k: getattr(parse_artifact_key(k), "name", ""))
        ref = self.store.stat(self.private_bucket, latest)
        if ref is None:
            return None
        snapshot = self.store.get_json(ref)
        legacy_len = snapshot.pop(_HISTORY_LEN, None)  # snapshots before rounds_closed
        state = sm.ExperimentState.model_validate(snapshot)
        if legacy_len and not state.rounds_closed:
            state.rounds_closed = legacy_len
        if state.rounds_closed:
            state.history = self._journaled_history(experiment_id)[: state.rounds_closed]
            if len(state.history) != state.rounds_closed:
                raise FedError(
                    f"journal of {experiment_id} counts {state.rounds_closed} rounds but S3 "
                    f"holds {len(state.history)} round records"
                )
            state.last_round = state.history[-1]
            state.train_started_at = state.history[0].opened_at
        state.history_in_s3 = state.rounds_closed
        return state

    def _journaled_history(self, experiment_id: str) -> list[sm.RoundRecord]:
        keys = self.store.list_keys(self.private_bucket, folder_prefix(experiment_id, HISTORY))
        records = []
        for key in sorted(keys):  # r00001 < r00002 < ...
            ref = self.store.stat(self.private_bucket, key)
            if ref is not None:
                records.append(sm.RoundRecord.model_validate(self.store.get_json(ref)))
        return records

    def recover_from_journal(self) -> list[str]:
        """After Redis lost everything: restore every unfinished experiment from S3."""
        restored = []
        parsed = (parse_artifact_key(k) for k in self.store.list_keys(self.private_bucket, ""))
        prefixes = {p.experiment for p in parsed if p is not None and p.folder == JOURNAL}
        for exp in sorted(prefixes):
            try:  # one unreadable experiment must not keep the others from recovering
                if self.redis.exists(exp):
                    continue
                state = self._latest_journal(exp)
            except Exception:  # noqa: BLE001
                log.exception("cannot restore %s from the journal", exp)
                continue
            if state is not None:
                _redispatch_unfinished(state)
                self.redis.save(state, records=state.history)
                restored.append(exp)
                log.warning(
                    "restored experiment %s from the S3 journal (%s, round %s)",
                    exp,
                    state.phase,
                    state.round,
                )
        return restored


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return (text if isinstance(exc, FedError) else f"{type(exc).__name__}: {text}")[:300]


def _redispatch_unfinished(state: sm.ExperimentState) -> None:
    """Reports received after the journal entry are lost with Redis: ask again.

    Sites answer a repeated task from the artifact they already uploaded.
    """
    for st in state.sites_status.values():
        if st.state in ("queued", "running", "failed"):
            st.state, st.attempt = "pending", 0
