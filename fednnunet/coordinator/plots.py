"""Progress pictures (PNG): per-site and case-weighted train loss and local pseudo-Dice
per round, and the global model's pseudo-Dice at each site (federated evaluation)."""

from __future__ import annotations

import io

from fednnunet.core.global_eval import GLOBAL_PSEUDO_DICE
from fednnunet.core.state_machine import ExperimentState

METRICS = (("train_loss", "train loss"), ("pseudo_dice", "pseudo-Dice"))


def global_series(state: ExperimentState, metric: str) -> list[float | None]:
    """Case-weighted mean of the participants' metric, per round."""
    out: list[float | None] = []
    for record in state.history:
        num = den = 0.0
        for site in record.participants:
            value = record.metrics.get(site, {}).get(metric)
            cases = record.num_cases.get(site, 0)
            if value is not None and cases:
                num += value * cases
                den += cases
        out.append(num / den if den else None)
    return out


def global_model_series(
    state: ExperimentState,
) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, float, float | None]]]:
    """The global model's scores by the round that produced it (0: the starting model):
    per site ``[(round, pseudo-Dice)]`` and case-weighted ``[(round, Dice, EMA)]``."""
    per_site: dict[str, list[tuple[int, float]]] = {s: [] for s in state.sites}
    weighted: list[tuple[int, float, float | None]] = []
    evaluations = [
        (r.round - 1, r.metrics, r.global_dice, r.global_dice_ema) for r in state.history
    ]
    if state.final_global_eval:  # the last global, scored in the evaluate phase
        last = state.rounds_closed
        final_ema = state.global_dice_ema if state.final_global_dice is not None else None
        evaluations.append((last, state.final_global_eval, state.final_global_dice, final_ema))
    for global_round, metrics, dice, ema in evaluations:
        for site, values in metrics.items():
            if GLOBAL_PSEUDO_DICE in values and site in per_site:
                per_site[site].append((global_round, values[GLOBAL_PSEUDO_DICE]))
        if dice is not None:
            weighted.append((global_round, dice, ema))
    return per_site, weighted


def _global_model_panel(ax, state: ExperimentState) -> None:
    per_site, weighted = global_model_series(state)
    for site, points in per_site.items():
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", linewidth=1, label=f"site {site}")
    if weighted:
        xs = [p[0] for p in weighted]
        ax.plot(xs, [p[1] for p in weighted], color="black", linewidth=2.5, label="case-weighted")
        ema = [(p[0], p[2]) for p in weighted if p[2] is not None]
        if ema:
            ax.plot(*zip(*ema, strict=True), color="black", linestyle="--", label="EMA (best rule)")
    if state.best_global_round is not None:
        ax.axvline(state.best_global_round, color="green", alpha=0.5, label="best global")
    ax.set_title("global model pseudo-Dice at each site")
    ax.set_xlabel("global after round")


def build_figure(state: ExperimentState):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 4), dpi=100)
    rounds = [r.round for r in state.history]
    axes = [fig.add_subplot(1, len(METRICS) + 1, i + 1) for i in range(len(METRICS) + 1)]
    for ax, (metric, title) in zip(axes, METRICS, strict=False):
        for site in state.sites:
            xs = [r.round for r in state.history if metric in r.metrics.get(site, {})]
            ys = [
                r.metrics[site][metric] for r in state.history if metric in r.metrics.get(site, {})
            ]
            if xs:
                ax.plot(xs, ys, marker=".", linewidth=1, label=f"site {site}")
        glob = global_series(state, metric)
        pts = [(x, y) for x, y in zip(rounds, glob, strict=True) if y is not None]
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                color="black",
                linewidth=2.5,
                label="global (case-weighted)",
            )
        ax.set_title(f"{title} (local, after training)")
        ax.set_xlabel("global version" if state.options.mode == "async" else "round")
    _global_model_panel(axes[-1], state)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no round 1.5
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    prog = state.asynchronous
    opts = state.options
    if prog is not None:
        where = (
            f"async, version {prog.version}, {prog.consumed_epochs}/{prog.target_epochs} "
            "site-epochs ("
            + ", ".join(f"{s}: {prog.applied_epochs.get(s, 0)}" for s in state.sites)
            + ")"
        )
    else:
        where = f"round {len(state.history)}/{opts.rounds}"
    fig.suptitle(f"{state.experiment_id} ({opts.method}) — {where}")
    fig.tight_layout()
    return fig


def render_png(state: ExperimentState) -> bytes:
    fig = build_figure(state)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
