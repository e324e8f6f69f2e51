"""Federated evaluation of the global model: case-weighted Dice and nnU-Net's EMA. Pure.

Each site scores the *incoming* global weights on its own validation cases (nnU-Net's
pseudo-Dice) before it trains; the coordinator combines the scores weighted by the
sites' declared training cases, smooths them with the exponential moving average
nnU-Net's logger keeps of its pseudo-Dice, and remembers the global with the best EMA
(nnU-Net's ``checkpoint_best.pth`` rule: strictly better than the best so far).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# The site's pseudo-Dice of the global it received (mean over foreground classes) and
# the per-class prefix; the full sliding-window Dice of ``eval_every`` rounds.
GLOBAL_PSEUDO_DICE = "global_pseudo_dice"
GLOBAL_DICE = "global_dice"

# nnUNetLogger.log: ema_fg_dice = 0.9 * previous EMA + 0.1 * mean_fg_dice (first: the value).
EMA_KEEP = 0.9


def is_dice(value: object) -> bool:
    """A Dice score a site may report: a finite number in [0, 1] (anything else is ignored)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0.0 <= value <= 1.0
    )


def case_weighted_dice(
    metrics: Mapping[str, Mapping[str, float]],
    cases: Mapping[str, int],
    sites: list[str],
    metric: str = GLOBAL_PSEUDO_DICE,
) -> float | None:
    """Mean of ``metric`` over ``sites`` weighted by their cases (None: no site has one)."""
    num = den = 0.0
    for site in sites:
        value = metrics.get(site, {}).get(metric)
        weight = cases.get(site, 0)
        if is_dice(value) and weight > 0:
            num += float(value) * weight  # type: ignore[arg-type]
            den += weight
    return num / den if den else None


def next_ema(previous: float | None, value: float) -> float:
    """nnU-Net's EMA of the pseudo-Dice, one more value."""
    return value if previous is None else EMA_KEEP * previous + (1.0 - EMA_KEEP) * value


def is_new_best(best_ema: float | None, ema: float) -> bool:
    """nnU-Net's on_epoch_end: a new best when there is none yet or the EMA is higher."""
    return best_ema is None or ema > best_ema
