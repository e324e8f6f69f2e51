"""Run nnU-Net's per-case process pools in the calling process, for small datasets.

nnU-Net's integrity check, fingerprint extractor and preprocessor always start a
``spawn`` pool; each worker imports nnunetv2 and torch again (about 2 CPU-s and
300 MB each). Listing a raw dataset's files forks a 12-process pool, four times
per planning run (measured: 48 forks, 1.3 s, from a 1.5 GB worker that also runs
broker threads). A site worker already has everything imported, and a site with
a few dozen cases finishes them in less time than one worker takes to start;
three simulated sites on a 2-core machine start dozens. Below a size threshold
the work runs inline instead: same nnU-Net functions, same outputs, no processes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# Fewer cases than this: inline. Measured here: a spawned worker costs ~2 CPU-s to
# start, a 2d demo case ~0.05-0.3 s to check, fingerprint or preprocess.
POOL_MIN_CASES = 16

# (module, attribute): the ``multiprocessing`` module or the ``Pool`` class it uses.
_PATCHED = (
    ("nnunetv2.experiment_planning.verify_dataset_integrity", "multiprocessing"),
    ("nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor", "multiprocessing"),
    ("nnunetv2.preprocessing.preprocessors.default_preprocessor", "multiprocessing"),
    ("nnunetv2.utilities.utils", "Pool"),
)
_patch_lock = threading.Lock()


class _Finished:
    """The part of ``multiprocessing.pool.AsyncResult`` that nnU-Net uses."""

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error

    def ready(self) -> bool:
        return True

    def get(self, timeout: float | None = None) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


class _Alive:
    @staticmethod
    def is_alive() -> bool:
        return True


class InlinePool:
    """A ``multiprocessing.Pool`` look-alike that runs every call immediately, here."""

    def __init__(self, processes: int | None = None, *args: Any, **kwargs: Any) -> None:
        self._pool = [_Alive()]  # nnU-Net polls its workers' liveness

    def __enter__(self) -> InlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def starmap(self, fn: Callable, iterable: Iterable[tuple]) -> list:
        return [fn(*args) for args in iterable]

    def map(self, fn: Callable, iterable: Iterable) -> list:
        return [fn(arg) for arg in iterable]

    def starmap_async(self, fn: Callable, iterable: Iterable[tuple]) -> _Finished:
        try:
            return _Finished(self.starmap(fn, iterable))
        except Exception as exc:  # noqa: BLE001 - re-raised by get(), as a pool does
            return _Finished(error=exc)


class _InlineContext:
    Pool = InlinePool


class _MultiprocessingInline:
    """Stands in for the ``multiprocessing`` module inside the patched nnU-Net modules."""

    def get_context(self, method: str | None = None) -> _InlineContext:
        return _InlineContext()

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


@contextlib.contextmanager
def inline_pools(enabled: bool = True) -> Iterator[None]:
    """Within the block, nnU-Net's planning and preprocessing pools run in this process."""
    if not enabled:
        yield
        return
    import importlib

    with _patch_lock:
        targets = [(importlib.import_module(name), attr) for name, attr in _PATCHED]
        saved = [getattr(m, attr) for m, attr in targets]
        try:
            for m, attr in targets:
                setattr(
                    m, attr, _MultiprocessingInline() if attr == "multiprocessing" else InlinePool
                )
            yield
        finally:
            for (m, attr), original in zip(targets, saved, strict=True):
                setattr(m, attr, original)


def import_nnunet() -> None:
    """Import what a site's phases use, so that a long-lived worker pays it at start-up."""
    import importlib

    for name, _ in _PATCHED:
        importlib.import_module(name)
    for name in (
        "nnunetv2.preprocessing.cropping.cropping",
        "nnunetv2.imageio.reader_writer_registry",
        "nnunetv2.experiment_planning.plan_and_preprocess_api",
        "nnunetv2.experiment_planning.experiment_planners.default_experiment_planner",
        "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
        "nnunetv2.inference.predict_from_raw_data",
    ):
        importlib.import_module(name)
