"""The retention window (core/retention.py), checked by simulating whole experiments."""

from __future__ import annotations

import random

import pytest

from fednnunet.core.retention import expired_globals, expired_update_round, stale_at_end


@pytest.mark.parametrize("seed", range(20))
def test_round_by_round_deletes_leave_exactly_the_window_and_the_best(seed):
    rng = random.Random(seed)  # noqa: S311 - test data
    rounds, keep = rng.randint(1, 40), rng.randint(2, 6)
    stored, updates = {0}, set()
    best = None
    for r in range(1, rounds + 1):
        updates.add(r)  # the site sends round r's update, then deletes the expired one
        if (gone := expired_update_round(r, keep)) is not None:
            updates.discard(gone)
        stored.add(r)  # round r's global; this round's scores may make r-1 the best
        best_before = best
        if r > 1 and rng.random() < 0.3:
            best = r - 1
        for g in expired_globals(r, keep, best, best_before):
            assert g in stored and g != best and g >= 1
            stored.discard(g)
        # Never deleted while needed: round r+1 starts from global r; a coordinator that
        # closes round r again reads round r's updates and global r-1.
        assert {r, r - 1} <= stored
        assert r in updates
    window = {r for r in range(1, rounds + 1) if r > rounds - keep}
    assert stored == window | {0} | ({best} if best is not None else set())
    assert updates == window


def test_the_end_sweep_removes_what_a_restart_left_and_keeps_the_best():
    assert stale_at_end([0, 1, 2, 3, 7, 9, 10], last_round=10, keep=3, best=2) == [1, 3, 7]
    assert stale_at_end([1, 2, 3], last_round=3, keep=None) == []


def test_without_a_window_nothing_expires():
    assert expired_update_round(50, None) is None
    assert expired_globals(50, None, 3, 2) == []
    assert expired_update_round(2, 2) is None  # round 0 is never a site's update
