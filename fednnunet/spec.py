"""The experiment spec: what a researcher asks for, validated before anything is queued."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from fednnunet.errors import FedError, SpecError
from fednnunet.keys import EXPERIMENT_ID_RE, IDLE_EXPERIMENT, SITE_ID_RE
from fednnunet.messages import ArtifactRef, ExperimentOptions


class ExperimentSpec(ExperimentOptions):
    """What a researcher asks for: the experiment's options, its id and sites, and the
    ``nnUNetv2_train`` flags (``train_args``) that override trainer, plans, device and npz
    export. The coordinator keeps :meth:`options` as given, for the whole experiment."""

    model_config = {"extra": "forbid"}

    experiment_id: str = Field(default_factory=lambda: "exp-" + secrets.token_hex(4))
    sites: list[str]
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

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        if self.train_args:
            from fednnunet.nnunet.train_args import pretrained_weights_arg

            given = pretrained_weights_arg(self.train_args)
            if given is not None:
                if self.pretrained_weights not in (None, given):
                    raise ValueError("pretrained_weights given twice, with different paths")
                self.pretrained_weights = given
        unknown = sorted(set(self.simulate_slowdown) - set(self.sites))
        if unknown:
            raise ValueError(f"simulate_slowdown names unknown site(s) {unknown}")
        if self.quorum is not None and self.quorum > len(self.sites):
            raise ValueError(
                f"quorum {self.quorum} exceeds the number of sites ({len(self.sites)})"
            )
        return self

    def options(self) -> ExperimentOptions:
        """The experiment's options, with the flags of ``train_args`` applied."""
        fields = self.model_dump(include=set(ExperimentOptions.model_fields))
        if self.train_args:
            from fednnunet.nnunet.train_args import parse_nnunet_train_args

            fields |= parse_nnunet_train_args(self.train_args)
        return ExperimentOptions.model_validate(fields)


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
        spec.options()
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
