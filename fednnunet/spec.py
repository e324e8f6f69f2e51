"""The experiment spec: what a researcher asks for, validated before anything is queued."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from fednnunet.errors import FedError, SpecError
from fednnunet.keys import EXPERIMENT_ID_RE, IDLE_EXPERIMENT, SITE_ID_RE
from fednnunet.messages import NAME_PATTERN, PYTHON_NAME_PATTERN, ArtifactRef, Fold, TrainingOptions
from fednnunet.strategies import MethodName, Strategy, get_strategy

CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


class ExperimentSpec(BaseModel):
    model_config = {"extra": "forbid"}

    experiment_id: str = Field(default_factory=lambda: "exp-" + secrets.token_hex(4))
    sites: list[str]
    configuration: str = "3d_fullres"
    fold: Fold = 0
    method: MethodName = "ffe"
    rounds: int = Field(default=1000, ge=1, le=100_000)
    local_epochs: int = Field(default=1, ge=1, le=1000)
    trainer: str = Field(default="nnUNetTrainer", pattern=PYTHON_NAME_PATTERN)
    plans_identifier: str = Field(default="nnUNetPlans", pattern=NAME_PATTERN)
    iterations_per_epoch: int = Field(default=250, ge=1)
    val_iterations_per_epoch: int = Field(default=50, ge=1)
    device: Literal["cuda", "cpu", "mps"] = "cuda"
    seed: int = 12345
    quorum: int | None = Field(default=None, ge=1)
    round_deadline_s: float | None = Field(default=None, gt=0)
    heartbeat_timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, le=20)
    export_npz: bool = False
    stop_after: Literal["fingerprint", "plan"] | None = None
    # Largest share of the average one site may have, e.g. 0.5 (default: case-weighted).
    max_site_weight: float | None = Field(default=None, gt=0, le=1)
    # fedavg (case-weighted mean) or trimmed_mean (robust to a minority of bad updates).
    aggregation: Literal["fedavg", "trimmed_mean"] = "fedavg"
    train_args: list[str] = Field(default_factory=list)
    # A local nnU-Net checkpoint (``-pretrained_weights``): the federation's initial global
    # model. The CLI uploads it to the global bucket and sets ``initial_weights``.
    pretrained_weights: str | None = None
    initial_weights: ArtifactRef | None = None

    @field_validator("experiment_id")
    @classmethod
    def _exp_id(cls, v: str) -> str:
        if v == IDLE_EXPERIMENT:
            raise ValueError(f"{v!r} is reserved")
        if not EXPERIMENT_ID_RE.match(v):
            raise ValueError("must be lowercase letters, digits and '-', at most 63 characters")
        return v

    @field_validator("sites")
    @classmethod
    def _sites(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one site is needed")
        bad = [s for s in v if not SITE_ID_RE.match(s)]
        if bad:
            raise ValueError(f"invalid site id(s) {bad}: lowercase letters, digits, '-'")
        if len(set(v)) != len(v):
            raise ValueError("site ids must be unique")
        return v

    @field_validator("configuration")
    @classmethod
    def _config(cls, v: str) -> str:
        if v not in CONFIGURATIONS:
            raise ValueError(f"unknown configuration {v!r}; one of {', '.join(CONFIGURATIONS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        if self.train_args:
            from fednnunet.nnunet.train_args import pretrained_weights_arg

            given = pretrained_weights_arg(self.train_args)
            if given is not None:
                if self.pretrained_weights not in (None, given):
                    raise ValueError("pretrained_weights given twice, with different paths")
                self.pretrained_weights = given
        if self.stop_after == "fingerprint" and not self.strategy.federated_fingerprint:
            raise ValueError(
                f"stop_after=fingerprint needs a method with a federated fingerprint, "
                f"not {self.method}"
            )
        if self.quorum is not None and self.quorum > len(self.sites):
            raise ValueError(
                f"quorum {self.quorum} exceeds the number of sites ({len(self.sites)})"
            )
        return self

    @property
    def strategy(self) -> Strategy:
        return get_strategy(self.method)

    @property
    def effective_quorum(self) -> int:
        return self.quorum or len(self.sites)

    def training_options(self) -> TrainingOptions:
        opts = TrainingOptions(
            configuration=self.configuration,
            fold=self.fold,
            trainer=self.trainer,
            plans_identifier=self.plans_identifier,
            method=self.method,
            rounds=self.rounds,
            local_epochs=self.local_epochs,
            iterations_per_epoch=self.iterations_per_epoch,
            val_iterations_per_epoch=self.val_iterations_per_epoch,
            device=self.device,
            seed=self.seed,
            export_npz=self.export_npz,
        )
        if self.train_args:
            from fednnunet.nnunet.train_args import parse_nnunet_train_args

            opts = TrainingOptions.model_validate(
                opts.model_dump() | parse_nnunet_train_args(self.train_args)
            )
        return opts


def _problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "spec"
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{where}: {msg}")
    return out


def parse_spec(data: dict[str, Any]) -> ExperimentSpec:
    """Validate a spec dict; raise SpecError listing every problem at once."""
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_problems(err)) from None
    try:
        spec.training_options()
    except FedError as err:
        raise SpecError([f"train_args: {err}"]) from None
    except ValidationError as err:
        raise SpecError([f"train_args: {p}" for p in _problems(err)]) from None
    return spec


def load_spec(path: Path | None, overrides: dict[str, Any] | None = None) -> ExperimentSpec:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise FedError(f"spec file not found: {path}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise FedError(f"spec file {path} is not valid YAML: {problem}{where}") from None
        if not isinstance(loaded, dict):
            raise SpecError(["spec: the YAML document must be a mapping"])
        data.update(loaded)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_spec(data)
