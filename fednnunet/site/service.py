"""What a site does for each phase: nnU-Net locally, artifacts to its own bucket.

Every handler first looks for the artifact it would produce: if it exists (a
redelivered or re-dispatched task), it reports that artifact again instead of
redoing the work. Inputs from S3 are verified by sha256 before use; weights
arrive as safetensors, never pickles.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from fednnunet.adapters.s3_store import ArtifactStore, sha256_bytes
from fednnunet.adapters.weights_codec import decode_weights, encode_weights_sha256
from fednnunet.background import low_priority_pool
from fednnunet.core.retention import expired_update_round, stale_at_end
from fednnunet.errors import DatasetError, FedError, IntegrityError, PolicyRefusal
from fednnunet.keys import (
    GLOBAL_SITE,
    async_closed_key,
    folder_prefix,
    global_bucket,
    parse_artifact_key,
    rounds_of,
    site_artifact_key,
    site_bucket,
    site_report_key,
    site_update_key,
)
from fednnunet.messages import ArtifactRef, ExperimentOptions, SiteReport, SiteTask
from fednnunet.nnunet.backend import NnunetBackend, load_backend
from fednnunet.phases import Phase
from fednnunet.settings import Settings
from fednnunet.site.policy import load_policy

log = logging.getLogger(__name__)

# Per-class scores go into a report only up to this many classes (a report carries at
# most MAX_METRICS numbers); the mean is always there.
MAX_CLASS_METRICS = 16
# Fine-tuning starts at this fraction of the trainer's initial learning rate.
FINETUNE_LR_SCALE = 0.1
FINETUNED_SUFFIX = "_finetuned"


# A loaded global's background work: (its reference, its hash check, the cache record).
_GlobalCheck = tuple[ArtifactRef, "Future[bool] | None", "Future[None] | None"]


class SiteService:
    def __init__(
        self,
        settings: Settings,
        store: ArtifactStore,
        progress: Any | None = None,
        backend: NnunetBackend | None = None,
    ) -> None:
        if settings.site_id is None or settings.dataset_id is None:
            raise FedError(
                "a site needs FEDNNUNET_SITE_ID and FEDNNUNET_DATASET_ID (or --site/--dataset-id)"
            )
        self.settings = settings
        self.site_id = settings.site_id
        self.dataset_id = settings.dataset_id
        self.store = store
        self.progress = progress
        self.bucket = site_bucket(settings.bucket_prefix, self.site_id)
        self.global_bucket = global_bucket(settings.bucket_prefix)
        self._sessions: dict[str, Any] = {}
        self._defer_writes = False
        self._deferred: list[Callable[[], None]] = []
        self._deferred_pool = low_priority_pool("site-deferred")
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="global-read")
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round-check")
        # The global last loaded (experiment, reference, bytes, verified yet), then the
        # background work it sets off once training runs: its hash (nothing trained from
        # it leaves before that passes) and the cache's record of it.
        self._loaded: tuple[str, ArtifactRef, bytearray, bool] | None = None
        self._global_check: _GlobalCheck | None = None
        self.backend = backend or load_backend(settings)
        self.policy = load_policy(settings.site_policy)
        if self.policy.max_upload_bytes is not None:
            store.max_object_bytes = min(store.max_object_bytes, self.policy.max_upload_bytes)

    # ------------------------------------------------------------------ entry
    def handle(self, task: SiteTask, defer_writes: bool = False) -> SiteReport:
        """Run one task; never raises for a task-level failure (it is reported).

        ``defer_writes``: local writes the report need not wait for (a round's resume
        checkpoint and record) are left for :meth:`run_deferred`, which the worker calls
        once the report is sent: they overlap with the coordinator's aggregation instead
        of competing with the upload. A redelivered task finds the uploaded update and
        reports it without them."""
        self.run_deferred()  # a task never starts before the previous one's writes
        self._defer_writes = defer_writes
        t0 = time.perf_counter()
        if task.site_id != self.site_id:
            return self._fail(task, f"task for site {task.site_id} reached site {self.site_id}", t0)
        refusal = self.policy.refusal(task)
        if refusal is not None:
            log.error("refused %s of %s: %s", task.phase, task.experiment_id, refusal)
            return self._fail(task, f"refused by site policy: {refusal}", t0, retryable=False)
        if self.progress is not None:
            self.progress.begin(task.experiment_id, task.phase, task.round)
        try:
            handler = {
                Phase.FINGERPRINT: self.extract_fingerprint,
                Phase.PLAN: self.plan_and_preprocess,
                Phase.TRAIN: self.train_round,
                Phase.EVALUATE: self.evaluate_global,
                Phase.VALIDATE: self.validate,
            }[task.phase]
            report = handler(task)
            report.seconds = time.perf_counter() - t0
            return report
        except (DatasetError, PolicyRefusal) as exc:
            log.error("%s failed: %s", task.phase, exc)
            return self._fail(task, str(exc), t0, retryable=False)
        except FedError as exc:
            log.error("%s failed: %s", task.phase, exc)
            return self._fail(task, str(exc), t0)
        except Exception as exc:  # noqa: BLE001 - report, do not crash the worker
            log.exception("%s failed", task.phase)
            return self._fail(task, f"{type(exc).__name__}: {exc}", t0)
        finally:
            if self.progress is not None:
                self.progress.end()

    def run_deferred(self) -> None:
        """The writes :meth:`handle` deferred, in order, on a low-priority thread (they
        yield the CPU to the aggregation and the downloads this site's report set off;
        this call waits for them). A failure is logged: the report stands (its update
        is in S3), the next round resumes from an older checkpoint."""
        while self._deferred:
            job = self._deferred.pop(0)
            try:
                self._deferred_pool.submit(job).result()
            except Exception:  # noqa: BLE001 - the round's result is already uploaded
                log.exception("deferred write failed")

    def _fail(self, task: SiteTask, error: str, t0: float, retryable: bool = True) -> SiteReport:
        """The failure report: its text names no case, file or path (the log keeps those)."""
        from fednnunet.core.redaction import redact_error
        from fednnunet.nnunet.fingerprint import local_case_identifiers

        error = redact_error(error, local_case_identifiers(self.dataset_id))
        return self._report(
            task,
            ok=False,
            error=error[:2000],
            retryable=retryable,
            seconds=time.perf_counter() - t0,
        )

    def _report(self, task: SiteTask, ok: bool = True, **fields: Any) -> SiteReport:
        return SiteReport(
            experiment_id=task.experiment_id,
            site_id=self.site_id,
            phase=task.phase,
            round=task.round,
            attempt=task.attempt,
            ok=ok,
            base_version=task.base_version if task.phase == Phase.TRAIN else None,
            **fields,
        )

    def _artifact_key(self, task: SiteTask) -> str:
        """The one key this task's report may reference (its phase's artifact)."""
        key = site_artifact_key(task.experiment_id, task.phase, task.round, self.site_id)
        if key is None:
            raise FedError(f"a {task.phase} task has no artifact")
        return key

    def _report_key(self, task: SiteTask) -> str:
        return site_report_key(task.experiment_id, task.phase, task.round, self.site_id)

    def _existing_meta(self, task: SiteTask) -> dict | None:
        ref = self.store.stat(self.bucket, self._report_key(task))
        return self.store.get_json(ref) if ref else None

    def _save_meta(self, task: SiteTask, meta: dict) -> None:
        self.store.put_json(self.bucket, self._report_key(task), meta, kind=f"{task.phase}_report")

    # ------------------------------------------------------------------ phases
    def extract_fingerprint(self, task: SiteTask) -> SiteReport:
        key = self._artifact_key(task)
        ref = self.store.stat(self.bucket, key)
        if ref is None:
            summary = self.backend.fingerprint(self.dataset_id)
            ref = self.store.put_json(self.bucket, key, summary, kind="fingerprint_summary")
        return self._report(task, artifact=ref)

    def plan_and_preprocess(self, task: SiteTask) -> SiteReport:
        opts = task.options
        fingerprint = None
        if opts.strategy.federated_fingerprint:
            if task.merged_fingerprint is None:
                raise FedError(f"{opts.method} planning needs the merged fingerprint")
            fingerprint = self.store.get_json(task.merged_fingerprint)
        planned = self.backend.plan(self.dataset_id, opts, fingerprint)
        ref = self.store.put_json(
            self.bucket, self._artifact_key(task), planned.plans, kind="plans"
        )
        # num_cases: the site's FedAvg weight for the whole experiment, declared once here.
        return self._report(
            task, artifact=ref, plans_sha256=planned.plans_sha256, num_cases=planned.num_cases
        )

    def _session(self, task: SiteTask) -> Any:
        session = self._sessions.get(task.experiment_id)
        if session is None:
            session = self._new_session(task, task.options)
            self._sessions[task.experiment_id] = session
        return session

    def _new_session(self, task: SiteTask, options: ExperimentOptions, **more: Any) -> Any:
        return self.backend.session(self.dataset_id, options, task.experiment_id, **more)

    def _round_closed(self, task: SiteTask) -> bool:
        """True when the coordinator already aggregated this round (the task is stale):
        a global of this round or a later one exists (one LIST: with ``keep_rounds`` this
        round's own global may be deleted since); async: when the train phase has ended."""
        exp = task.experiment_id
        if task.options.mode == "async":
            return self.store.stat(self.global_bucket, async_closed_key(exp)) is not None
        # After everything of the previous round: SeaweedFS skips a whole folder whose
        # own name is the marker ("…/r00005" would skip round 5's objects).
        after = folder_prefix(exp, Phase.TRAIN, task.round - 1) + "~"
        key = self.store.first_key_after(self.global_bucket, folder_prefix(exp, Phase.TRAIN), after)
        parts = parse_artifact_key(key) if key is not None else None
        return parts is not None and parts.site == GLOBAL_SITE and parts.round >= task.round

    def _load_global(
        self,
        task: SiteTask,
        session: Any,
        prefetched: Future[tuple[bytearray, bool]] | None = None,
        verify_now: bool = True,
    ) -> int:
        """Load the task's global into the session. Bytes fresh from S3 are hashed while
        the session trains (:meth:`_verify_global_later`, :meth:`_confirm_global`);
        ``verify_now``: before this returns (the caller reports what it computes)."""
        tensors = self._global_tensors(task, task.global_weights, prefetched)
        loaded = 0 if tensors is None else len(session.load_global(tensors))
        if verify_now:
            self._verify_global_later()
            self._confirm_global(task)
        return loaded

    def _read_global(self, ref: ArtifactRef) -> tuple[bytearray, bool]:
        """The task's global and whether it is verified yet: the verified copy in the
        cache (a redelivered task, a restarted worker: one per experiment), else the
        bytes from S3, hashed later by :meth:`_verify_global_later`."""
        if (data := self.store.get_cached(ref)) is not None:  # None without a cache
            return data, True
        return self.store.read_unverified(ref), False

    def _prefetch_global(self, task: SiteTask) -> Future[tuple[bytearray, bool]] | None:
        """Start reading the task's global now: the checks before it (is this round's
        update uploaded already, is the round closed) overlap its download instead of
        preceding it. A task that turns out to need no global drops it."""
        if task.global_weights is None:
            return None
        return self._prefetcher.submit(self._read_global, task.global_weights)

    def _global_tensors(
        self,
        task: SiteTask,
        ref: ArtifactRef | None,
        prefetched: Future[tuple[bytearray, bool]] | None = None,
    ) -> dict | None:
        if ref is None:
            return None
        if ref != task.global_weights:
            return decode_weights(self.store.get_bytes(ref))
        data, verified = prefetched.result() if prefetched is not None else self._read_global(ref)
        self._loaded = (task.experiment_id, ref, data, verified)
        self._global_check = None
        return decode_weights(data)

    def _verify_global_later(self) -> None:
        """On low-priority threads: hash the global just loaded (verified, it is copied
        to the cache) and make it the experiment's cached global (the previous one is
        deleted). Called once training runs: the other sites may still be downloading
        the same global, and this site's training need not wait for either."""
        if self._loaded is None:
            return
        experiment_id, ref, data, verified = self._loaded
        self._loaded = None
        cached = self.store.cache_dir is not None
        check = None if verified else self.store.verify_later(ref, data, cache=cached)
        recorded = None
        if cached:
            recorded = self._deferred_pool.submit(self._remember_cached_global, experiment_id, ref)
        self._global_check = (ref, check, recorded)

    def _confirm_global(self, task: SiteTask) -> None:
        """Raise unless the global this task loaded is the one the coordinator published.
        The session holds weights trained from the wrong bytes then: it is dropped, and
        the next attempt resumes from this site's last checkpoint."""
        pending, self._global_check = self._global_check, None
        if pending is None:
            return
        ref, check, recorded = pending
        if recorded is not None:
            recorded.result()
        if check is not None and not check.result():
            session = self._sessions.pop(task.experiment_id, None)
            if session is not None:
                session.close()
            raise IntegrityError(
                f"global s3://{ref.bucket}/{ref.key} failed verification (not the bytes of "
                f"sha256 {ref.sha256[:12]}…): nothing trained from it was sent"
            )

    def _score_global(
        self, task: SiteTask, session: Any, global_round: int, full: bool = True
    ) -> dict:
        """Federated evaluation of the global just loaded, on this site's validation cases:
        nnU-Net's pseudo-Dice every round, its full validation every ``eval_every`` rounds
        (``full=False``: the validate phase runs it anyway)."""
        t0 = time.perf_counter()
        scores = _class_bounded(session.evaluate_pseudo_dice(), "pseudo_dice")
        out = {f"global_{k}": v for k, v in scores.items()}
        every = task.options.eval_every
        if full and every and global_round >= 1 and global_round % every == 0:
            folder = f"fednnunet_global_eval/round_{global_round:05d}"
            validation = session.validate_current(folder)
            out["global_dice"] = validation["mean_dice"]
            per_class = {f"dice_{k}": v for k, v in validation["dice_per_class"].items()}
            out |= {f"global_{k}": v for k, v in _class_bounded(per_class, "dice").items()}
        out["global_eval_s"] = time.perf_counter() - t0
        return out

    def evaluate_global(self, task: SiteTask) -> SiteReport:
        """The last global, scored like every round's incoming global (best-model rule)."""
        meta = self._existing_meta(task)
        if meta is None:
            session = self._session(task)
            self._load_global(task, session)
            last_round = task.options.rounds
            meta = {
                "metrics": self._score_global(task, session, last_round, full=False),
                "num_cases": session.num_training_cases(),
            }
            self._save_meta(task, meta)
        return self._report(task, metrics=meta["metrics"], num_cases=meta["num_cases"])

    def _remember_cached_global(self, experiment_id: str, ref: ArtifactRef | None) -> None:
        """Keep one cached global per experiment; the record survives a worker restart."""
        if self.store.cache_dir is None:
            return
        marker = self.store.cache_dir / f".global-{sha256_bytes(experiment_id.encode())[:16]}"
        try:
            previous = ArtifactRef.model_validate_json(marker.read_text())
        except (OSError, ValueError):
            previous = None
        if previous is not None and (ref is None or previous.sha256 != ref.sha256):
            self.store.evict(previous)
        if ref is None:
            marker.unlink(missing_ok=True)
        else:  # the cache folder may not exist yet: the global's copy is written later
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(ref.model_dump_json())

    def train_round(self, task: SiteTask) -> SiteReport:
        update_key = self._artifact_key(task)
        prefetched = self._prefetch_global(task)
        # Both checks at once, beside the global's download: in a row, the two HEADs
        # took 40 ms while three sites downloaded (25 ms at once).
        closed = self._checker.submit(self._round_closed, task)
        existing = self.store.stat(self.bucket, update_key)
        if existing is not None:
            # The uploaded update is the round's result at this site, even if the local
            # checkpoint (written concurrently) did not finish: report it, never retrain.
            meta = self._existing_meta(task)
            if meta is None:
                session = self._session(task)
                meta = {
                    "num_cases": session.num_training_cases(),
                    "metrics": self._read_local_metrics(session, task.round),
                }
                self._save_meta(task, meta)
            return self._report(
                task, artifact=existing, num_cases=meta["num_cases"], metrics=meta["metrics"]
            )
        if closed.result():
            raise FedError(f"round {task.round} is already closed; stale task skipped")
        session = self._session(task)
        opts = task.options
        done = session.last_completed_round()
        if opts.mode == "sync" and done > task.round:
            # Its update is gone (deleted when it left the kept rounds): never send a later
            # round's weights under this round's name.
            raise PolicyRefusal(
                f"round {task.round} is behind this site's last completed round {done}: stale "
                "task skipped (a new experiment needs a new id or an empty results folder)"
            )
        if task.plans_sha256 is not None:
            self._check_plans(task, session)
        trained = done < task.round
        if trained:
            t_pull = time.perf_counter()
            loaded = self._load_global(task, session, prefetched, verify_now=False)
            pulled = time.perf_counter()
            evaluation = self._score_global(task, session, task.round - 1)
            self._verify_global_later()  # the other sites may be downloading it still
            t_train = time.perf_counter()
            on_iteration = self._on_iteration
            extra: dict[str, Any] = {}
            if opts.mode == "async":
                on_iteration = self._abandon_when_closed(task)
                # nnU-Net's poly LR follows the federation's progress, not this site's.
                extra["lr_progress"] = task.progress or 0.0
            metrics = session.train_epochs(opts.local_epochs, on_iteration=on_iteration, **extra)
            self._confirm_global(task)  # before anything trained from it leaves
            # Local training time alone: the federation's overhead is the rest of the round.
            metrics["train_s"] = time.perf_counter() - t_train
            slowdown = opts.simulate_slowdown.get(self.site_id, self.settings.slowdown)
            if slowdown > 1:
                self._simulate_slowdown(task, slowdown, metrics["train_s"])
                metrics["slowdown_s"] = time.perf_counter() - t_train - metrics["train_s"]
            metrics["pull_s"] = pulled - t_pull
            metrics["layers_loaded"] = float(loaded)
            metrics |= evaluation
            self._write_local_metrics(session, task.round, metrics)
        else:
            metrics = self._read_local_metrics(session, task.round)
        t_push = time.perf_counter()
        # A snapshot: the checkpoint may run now. Hashed while it is built.
        data, sha = encode_weights_sha256(session.state_dict())
        meta = {"num_cases": session.num_training_cases(), "metrics": metrics}
        upload = partial(
            self.store.put_bytes, self.bucket, update_key, data, kind="weights_update", sha256=sha
        )

        # The resume checkpoint, then the report's record, are written after the report
        # is sent (worker) or while the update uploads: off the round's critical path.
        # The record comes after the checkpoint: a redelivered task that finds it also
        # finds the checkpoint, so it never retrains into a different record.
        def checkpoint_then_record() -> None:
            session.save_round_checkpoint(task.round)
            self._save_meta(task, meta)

        if not trained:
            ref = upload()
            self._save_meta(task, meta)
        elif self._defer_writes:
            ref = upload()
            self._deferred.append(checkpoint_then_record)
        else:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") as pool:
                saved = pool.submit(checkpoint_then_record)
                ref = upload()
                saved.result()
        self._after_report(partial(self._expire_update, task))
        # Timing of this delivery only: not in the stored meta, which must not change
        # when a redelivered task writes it again.
        metrics = {**metrics, "push_s": time.perf_counter() - t_push}
        if self.progress is not None:
            self.progress.progress(bytes_sent=len(data), metrics=metrics)
        return self._report(task, artifact=ref, num_cases=meta["num_cases"], metrics=metrics)

    def _after_report(self, job: Callable[[], None]) -> None:
        """Work the report need not wait for: after it is sent (worker), else now."""
        if self._defer_writes:
            self._deferred.append(job)
        else:
            job()

    def _kept_rounds(self, task: SiteTask) -> int | None:
        """The spec's window of kept rounds, unless this site's policy keeps its own."""
        return None if self.policy.keep_own_updates else task.options.kept_rounds

    def _expire_update(self, task: SiteTask) -> None:
        """Retention (core/retention.py): this site's update that just left the window of
        kept rounds. Only ever this site's own update of a round at least 2 back."""
        keep = self._kept_rounds(task)
        expired = expired_update_round(task.round, keep)
        if expired is None:
            return
        key = site_update_key(task.experiment_id, expired, self.site_id)
        try:
            if self.store.stat(self.bucket, key) is not None:  # absent that round: no log line
                self.store.delete(self.bucket, key, f"keep_rounds {keep} at round {task.round}")
        except Exception:  # noqa: BLE001 - the round's report stands; the end sweep retries
            log.exception("deleting %s (retention) failed", key)

    def _sweep_updates(self, task: SiteTask) -> None:
        """Retention at the end: the updates left behind by rounds this site missed."""
        keep = self._kept_rounds(task)
        if keep is None:
            return
        prefix = folder_prefix(task.experiment_id, Phase.TRAIN)
        own = partial(site_update_key, task.experiment_id, site=self.site_id)
        try:
            updates = rounds_of(self.store.list_keys(self.bucket, prefix), own)
            for r in stale_at_end(updates, task.options.rounds, keep):
                self.store.delete(self.bucket, updates[r], f"keep_rounds {keep} at the end")
        except Exception:  # noqa: BLE001 - as in _expire_update
            log.exception("the retention sweep of %s failed", prefix)

    def _simulate_slowdown(self, task: SiteTask, factor: float, train_s: float) -> None:
        """Simulation only: make this epoch take ``factor`` times its training time."""
        until = time.monotonic() + (factor - 1) * train_s
        check = self._abandon_when_closed(task) if task.options.mode == "async" else None
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))
            if check is not None:
                check(-1, 0, 0)

    def _abandon_when_closed(self, task: SiteTask) -> Any:
        """An iteration callback that also stops the epoch once the async phase closed
        (looked up at most every 5 s: one S3 stat)."""
        last = [time.monotonic()]

        def on_iteration(epoch: int, iteration: int, of_iterations: int) -> None:
            if epoch >= 0:
                self._on_iteration(epoch, iteration, of_iterations)
            if time.monotonic() - last[0] >= 5.0:
                last[0] = time.monotonic()
                if self._round_closed(task):
                    raise PolicyRefusal("the asynchronous training has ended; epoch abandoned")

        return on_iteration

    def _check_plans(self, task: SiteTask, session: Any) -> None:
        digest = self.backend.plans_sha256(session.plans)
        if digest != task.plans_sha256:
            raise FedError(
                f"local plans {digest[:12]} differ from the federation's "
                f"{task.plans_sha256[:12]}; refusing to train"
            )

    def _on_iteration(self, epoch: int, iteration: int, of_iterations: int) -> None:
        if self.progress is not None:
            self.progress.progress(epoch=epoch, iteration=iteration, of_iterations=of_iterations)

    @staticmethod
    def _metrics_path(session: Any, round_: int) -> Path:
        return Path(session.output_folder) / "fednnunet_rounds" / f"round_{round_:05d}.json"

    def _write_local_metrics(self, session: Any, round_: int, metrics: dict) -> None:
        path = self._metrics_path(session, round_)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics))

    def _read_local_metrics(self, session: Any, round_: int) -> dict:
        path = self._metrics_path(session, round_)
        return json.loads(path.read_text()) if path.exists() else {}

    def validate(self, task: SiteTask) -> SiteReport:
        meta = self._existing_meta(task)
        if meta is not None:
            return self._report(task, metrics=meta["metrics"], num_cases=meta["num_cases"])
        session = self._session(task)
        if not session.finished:
            self._load_global(task, session)
        result = session.finish(run_validation=True)
        metrics = _dice_metrics(result)
        best = self._global_tensors(task, task.best_weights)
        if best is not None:
            session.write_best_checkpoint(best, task.best_dice_ema)
            del best
        local = local_baseline_dice(self.settings.local_baseline)
        if local is not None:
            metrics["local_mean_dice"] = local
        num_cases = session.num_training_cases()
        session.close()
        self._sessions.pop(task.experiment_id, None)
        if task.options.finetune_epochs:
            metrics |= {f"finetuned_{k}": v for k, v in self._finetune(task).items()}
        meta = {
            "metrics": metrics,
            "num_cases": num_cases,
            "results_folder": str(result.get("results_folder", "")),
        }
        self._save_meta(task, meta)
        self._remember_cached_global(task.experiment_id, None)
        self._after_report(partial(self._sweep_updates, task))
        return self._report(task, metrics=metrics, num_cases=meta["num_cases"])

    def _finetune(self, task: SiteTask) -> dict[str, float]:
        """Personalization: ``finetune_epochs`` local epochs from the final global at a low
        learning rate, into the trainer folder ``<trainer>_finetuned`` (the federated
        model's folder is not touched); returns its validation Dice."""
        opts = task.options
        # nnU-Net's schedule spans rounds * local_epochs epochs: here finetune_epochs.
        schedule = opts.model_copy(update={"rounds": opts.finetune_epochs, "local_epochs": 1})
        tuned = self._new_session(
            task,
            schedule,
            trainer_folder=opts.trainer + FINETUNED_SUFFIX,
            lr_scale=FINETUNE_LR_SCALE,
        )
        try:
            if not tuned.finished:  # else: a redelivered task, the tuned model is there
                self._load_global(task, tuned)
                tuned.train_epochs(opts.finetune_epochs, on_iteration=self._on_iteration)
            return _dice_metrics(tuned.finish(run_validation=True))
        finally:
            tuned.close()


def _class_bounded(scores: dict[str, float], prefix: str) -> dict[str, float]:
    """``scores`` without its per-class ``<prefix>_<class>`` entries when there are more
    than MAX_CLASS_METRICS classes (a report's size is bounded; the mean stays)."""
    per_class = [k for k in scores if k.startswith(prefix + "_")]
    if len(per_class) <= MAX_CLASS_METRICS:
        return scores
    return {k: v for k, v in scores.items() if k not in per_class}


def _dice_metrics(result: dict) -> dict[str, float]:
    """Mean and per-class Dice of nnU-Net's final validation (NaN: see missing_metrics)."""
    metrics = {"mean_dice": float(result.get("mean_dice", float("nan")))}
    per_class = {f"dice_{k}": float(v) for k, v in (result.get("dice_per_class") or {}).items()}
    return metrics | _class_bounded(per_class, "dice")


def local_baseline_dice(path: str | None) -> float | None:
    """Mean foreground Dice of the site's local-only nnU-Net run, if one is configured."""
    if not path:
        return None
    summary = Path(path)
    if summary.is_dir():
        summary = summary / "validation" / "summary.json"
    if not summary.is_file():
        log.warning("local baseline %s has no validation/summary.json", path)
        return None
    try:
        return float(json.loads(summary.read_text())["foreground_mean"]["Dice"])
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("local baseline %s unreadable: %s", summary, exc)
        return None
