"""Names of queues, buckets and object keys: one place, pure functions.

Every artifact is keyed by (experiment, phase, round, site) and written once.
Site uploads live in the site's own bucket so that per-site S3 credentials can
be scoped by bucket; everything the coordinator publishes lives in the global
bucket, which sites may only read.
"""

from __future__ import annotations

import re

SITE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
EXPERIMENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

COORDINATOR_QUEUE = "coordinator"
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


def site_queue(site_id: str) -> str:
    return f"site.{site_id}"


def site_bucket(bucket_prefix: str, site_id: str) -> str:
    return f"{bucket_prefix}-site-{site_id}"


def global_bucket(bucket_prefix: str) -> str:
    return f"{bucket_prefix}-global"


def artifact_key(experiment: str, phase: str, round_: int, site: str, name: str) -> str:
    """Object key of one artifact: ``{experiment}/{phase}/r{round:05d}/{site}/{name}``."""
    return f"{experiment}/{phase}/r{round_:05d}/{site}/{name}"


def progress_routing_key(experiment: str, site: str, kind: str) -> str:
    return f"{experiment}.{site}.{kind}"
