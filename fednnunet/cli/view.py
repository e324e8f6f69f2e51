"""Rendering of an experiment for humans (rich) and scripts (JSON)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fednnunet.core.state_machine import ExperimentState

_STATE_STYLE = {
    "pending": "dim",
    "queued": "yellow",
    "running": "cyan",
    "done": "green",
    "failed": "red",
    "late": "magenta",
}


def status_dict(
    state: ExperimentState,
    progress: dict[str, dict],
    moved: dict[str, int],
    heartbeats: dict[str, float],
) -> dict[str, Any]:
    now = time.time()
    return {
        "experiment_id": state.experiment_id,
        "method": state.method,
        "phase": state.phase,
        "round": state.round,
        "rounds": state.rounds,
        "error": state.error,
        "eta_s": eta_seconds(state, now),
        "sites": {
            s: {
                "state": st.state,
                "attempt": st.attempt,
                "error": st.error,
                "last_heartbeat_s_ago": round(now - heartbeats[s], 1) if s in heartbeats else None,
                "metrics": (
                    st.report.metrics if st.report else (progress.get(s, {}).get("metrics") or {})
                ),
                "bytes_moved": moved.get(s, 0),
            }
            for s, st in state.sites_status.items()
        },
        "history": [
            {
                "round": r.round,
                "participants": r.participants,
                "late": r.late,
                "quarantined": r.quarantined,
                "metrics": r.metrics,
                "aggregation_s": round(r.aggregation_s, 3),
                "wall_s": round(r.closed_at - r.opened_at, 3),
                "overhead_s": None if r.overhead_s() is None else round(r.overhead_s(), 3),
            }
            for r in state.history
        ],
        "final_metrics": state.final_metrics,
    }


def eta_seconds(state: ExperimentState, now: float) -> float | None:
    if state.phase != "train" or not state.history:
        return None
    first = state.history[0].opened_at
    per_round = (now - first) / max(1, len(state.history))
    return max(0.0, per_round * (state.rounds - len(state.history)))


def render(
    state: ExperimentState,
    progress: dict[str, dict],
    moved: dict[str, int],
    heartbeats: dict[str, float],
) -> Group:
    info = status_dict(state, progress, moved, heartbeats)
    head = Text.assemble(
        ("experiment ", "bold"),
        (state.experiment_id, "bold cyan"),
        f"  method {state.method}  phase ",
        (state.phase, "bold"),
    )
    parts: list[Any] = [head]
    if state.phase in ("train", "validate", "done") and state.rounds:
        completed = len(state.history)
        eta = info["eta_s"]
        parts.append(
            Text(
                f"round {min(state.round or completed, state.rounds)}/{state.rounds}"
                + (f"  ETA {eta:,.0f}s" if eta is not None else "")
            )
        )
        parts.append(ProgressBar(total=state.rounds, completed=completed, width=50))
    table = Table(show_header=True, header_style="bold")
    has_local = any("local_mean_dice" in m for m in state.final_metrics.values())
    columns = ["site", "state", "try", "progress", "loss", "pseudo-Dice", "Dice"]
    columns += ["local-only Dice"] if has_local else []
    for col in [*columns, "MB moved", "heartbeat"]:
        table.add_column(col)
    for site, row in info["sites"].items():
        prog = progress.get(site, {})
        it = prog.get("iteration")
        of = prog.get("of_iterations")
        metrics = row["metrics"] or {}
        last_round = state.history[-1].metrics.get(site, {}) if state.history else {}
        loss = metrics.get("train_loss", last_round.get("train_loss"))
        pdice = metrics.get("pseudo_dice", last_round.get("pseudo_dice"))
        dice = (state.final_metrics.get(site) or {}).get("mean_dice")
        hb = row["last_heartbeat_s_ago"]
        final = state.final_metrics.get(site) or {}
        local = final.get("local_mean_dice")
        cells = [
            site,
            Text(row["state"], style=_STATE_STYLE.get(row["state"], "")),
            str(row["attempt"]),
            f"ep {prog.get('epoch')} it {it}/{of}" if it is not None and of else "",
            f"{loss:.4f}" if isinstance(loss, float) else "",
            f"{pdice:.3f}" if isinstance(pdice, float) else "",
            f"{dice:.3f}" if isinstance(dice, float) else "",
        ]
        if has_local:
            cells.append(f"{local:.3f}" if isinstance(local, float) else "n/a")
        cells += [f"{row['bytes_moved'] / 1e6:.1f}", f"{hb:.0f}s ago" if hb is not None else ""]
        table.add_row(*cells)
    parts.append(table)
    if state.error:
        parts.append(Text(f"error: {state.error}", style="bold red"))
    return Group(*parts)
