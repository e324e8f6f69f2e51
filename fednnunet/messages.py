"""Message bodies exchanged over the broker: JSON only, validated by pydantic.

Messages carry references to artifacts (bucket, key, sha256, size), never tensors.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from fednnunet.core.retention import MIN_KEEP_ROUNDS, kept_rounds
from fednnunet.phases import Phase
from fednnunet.strategies import MethodName, Strategy, get_strategy

# Bounds on what a site may send: anything larger is refused, not stored.
MAX_METRICS = 64
MAX_METRIC_NAME = 64
MAX_METRIC_VALUE = 1e15
MAX_ERROR_CHARS = 500
# Training cases one site may declare (the largest public segmentation sets have ~10^4).
MAX_SITE_CASES = 100_000
NOT_FINITE = "not a finite number (nnU-Net gives NaN Dice for a label absent from the cases)"


def _metric_items(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("metrics must be a mapping of name to number")
    if len(value) > MAX_METRICS:
        raise ValueError(f"{len(value)} metrics: at most {MAX_METRICS}")
    for name in value:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_NAME:
            raise ValueError(f"metric name {str(name)[:80]!r}: 1-{MAX_METRIC_NAME} characters")
    return value


def is_metric_value(value: Any) -> bool:
    """A finite, bounded number: the only kind of metric value that enters the state."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) <= MAX_METRIC_VALUE
    )


def _finite_metrics(value: Any) -> dict[str, float]:
    """Keep the finite values; NaN/Inf/None become "no value" (see ``missing_metrics``).

    NaN is legal in Python's JSON but not in the state's: one NaN once made a stored
    state unloadable, so no non-finite number is ever stored.
    """
    return {k: float(v) for k, v in _metric_items(value).items() if is_metric_value(v)}


Metrics = Annotated[dict[str, float], BeforeValidator(_finite_metrics)]


def missing_metric_reasons(metrics: Any) -> dict[str, str]:
    """Name -> why it has no value, for each metric :data:`Metrics` drops."""
    return {
        k: NOT_FINITE if isinstance(v, float) else "not a number"
        for k, v in _metric_items(metrics).items()
        if not is_metric_value(v)
    }


def _short_text(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_ERROR_CHARS:
        return value[: MAX_ERROR_CHARS - 1] + "…"
    return value


ShortText = Annotated[str, BeforeValidator(_short_text)]


class ArtifactRef(BaseModel):
    bucket: str = Field(max_length=63)
    key: str = Field(max_length=1024)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=1 << 40)


def _fold(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= 4:
        raise ValueError("fold must be 0-4 or 'all'")
    return v


# nnU-Net's five cross-validation folds, or all cases.
Fold = Annotated[int | Literal["all"], AfterValidator(_fold)]

# Names that become file or folder names at a site: no path separator, no leading dot.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
PYTHON_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


class ExperimentOptions(BaseModel):
    """Every option of an experiment, in one model carried unchanged from the spec into
    the coordinator's state, every site task and the site's training session.

    Adding an option = one field here + the code that uses it. A site validates these
    before running anything: every name that ends up in a path is a plain name (no
    separator, no ``..``), every count is bounded.
    """

    # What the sites train (nnUNetv2_train's dataset-independent arguments).
    configuration: str = "3d_fullres"
    fold: Fold = 0
    trainer: str = Field(default="nnUNetTrainer", pattern=PYTHON_NAME_PATTERN)
    plans_identifier: str = Field(default="nnUNetPlans", pattern=NAME_PATTERN)
    device: Literal["cuda", "cpu", "mps"] = "cuda"
    seed: int = 12345
    export_npz: bool = False
    # How the federation trains.
    method: MethodName = "ffe"
    rounds: int = Field(default=1000, ge=1, le=99_999)  # keys sort by round: r{:05d}
    local_epochs: int = Field(default=1, ge=1, le=1000)
    iterations_per_epoch: int = Field(default=250, ge=1, le=100_000)
    val_iterations_per_epoch: int = Field(default=50, ge=1, le=100_000)
    # fedavg (case-weighted mean) or trimmed_mean (robust to a minority of bad updates).
    aggregation: Literal["fedavg", "trimmed_mean"] = "fedavg"
    # Largest share of the average one site may have, e.g. 0.5 (default: case-weighted).
    max_site_weight: float | None = Field(default=None, gt=0, le=1)
    # How the coordinator waits for sites (quorum None: every site).
    quorum: int | None = Field(default=None, ge=1)
    round_deadline_s: float | None = Field(default=None, gt=0)
    heartbeat_timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=20)
    # End the experiment after this phase (fingerprint: FFE only).
    stop_after: Phase | None = None
    # sync: rounds that wait for a quorum; async: FedBuff, sites train continuously and
    # every buffer_size updates make a new global version (core/async_rounds.py).
    mode: Literal["sync", "async"] = "sync"
    buffer_size: int | None = Field(default=None, ge=1, le=100_000)  # None: ceil(sites/2)
    staleness_exponent: float = Field(default=0.5, ge=0, le=10)  # s(tau) = (1+tau)^-a
    max_staleness: int | None = Field(default=None, ge=0)  # older async updates refused
    server_lr: float = Field(default=1.0, gt=0, le=10)  # async server learning rate
    max_wall_s: float | None = Field(default=None, gt=0)  # async: end after this long
    # Simulation only (benchmarks, demos): site -> k, its local epochs take k times longer.
    simulate_slowdown: dict[str, float] = Field(default_factory=dict, max_length=1000)
    # Every k rounds, also nnU-Net's full sliding-window validation of the incoming
    # global at each site (0: off; the pseudo-Dice of every round is always there).
    eval_every: int = Field(default=0, ge=0, le=100_000)
    # After the last round, each site fine-tunes the final global this many epochs into
    # a separate trainer folder ``<trainer>_finetuned`` (0: off).
    finetune_epochs: int = Field(default=0, ge=0, le=1000)
    # Sync mode: the weights of only the last k rounds stay in S3 (the best global and the
    # initial model too); None: 3 (core/retention.py); 0: every round's (0.5 GB a round for
    # three 3d_fullres sites). At least 2.
    keep_rounds: int | None = Field(default=None, ge=0, le=100_000)

    @field_validator("configuration")
    @classmethod
    def _known_configuration(cls, v: str) -> str:
        if v not in CONFIGURATIONS:
            raise ValueError(f"unknown configuration {v!r}; one of {', '.join(CONFIGURATIONS)}")
        return v

    @field_validator("stop_after")
    @classmethod
    def _stop_phase(cls, v: Phase | None) -> Phase | None:
        if v not in (None, Phase.FINGERPRINT, Phase.PLAN):
            raise ValueError(f"must be {Phase.FINGERPRINT} or {Phase.PLAN}, not {v}")
        return v

    @model_validator(mode="after")
    def _stop_after_fingerprint_needs_one(self) -> ExperimentOptions:
        if self.stop_after == Phase.FINGERPRINT and not self.strategy.federated_fingerprint:
            raise ValueError(
                f"stop_after=fingerprint needs a method with a federated fingerprint, "
                f"not {self.method}"
            )
        return self

    @model_validator(mode="after")
    def _mode_options(self) -> ExperimentOptions:
        if any(not 1 <= k <= 100 for k in self.simulate_slowdown.values()):
            raise ValueError("simulate_slowdown factors must be between 1 and 100")
        if self.mode == "sync":
            async_only = {
                "buffer_size": self.buffer_size is not None,
                "max_staleness": self.max_staleness is not None,
                "max_wall_s": self.max_wall_s is not None,
                "server_lr": self.server_lr != 1.0,
                "staleness_exponent": self.staleness_exponent != 0.5,
            }
            given = [name for name, set_ in async_only.items() if set_]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to mode: async")
        else:
            if self.aggregation != "fedavg":
                raise ValueError("mode async combines updates with FedBuff, not trimmed_mean")
            if self.round_deadline_s is not None:
                raise ValueError("mode async has no rounds to close: use max_wall_s")
            if self.keep_rounds:
                raise ValueError("keep_rounds only applies to mode: sync (async keeps all)")
        return self

    @field_validator("keep_rounds")
    @classmethod
    def _keep_window(cls, v: int | None) -> int | None:
        if v is not None and 0 < v < MIN_KEEP_ROUNDS:
            raise ValueError(
                f"must be 0 (keep every round) or at least {MIN_KEEP_ROUNDS}: a coordinator "
                "that restarts may close the previous round again"
            )
        return v

    @property
    def kept_rounds(self) -> int | None:
        """How many recent rounds' weights stay in S3 (None: all); see core/retention.py."""
        return kept_rounds(self.keep_rounds, self.mode)

    @property
    def strategy(self) -> Strategy:
        """The federated method's decisions (fednnunet/strategies/)."""
        return get_strategy(self.method)


class SiteTask(BaseModel):
    """One unit of work for one site: a phase (and round) of one experiment."""

    experiment_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    site_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")
    phase: Phase
    round: int = Field(default=0, ge=0, le=100_000)
    attempt: int = Field(default=1, ge=1, le=1000)
    options: ExperimentOptions
    # Inputs, by phase: merged fingerprint (plan, FFE), global weights (train, round>1),
    # expected plans hash (train, FFE).
    merged_fingerprint: ArtifactRef | None = None
    global_weights: ArtifactRef | None = None
    plans_sha256: str | None = None
    # Async train: the global version ``global_weights`` is, and the federation's progress
    # (site-epochs consumed / target) that sets nnU-Net's poly learning rate.
    base_version: int | None = Field(default=None, ge=0)
    progress: float | None = Field(default=None, ge=0, le=1)
    # Validate: the global with the best EMA of federated Dice (checkpoint_best.pth).
    best_weights: ArtifactRef | None = None
    best_dice_ema: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)


class SiteReport(BaseModel):
    """What a site sends back to the coordinator queue when a task ends."""

    experiment_id: str
    site_id: str
    phase: Phase
    round: int = 0
    attempt: int = 1
    ok: bool
    error: ShortText | None = None
    # False for errors that another attempt cannot fix (e.g. a malformed dataset).
    retryable: bool = True
    artifact: ArtifactRef | None = None
    plans_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    # Async train: the global version this update started from.
    base_version: int | None = Field(default=None, ge=0)
    num_cases: int = Field(default=0, ge=0, le=MAX_SITE_CASES)
    metrics: Metrics = Field(default_factory=dict)
    # Metrics without a value (e.g. NaN Dice) and why: kept out of ``metrics``.
    missing_metrics: dict[str, ShortText] = Field(default_factory=dict, max_length=MAX_METRICS)
    seconds: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _record_missing_metrics(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("metrics"):
            missing = missing_metric_reasons(data["metrics"])
            if missing:
                data = {**data, "missing_metrics": {**data.get("missing_metrics", {}), **missing}}
        return data


class ProgressEvent(BaseModel):
    """Transient progress published on a topic exchange while a task runs."""

    experiment_id: str
    site_id: str
    kind: Literal["heartbeat", "progress", "egress"]
    phase: Phase | None = None
    round: int = 0
    epoch: int | None = Field(default=None, ge=0, le=10**7)
    iteration: int | None = Field(default=None, ge=0, le=10**7)
    of_iterations: int | None = Field(default=None, ge=0, le=10**7)
    metrics: Metrics = Field(default_factory=dict)
    bytes_sent: int = Field(default=0, ge=0, le=1 << 40)
    bytes_received: int = Field(default=0, ge=0, le=1 << 40)
    time: float = Field(default=0.0, allow_inf_nan=False)
