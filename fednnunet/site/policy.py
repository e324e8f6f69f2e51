"""What a hospital agrees to run: the site checks every task against its own policy.

``FEDNNUNET_SITE_POLICY`` names a YAML file, e.g.::

    allowed_trainers: [nnUNetTrainer]
    allowed_configurations: [2d, 3d_fullres]
    max_rounds: 1000
    max_local_epochs: 5
    max_iterations_per_epoch: 500
    max_upload_mb: 200
    keep_own_updates: true   # never delete this site's uploads (the spec's keep_rounds)

A task outside the policy is refused with a clear, non-retryable error before
anything runs. Without a file, only the built-in checks apply (names that become
paths are plain names, checked by the task schema itself).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError

from fednnunet.errors import FedError
from fednnunet.messages import SiteTask


class SitePolicy(BaseModel):
    model_config = {"extra": "forbid"}

    allowed_trainers: list[str] | None = None
    allowed_configurations: list[str] | None = None
    max_rounds: int | None = Field(default=None, ge=1)
    max_local_epochs: int | None = Field(default=None, ge=1)
    max_iterations_per_epoch: int | None = Field(default=None, ge=1)
    max_upload_mb: float | None = Field(default=None, gt=0)
    # The spec's keep_rounds makes a site delete its own old updates; a site that wants
    # them kept in its bucket (its own audit trail) keeps them. Globals are not its own.
    keep_own_updates: bool = False

    def refusal(self, task: SiteTask) -> str | None:
        """Why this site will not run ``task`` (None: allowed)."""
        o = task.options
        checks = [
            (self.allowed_trainers, o.trainer, "trainer"),
            (self.allowed_configurations, o.configuration, "configuration"),
        ]
        for allowed, value, what in checks:
            if allowed is not None and value not in allowed:
                return f"{what} {value!r} is not allowed here (allowed: {', '.join(allowed)})"
        limits = [
            (self.max_rounds, o.rounds, "rounds"),
            (self.max_local_epochs, o.local_epochs, "local epochs"),
            (self.max_iterations_per_epoch, o.iterations_per_epoch, "iterations per epoch"),
        ]
        for limit, value, what in limits:
            if limit is not None and value > limit:
                return f"{value} {what} exceed this site's limit of {limit}"
        return None

    @property
    def max_upload_bytes(self) -> int | None:
        return None if self.max_upload_mb is None else int(self.max_upload_mb * 1e6)


def load_policy(path: str | None) -> SitePolicy:
    """The site policy from a YAML file (no file: no limits beyond the built-in checks)."""
    if not path:
        return SitePolicy()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return SitePolicy.model_validate(data)
    except OSError as exc:
        raise FedError(f"site policy {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise FedError(f"site policy {path} is not valid YAML: {exc}") from None
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'policy'}: {e['msg']}" for e in err.errors()
        )
        raise FedError(f"site policy {path}: {problems}") from None
