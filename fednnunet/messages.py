"""Message bodies exchanged over the broker: JSON only, validated by pydantic.

Messages carry references to artifacts (bucket, key, sha256, size), never tensors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Phase = Literal["fingerprint", "plan", "train", "validate"]


class ArtifactRef(BaseModel):
    bucket: str
    key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TrainingOptions(BaseModel):
    """What a site needs to run nnU-Net; derived from the experiment spec."""

    configuration: str
    fold: int | Literal["all"]
    trainer: str = "nnUNetTrainer"
    plans_identifier: str = "nnUNetPlans"
    method: Literal["ffe", "asym"] = "ffe"
    rounds: int = 1
    local_epochs: int = 1
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    device: str = "cuda"
    seed: int = 12345
    export_npz: bool = False
    extra_trainer_kwargs: dict[str, Any] = Field(default_factory=dict)


class SiteTask(BaseModel):
    """One unit of work for one site: a phase (and round) of one experiment."""

    experiment_id: str
    site_id: str
    phase: Phase
    round: int = 0
    attempt: int = 1
    options: TrainingOptions
    # Inputs, by phase: merged fingerprint (plan, FFE), global weights (train, round>1),
    # expected plans hash (train, FFE).
    merged_fingerprint: ArtifactRef | None = None
    global_weights: ArtifactRef | None = None
    plans_sha256: str | None = None


class SiteReport(BaseModel):
    """What a site sends back to the coordinator queue when a task ends."""

    experiment_id: str
    site_id: str
    phase: Phase
    round: int = 0
    attempt: int = 1
    ok: bool
    error: str | None = None
    # False for errors that another attempt cannot fix (e.g. a malformed dataset).
    retryable: bool = True
    artifact: ArtifactRef | None = None
    plans_sha256: str | None = None
    num_cases: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    seconds: float = 0.0


class ProgressEvent(BaseModel):
    """Transient progress published on a topic exchange while a task runs."""

    experiment_id: str
    site_id: str
    kind: Literal["heartbeat", "progress", "egress"]
    phase: Phase | None = None
    round: int = 0
    epoch: int | None = None
    iteration: int | None = None
    of_iterations: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    time: float = 0.0
