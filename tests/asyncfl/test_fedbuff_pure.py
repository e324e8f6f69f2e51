"""FedBuff's pure parts against independent references written here."""

from __future__ import annotations

import math

import pytest
import torch

from fednnunet.core import async_rounds as asy
from fednnunet.core import state_machine as sm
from fednnunet.core.fedbuff import StreamingFedBuff, buffer_weights, staleness_weight
from fednnunet.messages import ArtifactRef, ExperimentOptions, SiteReport
from fednnunet.phases import Phase


@pytest.mark.parametrize("tau,a", [(0, 0.5), (1, 0.5), (3, 0.5), (8, 1.0), (5, 0.0)])
def test_staleness_weight_is_one_over_root_one_plus_tau(tau, a):
    assert staleness_weight(tau, a) == pytest.approx(1.0 / math.pow(1 + tau, a))


def test_staleness_weight_refuses_negative_staleness():
    with pytest.raises(ValueError):
        staleness_weight(-1, 0.5)


def test_buffer_weights_are_normalised_staleness_times_cases():
    got = buffer_weights([(0, 10), (3, 10), (1, 4)], 0.5)
    raw = [10 / 1.0, 10 / 2.0, 4 / math.sqrt(2)]
    assert got == pytest.approx([r / sum(raw) for r in raw])


def test_streaming_fedbuff_matches_an_explicit_formula():
    gen = torch.Generator().manual_seed(0)
    names = ["w", "b"]
    cur = {n: torch.randn(4, 3, generator=gen) for n in names} | {"count": torch.tensor(7)}
    bases = [{n: torch.randn(4, 3, generator=gen) for n in names} for _ in range(3)]
    ups = [
        {n: torch.randn(4, 3, generator=gen) for n in names} | {"count": torch.tensor(1)}
        for _ in range(3)
    ]
    factors = [2.0, 0.5, 1.25]
    acc = StreamingFedBuff(names + ["count"])
    for u, b, f in zip(ups, bases, factors, strict=True):
        acc.add(u, b | {"count": torch.tensor(0)}, f)
    out = acc.apply(cur, server_lr=0.7)
    for n in names:
        mean_delta = sum(f * (u[n] - b[n]) for u, b, f in zip(ups, bases, factors, strict=True))
        expected = cur[n] + 0.7 * mean_delta / sum(factors)
        assert torch.allclose(out[n], expected, atol=1e-6)
    assert int(out["count"]) == 7  # counters are not averaged deltas


def _state(buffer_size=2, max_staleness=None, rounds=2):
    options = ExperimentOptions(
        method="ffe",
        rounds=rounds,
        mode="async",
        buffer_size=buffer_size,
        max_staleness=max_staleness,
    )
    state = sm.new_experiment("e", ["a", "b", "c"], options, 0.0)
    assert state.asynchronous.target_epochs == rounds * 3
    state.phase = Phase.TRAIN
    state.round = 1
    state.declared_cases = {"a": 10, "b": 20, "c": 5}
    state.sites_status = {s: sm.SiteStatus() for s in state.sites}
    asy.open_async(state, 0.0)
    return state


REF = ArtifactRef(bucket="b", key="k", sha256="0" * 64, size=1)


def _report(site, epoch, base):
    return SiteReport(
        experiment_id="e",
        site_id=site,
        phase="train",
        round=epoch,
        ok=True,
        artifact=REF,
        num_cases={"a": 10, "b": 20, "c": 5}[site],
        base_version=base,
    )


def _dispatch_all(state, now):
    for action in sm.next_actions(state, now):
        if isinstance(action, sm.Dispatch):
            sm.apply_dispatched(state, action, now)


def test_async_dispatch_buffer_and_version_bookkeeping():
    s = _state()
    _dispatch_all(s, 1.0)
    assert s.asynchronous.site_epoch == {"a": 1, "b": 1, "c": 1}
    assert sm.apply_report(s, _report("a", 1, 0), 2.0)
    # The same delivery again (redelivered message): ignored, buffered once.
    assert not sm.apply_report(s, _report("a", 1, 0), 2.1)
    acts = sm.next_actions(s, 2.2)
    assert not any(isinstance(a, asy.ApplyBuffer) for a in acts)
    assert [a.round for a in acts if isinstance(a, sm.Dispatch)] == [2]  # a goes on at once
    for a in acts:
        sm.apply_dispatched(s, a, 2.2)
    assert sm.apply_report(s, _report("b", 1, 0), 3.0)
    acts = sm.next_actions(s, 3.1)
    assert isinstance(acts[0], asy.ApplyBuffer) and len(acts[0].updates) == 2
    keys = [s.asynchronous.key(u) for u in acts[0].updates]
    asy.apply_version(
        s, acts[0], asy.VersionResult(REF, keys, weights=dict.fromkeys(keys, 0.5)), 3.2
    )
    assert s.asynchronous.version == 1 and s.asynchronous.consumed_epochs == 2
    assert s.asynchronous.buffer == []
    # Applying the same version again (a replayed action) changes nothing.
    asy.apply_version(s, acts[0], asy.VersionResult(REF, keys), 3.3)
    assert s.asynchronous.version == 1 and s.asynchronous.consumed_epochs == 2
    for a in sm.next_actions(s, 3.4):
        sm.apply_dispatched(s, a, 3.4)
    assert s.asynchronous.site_base["b"] == 1 and s.asynchronous.site_base["a"] == 0
    # a's epoch 2 started from version 0: staleness 1; a claim of another base is refused.
    claim = _report("a", 2, 1)
    claim.artifact = ArtifactRef(
        bucket="p-site-a", key="e/train/r00002/a/update.safetensors", sha256="0" * 64, size=1
    )
    assert "base version" in sm.report_problem(s, claim, "p")
    assert sm.apply_report(s, _report("a", 2, 0), 4.0)
    assert s.asynchronous.last_staleness["a"] == 1


def test_async_refuses_updates_older_than_max_staleness():
    s = _state(buffer_size=1, max_staleness=0)
    _dispatch_all(s, 1.0)
    sm.apply_report(s, _report("a", 1, 0), 2.0)
    act = sm.next_actions(s, 2.1)[0]
    keys = [s.asynchronous.key(u) for u in act.updates]
    asy.apply_version(s, act, asy.VersionResult(REF, keys, weights={keys[0]: 1.0}), 2.2)
    sm.apply_report(s, _report("b", 1, 0), 3.0)  # b started at version 0, now 1: tau 1 > 0
    assert s.asynchronous.stale_refused == 1 and s.asynchronous.buffer == []
    assert s.sites_status["b"].state == "done"  # refused, but it gets the next epoch


def test_async_ends_at_the_target_after_applying_the_last_buffer():
    s = _state(buffer_size=10, rounds=1)
    _dispatch_all(s, 1.0)
    for site in "abc":
        sm.apply_report(s, _report(site, 1, 0), 2.0)
    acts = sm.next_actions(s, 2.1)
    assert len(acts) == 1 and isinstance(acts[0], asy.ApplyBuffer) and acts[0].final
    assert sm.async_complete(s, 2.1) is None  # the buffer must be applied first
    keys = [s.asynchronous.key(u) for u in acts[0].updates]
    asy.apply_version(s, acts[0], asy.VersionResult(REF, keys), 2.2)
    assert sm.async_complete(s, 2.3) == "3 site-epochs consumed"
    sm.apply_async_closed(s, "3 site-epochs consumed", 2.3)
    assert s.phase == "evaluate"  # the last version is scored everywhere, then validated


def test_async_ends_at_max_wall_s():
    s = _state(rounds=30)
    s.options = s.options.model_copy(update={"max_wall_s": 10})
    _dispatch_all(s, 1.0)
    assert sm.async_complete(s, 5.0) is None
    assert sm.async_complete(s, 11.0) == "max_wall_s=10 reached"


def test_status_and_watch_show_versions_epochs_staleness_and_idle():
    from rich.console import Console

    from fednnunet.cli.view import render, status_dict

    s = _state()
    _dispatch_all(s, 1.0)
    sm.record_busy(s, _report("a", 1, 0).model_copy(update={"seconds": 4.0}))
    sm.apply_report(s, _report("a", 1, 0), 5.0)
    info = status_dict(s, {}, {}, {})
    assert info["mode"] == "async"
    assert info["asynchronous"]["sites"]["a"]["current_epoch"] == 1
    assert info["asynchronous"]["sites"]["a"]["last_staleness"] == 0
    assert info["time_use"]["a"]["busy_s"] == 4.0
    console = Console(width=160, record=True)
    console.print(render(s, {}, {}, {}))
    text = console.export_text()
    assert "version 0, 0/6 site-epochs" in text
    assert "staleness" in text and "idle" in text


def _scored(site, epoch, base, dice):
    report = _report(site, epoch, base)
    report.metrics = {"global_pseudo_dice": dice}
    return report


def _apply_next(s, now, ref):
    act = next(a for a in sm.next_actions(s, now) if isinstance(a, asy.ApplyBuffer))
    keys = [s.asynchronous.key(u) for u in act.updates]
    asy.apply_version(s, act, asy.VersionResult(ref, keys, weights=dict.fromkeys(keys, 0.5)), now)
    for a in sm.next_actions(s, now):
        if isinstance(a, sm.Dispatch):
            sm.apply_dispatched(s, a, now)


def test_async_best_global_follows_the_ema_of_fresh_scores_and_ends_after_evaluate():
    """Each version is scored by the updates that started from it (case-weighted over the
    declared cases); stale updates' scores of older versions stay out; nnU-Net's EMA
    (0.9 old + 0.1 new) picks the best version; the evaluate phase scores the last one."""
    s = _state(buffer_size=2, rounds=3)
    v1 = ArtifactRef(bucket="g", key="v1", sha256="1" * 64, size=1)
    v2 = ArtifactRef(bucket="g", key="v2", sha256="2" * 64, size=1)
    _dispatch_all(s, 1.0)
    s.global_weights = REF  # version 0 exists (pretrained)
    sm.apply_report(s, _scored("a", 1, 0, 0.2), 2.0)
    sm.apply_report(s, _scored("b", 1, 0, 0.5), 2.0)
    _apply_next(s, 2.1, v1)
    v0_score = (0.2 * 10 + 0.5 * 20) / 30
    assert s.last_round.global_dice == pytest.approx(v0_score)
    assert s.best_global == REF and s.best_global_round == 0
    # a (from v1) scores v1 high; c still trains from v0 and scores it: not counted.
    sm.apply_report(s, _scored("a", 2, 1, 0.9), 3.0)
    sm.apply_report(s, _scored("c", 1, 0, 0.0), 3.0)
    _apply_next(s, 3.1, v2)
    ema = 0.9 * v0_score + 0.1 * 0.9
    assert s.last_round.global_dice == pytest.approx(0.9)
    assert s.global_dice_ema == pytest.approx(ema)
    assert s.best_global == v1 and s.best_global_round == 1
    sm.apply_async_closed(s, "wall", 3.2)
    assert s.phase == Phase.EVALUATE
    for site, dice in (("a", 0.0), ("b", 0.0), ("c", 0.0)):
        s.sites_status[site].report = _scored(site, 0, 2, dice)
    sm.apply_evaluated(s, 3.3)
    assert s.phase == Phase.VALIDATE
    assert s.final_global_dice == 0.0 and s.best_global == v1  # the worse last one loses
