"""Progress pictures: per-site and global train loss and pseudo-Dice per round (PNG)."""

from __future__ import annotations

import io

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


def build_figure(state: ExperimentState):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), dpi=100)
    rounds = [r.round for r in state.history]
    for i, (metric, title) in enumerate(METRICS):
        ax = fig.add_subplot(1, 2, i + 1)
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
        ax.set_title(title)
        ax.set_xlabel("global version" if state.options.mode == "async" else "round")
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
