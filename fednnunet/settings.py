"""Runtime settings, read from ``FEDNNUNET_*`` environment variables (and CLI flags).

nnU-Net's own variables (``nnUNet_raw``, ``nnUNet_preprocessed``,
``nnUNet_results``) keep their nnU-Net names so that a site's existing nnU-Net
setup just works.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Credentials that ship with the code (local stack, demo, tests). Anyone can read them,
# so a real deployment must not run with them: refused unless FEDNNUNET_DEVELOPMENT=true.
DEVELOPMENT_S3_KEYS = ("fednnunet", "fednnunet-secret")
DEVELOPMENT_BROKER_LOGINS = (("guest", "guest"),)


def redact_url(url: str) -> str:
    """A URL without its user and password (for errors, logs and ``doctor``)."""
    return re.sub(r"//[^/@]*@", "//***@", url)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FEDNNUNET_", extra="ignore", env_ignore_empty=True
    )

    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Prefix of every Redis key: two deployments (or test runs) can share one Redis.
    redis_namespace: str = Field(default="fednnunet", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    s3_endpoint: str = "127.0.0.1:8333"
    s3_access_key: str = "fednnunet"
    s3_secret_key: str = "fednnunet-secret"  # noqa: S105 - documented dev-only default
    s3_secure: bool = False
    s3_ca_file: str | None = None
    s3_region: str = "us-east-1"
    bucket_prefix: str = "fednnunet"
    # Site-side settings: which site this worker is, and which local dataset it trains.
    site_id: str | None = None
    dataset_id: int | None = None
    # YAML file bounding what this site runs (fednnunet/site/policy.py); none: no limits.
    site_policy: str | None = None
    # Where a site records every object it uploads (hospital IT audits this file).
    egress_log: str | None = None
    # Local development stack: allows the well-known credentials above, and lets a
    # message from the shared broker user (everyone is one user there) speak for any site.
    development: bool = False
    # Broker users (besides the coordinator's own) allowed to start and cancel experiments.
    operator_users: list[str] = Field(default_factory=lambda: ["coordinator", "operator"])
    # Seconds between a site's heartbeats while it works on a task.
    heartbeat_interval_s: float = 5.0
    # Largest object a site may upload or the coordinator accept (bytes).
    max_object_bytes: int = 2 * 1024**3
    # Threads and augmentation workers for nnU-Net on this site (0 = nnU-Net default).
    torch_threads: int = 0
    # Simulation only (benchmarks, demos): this site's local epochs take k times longer
    # (it sleeps (k-1) x the measured epoch time after each). 1 = off.
    slowdown: float = Field(default=1.0, ge=1.0, le=100.0)
    da_processes: int = Field(default=-1, description="nnUNet_n_proc_DA; -1 keeps nnU-Net's")
    # Coordinator: render the per-round progress picture into S3 (FEDNNUNET_PLOTS=false: off).
    plots: bool = True
    # ... at most every this many seconds (and once at the end of the experiment).
    plot_every_s: float = Field(default=30.0, ge=0)
    # A local-only nnU-Net run of this site (fold folder or its validation/summary.json):
    # its Dice is reported beside the federated one for comparison.
    local_baseline: str | None = None
    # Tests and benchmarks only: ``module:factory`` of a site backend that replaces
    # nnU-Net (e.g. tests.support.standin:StandInBackend); unset: nnU-Net.
    site_backend: str | None = None

    @model_validator(mode="after")
    def _no_development_credentials_in_production(self) -> Settings:
        if self.development:
            return self
        found = []
        if (self.s3_access_key, self.s3_secret_key) == DEVELOPMENT_S3_KEYS:
            found.append("FEDNNUNET_S3_ACCESS_KEY/FEDNNUNET_S3_SECRET_KEY")
        url = urlsplit(self.broker_url)
        login = (unquote(url.username or ""), unquote(url.password or ""))
        if login in DEVELOPMENT_BROKER_LOGINS:
            found.append("FEDNNUNET_BROKER_URL")
        if found:
            raise ValueError(
                f"{' and '.join(found)} hold the well-known development credentials; "
                "use your own (deploy/README.md) or set FEDNNUNET_DEVELOPMENT=true "
                "for a local test stack"
            )
        return self


def nnunet_paths() -> dict[str, Path | None]:
    """The three nnU-Net folders as nnU-Net itself reads them (None if unset)."""
    out: dict[str, Path | None] = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        val = os.environ.get(var)
        out[var] = Path(val) if val else None
    return out


def require_nnunet_paths(*names: str) -> dict[str, Path]:
    """Return the named nnU-Net folders or raise one clear error naming what is missing."""
    from fednnunet.errors import FedError

    paths = nnunet_paths()
    missing = [n for n in names if paths.get(n) is None]
    if missing:
        raise FedError(
            "nnU-Net environment variable(s) not set: "
            + ", ".join(missing)
            + " (export them as for plain nnU-Net)"
        )
    return {n: paths[n] for n in names}  # type: ignore[misc]


def get_settings(**overrides: object) -> Settings:
    """Settings from FEDNNUNET_* variables and overrides; a bad value is one clear line."""
    from pydantic import ValidationError

    from fednnunet.errors import FedError

    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as err:
        problems = "; ".join(
            (f"FEDNNUNET_{'_'.join(str(p) for p in e['loc']).upper()}: " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ")
            for e in err.errors()
        )
        raise FedError(f"invalid setting(s): {problems}") from None


def resolve_under(root: Path, *parts: str) -> Path:
    """``root/parts...``, refusing anything that would resolve outside ``root`` (a name
    sent by the coordinator must never reach a file outside the nnU-Net folders)."""
    from fednnunet.errors import PolicyRefusal

    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root.resolve()):
        raise PolicyRefusal(f"path {'/'.join(parts)!r} leaves {root}")
    return path
