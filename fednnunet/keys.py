"""Names of queues, buckets and object keys: one place, pure functions.

Every artifact is keyed by (experiment, phase, round, site) and written once.
Site uploads live in the site's own bucket so that per-site S3 credentials can
be scoped by bucket; what the coordinator publishes to the sites lives in the
global bucket, which sites may only read; what it keeps about the sites (history,
journal, plots) lives in the coordinator bucket, which no site may read.
"""

from __future__ import annotations

import re

SITE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
EXPERIMENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

COORDINATOR_QUEUE = "coordinator"
# Start/cancel requests: an exchange and queue that no site may write to.
CONTROL_EXCHANGE = "fednnunet.control"
CONTROL_QUEUE = "coordinator.control"
PROGRESS_EXCHANGE = "fednnunet.progress"
GLOBAL_SITE = "global"
# Experiment id of the heartbeats a site worker sends while it has no task (reserved).
IDLE_EXPERIMENT = "idle"

PHASE_FINGERPRINT = "fingerprint"
PHASE_PLAN = "plan"
PHASE_TRAIN = "train"
PHASE_VALIDATE = "validate"
PHASE_JOURNAL = "journal"
PHASE_HISTORY = "history"  # one RoundRecord per closed round, written once
PHASE_FINAL = "final"


# What each phase's report must point at (in the reporting site's own bucket).
PHASE_ARTIFACT_NAMES = {
    PHASE_FINGERPRINT: "fingerprint_summary.json",
    PHASE_PLAN: "plans.json",
    PHASE_TRAIN: "update.safetensors",
}


def site_user(site_id: str) -> str:
    """The broker user (and S3 access key) of a site: the identity the coordinator trusts."""
    return f"site-{site_id}"


def site_of_user(user: str | None) -> str | None:
    """Inverse of :func:`site_user` (None for any other user)."""
    if user and user.startswith("site-") and SITE_ID_RE.match(user[5:]):
        return user[5:]
    return None


def site_queue(site_id: str) -> str:
    return f"site.{site_id}"


def site_bucket(bucket_prefix: str, site_id: str) -> str:
    return f"{bucket_prefix}-site-{site_id}"


def global_bucket(bucket_prefix: str) -> str:
    """What every site may read: merged fingerprint, plans, global weights; nothing per site."""
    return f"{bucket_prefix}-global"


def coordinator_bucket(bucket_prefix: str) -> str:
    """What only the coordinator (and operators) may read: the journal, the round history
    with each site's case count, metrics and quarantine reasons, summaries and plots."""
    return f"{bucket_prefix}-coordinator"


def artifact_key(experiment: str, phase: str, round_: int, site: str, name: str) -> str:
    """Object key of one artifact: ``{experiment}/{phase}/r{round:05d}/{site}/{name}``."""
    return f"{experiment}/{phase}/r{round_:05d}/{site}/{name}"


def progress_routing_key(experiment: str, site: str, kind: str) -> str:
    return f"{experiment}.{site}.{kind}"


def site_artifact_key(experiment: str, phase: str, round_: int, site: str) -> str | None:
    """The one key a site's report for (phase, round) may reference (None: no artifact)."""
    name = PHASE_ARTIFACT_NAMES.get(phase)
    return None if name is None else artifact_key(experiment, phase, round_, site, name)


def parse_progress_routing_key(routing_key: str) -> tuple[str, str, str] | None:
    """(experiment, site, kind) of a progress routing key, or None if malformed."""
    parts = routing_key.split(".")
    if len(parts) != 3:
        return None
    experiment, site, kind = parts
    if not SITE_ID_RE.match(site) or not (
        experiment == IDLE_EXPERIMENT or EXPERIMENT_ID_RE.match(experiment)
    ):
        return None
    return experiment, site, kind


def initial_weights_key(experiment: str) -> str:
    """Round 0's global: the operator's pretrained model (``-pretrained_weights``)."""
    return artifact_key(experiment, PHASE_TRAIN, 0, GLOBAL_SITE, "weights.safetensors")
