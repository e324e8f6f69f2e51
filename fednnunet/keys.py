"""Names of queues, buckets and object keys: one place, pure functions.

Every artifact is keyed by (experiment, phase, round, site) and written once.
Site uploads live in the site's own bucket so that per-site S3 credentials can
be scoped by bucket; what the coordinator publishes to the sites lives in the
global bucket, which sites may only read; what it keeps about the sites (history,
journal, plots) lives in the coordinator bucket, which no site may read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fednnunet.phases import Phase

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

# Folders of an experiment's objects besides its phases (Phase.FINGERPRINT ... VALIDATE).
JOURNAL = "journal"  # state snapshots, one per transition
HISTORY = "history"  # one RoundRecord per closed round, written once
FINAL = "final"  # the summary of a finished experiment
PLOTS = "plots"  # progress pictures

# What each phase's report must point at (in the reporting site's own bucket).
PHASE_ARTIFACT_NAMES = {
    Phase.FINGERPRINT: "fingerprint_summary.json",
    Phase.PLAN: "plans.json",
    Phase.TRAIN: "update.safetensors",
}
# A site's own record of a finished task, read back when the task is delivered again.
SITE_REPORT_NAME = "report.json"


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


def artifact_key(experiment: str, folder: str, round_: int, site: str, name: str) -> str:
    """Object key of one artifact: ``{experiment}/{folder}/r{round:05d}/{site}/{name}``.

    ``folder``: a :class:`Phase` or one of JOURNAL, HISTORY, FINAL, PLOTS; ``site``: a
    site id, or GLOBAL_SITE for what the coordinator writes.
    """
    return f"{experiment}/{folder}/r{round_:05d}/{site}/{name}"


@dataclass(frozen=True)
class ArtifactKey:
    """The parts of an object key (see :func:`artifact_key`)."""

    experiment: str
    folder: str
    round: int
    site: str
    name: str


def parse_artifact_key(key: str) -> ArtifactKey | None:
    """The parts of a key written by :func:`artifact_key`, or None for any other key."""
    parts = key.split("/")
    if len(parts) != 5 or not re.fullmatch(r"r\d{5,}", parts[2]):
        return None
    experiment, folder, round_, site, name = parts
    return ArtifactKey(experiment, folder, int(round_[1:]), site, name)


def rounds_of(keys: Iterable[str], key_of: Callable[[int], str]) -> dict[int, str]:
    """Round -> key, for the listed keys that are ``key_of(round)`` (e.g. one experiment's
    global weights, or one site's updates); every other key is ignored."""
    out = {}
    for key in keys:
        parts = parse_artifact_key(key)
        if parts is not None and key == key_of(parts.round):
            out[parts.round] = key
    return out


def experiment_prefix(experiment: str) -> str:
    """The prefix of every object of one experiment."""
    return f"{experiment}/"


def folder_prefix(experiment: str, folder: str, round_: int | None = None) -> str:
    """The prefix of an experiment's objects in one folder (and round, if given)."""
    prefix = f"{experiment}/{folder}/"
    return prefix if round_ is None else f"{prefix}r{round_:05d}/"


def global_weights_key(experiment: str, round_: int) -> str:
    """The global model after ``round_`` (round 0: the operator's pretrained model)."""
    return artifact_key(experiment, Phase.TRAIN, round_, GLOBAL_SITE, "weights.safetensors")


def site_update_key(experiment: str, round_: int, site: str) -> str:
    """A site's trained weights for one round (in its own bucket)."""
    return artifact_key(experiment, Phase.TRAIN, round_, site, PHASE_ARTIFACT_NAMES[Phase.TRAIN])


def site_report_key(experiment: str, phase: Phase, round_: int, site: str) -> str:
    """A site's record of the report it sent for (phase, round) (in its own bucket)."""
    return artifact_key(experiment, phase, round_, site, SITE_REPORT_NAME)


def merged_fingerprint_key(experiment: str) -> str:
    return artifact_key(experiment, Phase.FINGERPRINT, 0, GLOBAL_SITE, "dataset_fingerprint.json")


def final_summary_key(experiment: str) -> str:
    return artifact_key(experiment, FINAL, 0, GLOBAL_SITE, "summary.json")


def history_key(experiment: str, round_: int) -> str:
    return artifact_key(experiment, HISTORY, round_, GLOBAL_SITE, "round.json")


def journal_key(experiment: str, round_: int, seq: int, phase: str) -> str:
    """One state snapshot; the name sorts by ``seq``, so the latest is the largest."""
    return artifact_key(experiment, JOURNAL, round_, GLOBAL_SITE, f"{seq:06d}-{phase}.json")


def plot_key(experiment: str, round_: int) -> str:
    return artifact_key(experiment, PLOTS, round_, GLOBAL_SITE, "progress.png")


def progress_routing_key(experiment: str, site: str, kind: str) -> str:
    return f"{experiment}.{site}.{kind}"


def site_artifact_key(experiment: str, phase: Phase, round_: int, site: str) -> str | None:
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
    return global_weights_key(experiment, 0)


def async_closed_key(experiment: str) -> str:
    """Written once when an async train phase ends: sites abandon the epoch in flight."""
    return artifact_key(experiment, Phase.TRAIN, 0, GLOBAL_SITE, "closed.json")
