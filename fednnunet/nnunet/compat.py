"""Every reach into nnU-Net's internals, in one place, each with a check that names it.

nnU-Net's stable interface is its command line; fednnunet drives a trainer epoch by
epoch, runs its per-case pools inline and points it at other folders, which relies on
how nnunetv2 2.8 is built inside. Each such reliance is a function here plus an entry
in :data:`INTERNALS`, whose check fails naming the internal when an nnunetv2 upgrade
changes it (``tests/nnunet/test_compat.py`` runs them all; ``fednnunet doctor`` too).
nnunetv2 versions outside :data:`TESTED_NNUNET` are refused before anything runs.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import multiprocessing
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from fednnunet.errors import FedError

# The nnunetv2 releases whose internals the checks below were written against.
TESTED_NNUNET = ((2, 8),)


class UnsupportedNnunet(FedError):
    """The installed nnunetv2 is not one whose internals fednnunet was tested with."""


def check_nnunet_version(version: str) -> None:
    """Refuse an nnunetv2 version outside :data:`TESTED_NNUNET` (one-line error)."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers not in TESTED_NNUNET:
        tested = ", ".join(f"{a}.{b}.x" for a, b in TESTED_NNUNET)
        raise UnsupportedNnunet(
            f"nnunetv2 {version} is not supported: fednnunet relies on nnunetv2 internals "
            f"tested with {tested} only (see fednnunet/nnunet/compat.py)"
        )


@cache
def require_tested_nnunet() -> str:
    """The installed nnunetv2 version, once checked (raises UnsupportedNnunet)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("nnunetv2")
    except PackageNotFoundError:
        raise UnsupportedNnunet("nnunetv2 is not installed") from None
    check_nnunet_version(installed)
    return installed


class IncompatibleNnunet(AssertionError):
    """An nnU-Net internal that fednnunet relies on is not what it was."""


def _expect(ok: bool, internal: str, what: str) -> None:
    if not ok:
        raise IncompatibleNnunet(f"nnU-Net internal {internal} changed: {what}")


def _source(obj: object) -> str:
    return inspect.getsource(obj)  # type: ignore[arg-type]


def _trainer_class() -> type:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer


# ---------------------------------------------------------------- folders (env variables)
@contextlib.contextmanager
def temporary_env(**values: str | Path | None) -> Iterator[None]:
    """Set environment variables (None: leave alone) for the duration, then restore them.

    Not thread-safe: the process environment is global.
    """
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def nnunet_env(
    raw_root: Path | None = None,
    preprocessed_root: Path | None = None,
    results_root: Path | None = None,
) -> contextlib.AbstractContextManager[None]:
    """Point nnU-Net at explicit folders for the duration (None: leave that one alone).

    Works because nnunetv2 >= 2.8 reads ``nnUNet_raw`` & co. at each use
    (``nnunetv2.paths._EnvPath``); an older one bound them at import and would silently
    use the old folders, hence the version guard.
    """
    require_tested_nnunet()
    return temporary_env(
        nnUNet_raw=raw_root, nnUNet_preprocessed=preprocessed_root, nnUNet_results=results_root
    )


def _check_lazy_paths() -> None:
    import nnunetv2.paths as paths

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        probe = f"/fednnunet-probe/{name}"
        with temporary_env(**{name: probe}):
            value = getattr(paths, name, None)
            _expect(
                isinstance(value, os.PathLike) and os.fspath(value) == probe,
                f"nnunetv2.paths.{name}",
                "no longer read from the environment at each use",
            )


# ---------------------------------------------------------------- inline per-case pools
# Fewer cases than this: inline. Measured here: a spawned worker costs ~2 CPU-s to
# start, a 2d demo case ~0.05-0.3 s to check, fingerprint or preprocess.
POOL_MIN_CASES = 16

# (module, attribute): the ``multiprocessing`` module or the ``Pool`` class it uses.
POOL_GLOBALS = (
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
    """Within the block, nnU-Net's planning and preprocessing pools run in this process.

    nnU-Net's integrity check, fingerprint extractor and preprocessor always start a
    ``spawn`` pool whose workers import nnunetv2 and torch again (~2 CPU-s, 300 MB each);
    for a few dozen cases the work is done before one worker has started. Same nnU-Net
    functions, same outputs, no processes.
    """
    if not enabled:
        yield
        return
    import importlib

    require_tested_nnunet()
    with _patch_lock:
        targets = [(importlib.import_module(name), attr) for name, attr in POOL_GLOBALS]
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


def _check_pool_globals() -> None:
    import importlib

    for name, attr in POOL_GLOBALS:
        module = importlib.import_module(name)
        source = _source(module)
        _expect(hasattr(module, attr), f"{name}.{attr}", "the module no longer has it")
        used = f"{attr}.get_context(" if attr == "multiprocessing" else f"{attr}("
        _expect(used in source, f"{name}.{attr}", f"the module no longer calls {used}...)")
    # What InlinePool fakes: liveness of ``pool._pool`` workers, AsyncResult.ready()/get().
    for name in POOL_GLOBALS[1:3]:
        source = _source(importlib.import_module(name[0]))
        for part in ("starmap_async", "._pool", ".ready()", ".get()"):
            _expect(part in source, f"{name[0]} pool use", f"{part} no longer used")


def import_nnunet() -> None:
    """Import what a site's phases use, so that a long-lived worker pays it at start-up."""
    import importlib

    require_tested_nnunet()
    for name, _ in POOL_GLOBALS:
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


# ---------------------------------------------------------------- the trainer
def resolve_trainer_class(name: str) -> type:
    """What nnU-Net's lookup finds by that name (LookupError: nothing).

    It returns *any* attribute of its trainer modules by that name (2.8.1 then fails its
    own issubclass check with a TypeError): check the result with is_nnunet_trainer.
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError, TypeError) as exc:
        raise LookupError(str(exc)) from None


def is_nnunet_trainer(obj: object) -> bool:
    """True for nnUNetTrainer and its subclasses only (not functions, modules, ...)."""
    return isinstance(obj, type) and issubclass(obj, _trainer_class())


def new_trainer(
    trainer_cls: type,
    plans: dict,
    configuration: str,
    fold: int | str,
    dataset_json: dict,
    device: str,
    continue_training: bool,
) -> Any:
    """A trainer as ``nnUNetv2_train`` builds it; ``continue_training`` as its ``--c``.

    nnunetv2 2.8 takes ``--c`` as a ``plans["continue_training"]`` entry (and pops it).
    """
    import copy

    import torch

    plans = copy.deepcopy(plans)
    plans["continue_training"] = continue_training
    return trainer_cls(
        plans=plans,
        configuration=configuration,
        fold=fold,
        dataset_json=dataset_json,
        device=torch.device(device),
    )


def _check_continue_training() -> None:
    source = _source(_trainer_class().__init__)
    _expect(
        'plans.pop("continue_training")' in source or "plans.pop('continue_training')" in source,
        'nnUNetTrainer.__init__ plans["continue_training"]',
        "--c is no longer passed inside the plans",
    )


# nnU-Net writes checkpoint_latest.pth every ``save_every`` epochs on its own; a mid-round
# checkpoint would no longer match the round fednnunet records, so only rounds write it.
_NEVER = 10**9


def set_schedule(
    trainer: Any, total_epochs: int, iterations_per_epoch: int, val_iterations_per_epoch: int
) -> None:
    """The trainer's epoch count and lengths (nnU-Net sets them in __init__), no own saves."""
    trainer.num_epochs = total_epochs
    trainer.num_iterations_per_epoch = iterations_per_epoch
    trainer.num_val_iterations_per_epoch = val_iterations_per_epoch
    trainer.save_every = _NEVER


def _check_schedule_attributes() -> None:
    source = _source(_trainer_class().__init__)
    for attr in ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch"):
        _expect(f"self.{attr} =" in source, f"nnUNetTrainer.{attr}", "no longer set in __init__")
    _expect(
        "self.save_every" in _source(_trainer_class().on_epoch_end),
        "nnUNetTrainer.save_every",
        "on_epoch_end no longer decides by it when to save",
    )


# The hooks of one epoch, in nnUNetTrainer.run_training's order (2.8).
EPOCH_HOOKS = (
    "on_epoch_start",
    "on_train_epoch_start",
    "train_step",
    "on_train_epoch_end",
    "on_validation_epoch_start",
    "validation_step",
    "on_validation_epoch_end",
    "on_epoch_end",
)


def run_epoch(
    trainer: Any,
    on_iteration: Callable[[int, int, int], None] | None = None,
    lr_progress: float | None = None,
) -> None:
    """One epoch with the trainer's own hooks, in ``run_training``'s order (EPOCH_HOOKS).

    ``lr_progress`` (asynchronous federation): the federation's progress in [0, 1] that
    places nnU-Net's poly learning rate instead of the trainer's own epoch counter."""
    import torch

    t = trainer
    epoch = t.current_epoch
    t.on_epoch_start()
    t.on_train_epoch_start()
    if lr_progress is not None:
        set_poly_lr(t, min(max(lr_progress, 0.0), 1.0))
    train_outputs = []
    for i in range(t.num_iterations_per_epoch):
        train_outputs.append(t.train_step(next(t.dataloader_train)))
        if on_iteration is not None:
            on_iteration(epoch, i + 1, t.num_iterations_per_epoch)
    t.on_train_epoch_end(train_outputs)
    with torch.no_grad():
        t.on_validation_epoch_start()
        val_outputs = [
            t.validation_step(next(t.dataloader_val)) for _ in range(t.num_val_iterations_per_epoch)
        ]
        t.on_validation_epoch_end(val_outputs)
    t.on_epoch_end()


def set_poly_lr(trainer: Any, progress: float) -> None:
    """nnU-Net's PolyLRScheduler at ``progress`` of its steps (and its logged lr)."""
    scheduler = trainer.lr_scheduler
    scheduler.step(progress * scheduler.max_steps)
    # nnU-Net 2.8's MetaLogger keeps the lists in its local logger (older: itself).
    lrs = getattr(trainer.logger, "local_logger", trainer.logger).my_fantastic_logging["lrs"]
    if lrs:
        lrs[-1] = trainer.optimizer.param_groups[0]["lr"]


def _check_epoch_hooks() -> None:
    source = _source(_trainer_class().run_training)
    called = re.findall(r"self\.(\w+)\(", source)
    loop = [c for c in called if c in EPOCH_HOOKS]
    _expect(
        tuple(dict.fromkeys(loop)) == EPOCH_HOOKS,
        "nnUNetTrainer.run_training",
        f"its epoch calls {loop}, not {list(EPOCH_HOOKS)}",
    )
    unknown = set(called) - set(EPOCH_HOOKS) - {"on_train_start", "on_train_end"}
    _expect(not unknown, "nnUNetTrainer.run_training", f"it now also calls {sorted(unknown)}")


def save_checkpoint_between_epochs(trainer: Any, path: Path) -> None:
    """nnU-Net's checkpoint, written between epochs.

    ``save_checkpoint`` stores ``current_epoch + 1`` (nnU-Net saves inside
    ``on_epoch_end``, before the increment); step back like ``on_train_end`` does, so a
    resume continues at the next epoch.
    """
    trainer.current_epoch -= 1
    try:
        trainer.save_checkpoint(str(path))
    finally:
        trainer.current_epoch += 1


def _check_checkpoint_epoch() -> None:
    cls = _trainer_class()
    _expect(
        "'current_epoch': self.current_epoch + 1" in _source(cls.save_checkpoint),
        "nnUNetTrainer.save_checkpoint current_epoch + 1",
        "the stored epoch is no longer the next one",
    )
    _expect(
        "self.current_epoch -= 1" in _source(cls.on_train_end),
        "nnUNetTrainer.on_train_end current_epoch -= 1",
        "on_train_end no longer steps the epoch back before saving",
    )


def logged_metrics(trainer: Any) -> dict[str, Any] | None:
    """The last epoch's values from nnU-Net's logger (None before the first epoch)."""
    log = trainer.logger
    if not log.get_value("train_losses", step=None):
        return None
    return {
        "train_loss": log.get_value("train_losses", step=-1),
        "val_loss": log.get_value("val_losses", step=-1),
        "pseudo_dice": log.get_value("mean_fg_dice", step=-1),
        "ema_pseudo_dice": log.get_value("ema_fg_dice", step=-1),
        "lr": log.get_value("lrs", step=-1),
    }


LOGGED = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs")


def _check_logger_keys() -> None:
    from nnunetv2.training.logging.nnunet_logger import LocalLogger, MetaLogger

    _expect(callable(getattr(MetaLogger, "get_value", None)), "MetaLogger.get_value", "gone")
    have = set(LocalLogger().my_fantastic_logging)
    missing = [k for k in LOGGED if k not in have]
    _expect(not missing, "LocalLogger.my_fantastic_logging", f"no {missing} any more")


def network_module(trainer: Any) -> Any:
    """The trainer's plain network (unwrapped from DDP and ``torch.compile``)."""
    import torch
    from torch._dynamo import OptimizedModule

    net = trainer.network
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        net = net.module
    if isinstance(net, OptimizedModule):
        net = net._orig_mod
    return net


def stop_data_loaders(trainer: Any) -> None:
    """Stop the augmentation worker processes (nnU-Net leaves them to process exit)."""
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            with contextlib.suppress(Exception):
                finish()


def _check_data_loader_stop() -> None:
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
        NonDetMultiThreadedAugmenter,
    )

    _expect(
        callable(getattr(NonDetMultiThreadedAugmenter, "_finish", None)),
        "NonDetMultiThreadedAugmenter._finish",
        "gone: augmentation workers would outlive the session",
    )


def dataset_identifiers(data_folder: Path) -> list[str]:
    """The sorted case identifiers of a preprocessed configuration folder."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    return sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))


def crossval_split(identifiers: list[str]) -> list[dict[str, list[str]]]:
    """The 5-fold split ``nnUNetTrainer.do_split`` writes to splits_final.json when none
    exists (seeded: the same at every call)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    return generate_crossval_split(sorted(identifiers), seed=12345, n_splits=5)


def _check_crossval_split() -> None:
    source = _source(_trainer_class().do_split)
    for part in ("generate_crossval_split(", "seed=12345", "n_splits=5", "splits_final.json"):
        _expect(part in source, "nnUNetTrainer.do_split", f"no longer has {part}")


# Where nnU-Net's checkpoints keep the network's state dict.
CHECKPOINT_WEIGHTS = "network_weights"


def _check_checkpoint_weights() -> None:
    _expect(
        f"'{CHECKPOINT_WEIGHTS}'" in _source(_trainer_class().save_checkpoint),
        f"nnUNetTrainer.save_checkpoint['{CHECKPOINT_WEIGHTS}']",
        "checkpoints keep the weights under another name",
    )


@contextlib.contextmanager
def default_processes(n: int | None) -> Iterator[None]:
    """Temporarily change the process count the trainer module bound at import
    (``default_num_processes``: its validation export and metrics pools)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    old = trainer_module.default_num_processes
    if n is not None:
        trainer_module.default_num_processes = max(1, int(n))
    try:
        yield
    finally:
        trainer_module.default_num_processes = old


def _check_default_processes() -> None:
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    _expect(
        isinstance(getattr(trainer_module, "default_num_processes", None), int),
        "nnunetv2.training.nnUNetTrainer.nnUNetTrainer.default_num_processes",
        "the module no longer binds it",
    )
    _expect(
        "default_num_processes" in _source(trainer_module.nnUNetTrainer.perform_actual_validation),
        "nnUNetTrainer.perform_actual_validation default_num_processes",
        "validation no longer sizes its pools by it",
    )


# ---------------------------------------------------------------- federated evaluation
# What on_validation_epoch_end logs (2.8): the pseudo-Dice, per class, and the loss.
VALIDATION_LOGGED = ("mean_fg_dice", "dice_per_class_or_region", "val_losses")


class _ScratchLog:
    """Takes the trainer logger's place: what the hooks log lands here, nowhere else
    (not the training log, its EMA, or an external logger)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def log(self, key: str, value: Any, step: int) -> None:  # noqa: ARG002 - nnU-Net's API
        self.values[key] = value

    def log_summary(self, key: str, value: Any) -> None:
        self.values[key] = value


@contextlib.contextmanager
def scratch_logger(trainer: Any) -> Iterator[dict[str, Any]]:
    """Swap the trainer's logger for a scratch one; yields what gets logged meanwhile."""
    scratch = _ScratchLog()
    old, trainer.logger = trainer.logger, scratch
    try:
        yield scratch.values
    finally:
        trainer.logger = old


def score_current_weights(trainer: Any) -> dict[str, Any]:
    """The trainer's own validation hooks on its current weights: ``validation_step`` on
    ``num_val_iterations_per_epoch`` batches, then ``on_validation_epoch_end``, logged to
    a scratch log. Returns VALIDATION_LOGGED's values (pseudo-Dice, per class, loss)."""
    import torch

    with torch.no_grad(), scratch_logger(trainer) as logged:
        trainer.on_validation_epoch_start()
        outputs = [
            trainer.validation_step(next(trainer.dataloader_val))
            for _ in range(trainer.num_val_iterations_per_epoch)
        ]
        trainer.on_validation_epoch_end(outputs)
    return {k: logged.get(k) for k in VALIDATION_LOGGED}


def _check_validation_logging() -> None:
    source = _source(_trainer_class().on_validation_epoch_end)
    for key in VALIDATION_LOGGED:
        _expect(
            f"self.logger.log('{key}'" in source or f'self.logger.log("{key}"' in source,
            f"nnUNetTrainer.on_validation_epoch_end logs {key}",
            "the pseudo-Dice is no longer logged this way",
        )


def foreground_class_names(trainer: Any) -> list[str]:
    """The foreground labels (or regions), in the order of the per-class pseudo-Dice."""
    lm = trainer.label_manager
    if lm.has_regions:
        return [f"region{i + 1}" for i in range(len(lm.foreground_regions))]
    return [str(label) for label in lm.foreground_labels]


def validate_into(trainer: Any, folder: Path) -> Path:
    """nnU-Net's full validation of the current weights written to ``folder/validation``
    (nnU-Net writes ``<output_folder>/validation``: the output folder is pointed there
    for the call; the trainer's log sees nothing). Returns the summary.json path."""
    original = trainer.output_folder
    trainer.output_folder = str(folder)
    try:
        with scratch_logger(trainer):
            trainer.perform_actual_validation(False)
    finally:
        trainer.output_folder = original
    return Path(folder) / "validation" / "summary.json"


def _check_validation_folder() -> None:
    _expect(
        "join(self.output_folder, 'validation')"
        in _source(_trainer_class().perform_actual_validation),
        "nnUNetTrainer.perform_actual_validation output folder",
        "validation is no longer written to <output_folder>/validation",
    )


def never_save_local_best(trainer: Any) -> None:
    """nnU-Net's on_epoch_end saves checkpoint_best.pth when its *local* EMA beats
    ``_best_ema``; with an infinite best it never does (the federation's best global is
    written instead)."""
    trainer._best_ema = math.inf


def save_best_checkpoint(trainer: Any, path: Path, best_ema: float | None) -> None:
    """The trainer's checkpoint, between epochs, recording ``best_ema`` as its best EMA."""
    previous, trainer._best_ema = trainer._best_ema, best_ema
    try:
        save_checkpoint_between_epochs(trainer, path)
    finally:
        trainer._best_ema = previous


def _check_best_rule() -> None:
    cls = _trainer_class()
    _expect(
        "self._best_ema is None or" in _source(cls.on_epoch_end),
        "nnUNetTrainer.on_epoch_end _best_ema",
        "checkpoint_best.pth is no longer decided by _best_ema",
    )
    _expect(
        "'_best_ema': self._best_ema" in _source(cls.save_checkpoint),
        "nnUNetTrainer.save_checkpoint _best_ema",
        "checkpoints no longer record the best EMA",
    )


def renamed_trainer_class(base: type, name: str) -> type:
    """``base`` under another name, for another results folder: nnU-Net derives
    ``<name>__<plans>__<configuration>`` from the class name; the checkpoints still name
    ``base``, the class nnU-Net's predictor finds and builds the network with."""

    def save_checkpoint(self: Any, filename: str) -> None:
        cls = type(self)
        cls.__name__ = base.__name__
        try:
            base.save_checkpoint(self, filename)
        finally:
            cls.__name__ = name

    return type(name, (base,), {"__module__": base.__module__, "save_checkpoint": save_checkpoint})


def _check_class_named_folder() -> None:
    cls = _trainer_class()
    _expect(
        "self.__class__.__name__ + '__'" in _source(cls.__init__),
        "nnUNetTrainer.__init__ output_folder_base",
        "the results folder is no longer named after the trainer class",
    )
    _expect(
        "'trainer_name': self.__class__.__name__" in _source(cls.save_checkpoint),
        "nnUNetTrainer.save_checkpoint trainer_name",
        "checkpoints no longer name the trainer class",
    )


def scale_initial_lr(trainer: Any, factor: float) -> None:
    """Multiply the learning rate the optimizer starts from (before ``initialize``)."""
    trainer.initial_lr *= factor


def _check_initial_lr() -> None:
    cls = _trainer_class()
    _expect(
        "self.initial_lr" in _source(cls.configure_optimizers),
        "nnUNetTrainer.configure_optimizers initial_lr",
        "the optimizer no longer starts from initial_lr",
    )


# Name -> check: every internal above. Each check raises IncompatibleNnunet naming it.
INTERNALS: dict[str, Callable[[], None]] = {
    "nnunetv2.paths (read at each use)": _check_lazy_paths,
    "per-case pool globals and AsyncResult use": _check_pool_globals,
    'plans["continue_training"]': _check_continue_training,
    "trainer schedule attributes": _check_schedule_attributes,
    "run_training hook order": _check_epoch_hooks,
    "save_checkpoint current_epoch + 1": _check_checkpoint_epoch,
    "logger keys": _check_logger_keys,
    "data loader _finish": _check_data_loader_stop,
    "default_num_processes": _check_default_processes,
    "do_split's seeded 5-fold split": _check_crossval_split,
    "checkpoint network_weights": _check_checkpoint_weights,
    "on_validation_epoch_end logging": _check_validation_logging,
    "perform_actual_validation folder": _check_validation_folder,
    "_best_ema rule": _check_best_rule,
    "results folder named after the trainer class": _check_class_named_folder,
    "initial_lr": _check_initial_lr,
}


def incompatibilities() -> list[str]:
    """Every internal that is not as fednnunet expects (empty: all as tested)."""
    problems = []
    for name, check in INTERNALS.items():
        try:
            check()
        except IncompatibleNnunet as exc:
            problems.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a changed module may fail in any way
            problems.append(f"nnU-Net internal {name} changed: {type(exc).__name__}: {exc}")
    return problems
