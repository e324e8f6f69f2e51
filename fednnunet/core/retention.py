"""Which rounds' weights stay in S3 (sync mode): pure decisions, no I/O.

Every round stores one update per site and one global (0.5 GB a round for three
3d_fullres sites): kept forever, a 1000-round experiment fills 0.5 TB. Only the last
``keep`` rounds are kept; each round deletes what just fell out of that window, so the
cost stays one DELETE per site and one per round, whatever the round number.

Why ``keep >= 2`` is safe: round r's tasks are sent only after round r-1 closed, and a
coordinator that dies before saving that closure closes round r-1 again from round
r-1's updates and round r-2's global (the previous one). Nothing reads round r-2's
updates, or any older global, once round r has been sent. The global a site starts
round r from is round r-1's, and the best global (``checkpoint_best.pth``) and the
operator's initial model (round 0) are never deleted.
"""

from __future__ import annotations

from collections.abc import Iterable

# Sync mode's default window (the spec's ``keep_rounds`` unset): one round of slack
# above the minimum of 2.
DEFAULT_KEEP_ROUNDS = 3
MIN_KEEP_ROUNDS = 2


def kept_rounds(keep_rounds: int | None, mode: str) -> int | None:
    """How many recent rounds' weights stay in S3; None: every round's.

    ``keep_rounds``: the spec's option (None: the default; 0: keep all). Async mode keeps
    every version: a stale update's delta is formed against the version it started from.
    """
    if mode != "sync" or keep_rounds == 0:
        return None
    return DEFAULT_KEEP_ROUNDS if keep_rounds is None else keep_rounds


def expired_update_round(task_round: int, keep: int | None) -> int | None:
    """The round whose update a site deletes when it has sent round ``task_round``'s."""
    if keep is None:
        return None
    expired = task_round - keep
    return expired if expired >= 1 else None


def expired_globals(
    closed_round: int, keep: int | None, best: int | None, best_before: int | None
) -> list[int]:
    """The globals to delete once ``closed_round``'s global is published and saved.

    ``best``/``best_before``: the best global's round after and before this round closed
    (a best that moves on may leave the window behind it)."""
    if keep is None:
        return []
    out = set()
    oldest_kept = closed_round - keep + 1
    if 1 <= closed_round - keep != best:
        out.add(closed_round - keep)
    if best_before is not None and best_before != best and 1 <= best_before < oldest_kept:
        out.add(best_before)
    return sorted(out)


def stale_at_end(
    rounds: Iterable[int], last_round: int, keep: int | None, best: int | None = None
) -> list[int]:
    """Of the stored rounds, those the window no longer holds at the end of training:
    the sweep for what a restarted or absent process left behind (one LIST a run)."""
    if keep is None:
        return []
    return sorted(r for r in set(rounds) if 1 <= r <= last_round - keep and r != best)
