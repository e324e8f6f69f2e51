"""Rendering of an experiment for humans (rich) and scripts (JSON)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fednnunet.core.global_eval import GLOBAL_PSEUDO_DICE
from fednnunet.core.state_machine import ExperimentState, RoundRecord
from fednnunet.phases import TERMINAL, Outcome, Phase

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
    history: list[RoundRecord] | None = None,
) -> dict[str, Any]:
    """``history``: the round records to list (default: those loaded with the state)."""
    now = time.time()
    history = state.history if history is None else history
    return {
        "experiment_id": state.experiment_id,
        "method": state.options.method,
        "phase": state.phase,
        "round": state.round,
        "rounds": state.options.rounds,
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
                # Federated evaluation of the global this round started from.
                "global_model": {
                    "of_round": r.round - 1,
                    "dice": r.global_dice,
                    "dice_ema": r.global_dice_ema,
                    "sites": _global_scores(r.metrics),
                },
            }
            for r in history
        ],
        "global_model": {
            "dice_ema": state.global_dice_ema,
            "best_round": state.best_global_round,
            "best_dice_ema": state.best_global_dice_ema,
            "final": {
                "of_round": state.rounds_closed,
                "dice": state.final_global_dice,
                "sites": _global_scores(state.final_global_eval),
            },
        },
        "final_metrics": state.final_metrics,
        "mode": state.options.mode,
        "time_use": time_use(state, now),
        "asynchronous": async_dict(state),
    }


def train_window(state: ExperimentState, now: float) -> tuple[float, float] | None:
    """(start, end) of the train phase: async from its opening, sync over its rounds."""
    prog = state.asynchronous
    if prog is not None and prog.opened_at is not None:
        return prog.opened_at, prog.closed_at or now
    if state.train_started_at is None or state.last_round is None:
        return None
    end = state.last_round.closed_at if state.phase != Phase.TRAIN else now
    return state.train_started_at, end


def time_use(state: ExperimentState, now: float) -> dict[str, dict[str, float]]:
    """Per site: seconds busy on train tasks, idle (waiting for the federation) and the
    idle fraction of the train phase's wall time."""
    window = train_window(state, now)
    if window is None:
        return {}
    wall = max(window[1] - window[0], 1e-9)
    out = {}
    for site in state.sites:
        busy = min(state.busy_s.get(site, 0.0), wall)
        out[site] = {
            "busy_s": round(busy, 3),
            "idle_s": round(wall - busy, 3),
            "idle_fraction": round((wall - busy) / wall, 4),
        }
    return out


def async_dict(state: ExperimentState) -> dict[str, Any] | None:
    prog = state.asynchronous
    if prog is None:
        return None
    return {
        "version": prog.version,
        "consumed_epochs": prog.consumed_epochs,
        "target_epochs": prog.target_epochs,
        "buffered": len(prog.buffer),
        "buffer_size": prog.buffer_size,
        "stale_refused": prog.stale_refused,
        "quarantined": prog.quarantined,
        "closed_reason": prog.closed_reason,
        "sites": {
            s: {
                "epochs_applied": prog.applied_epochs.get(s, 0),
                "current_epoch": prog.site_epoch.get(s, 0),
                "base_version": prog.site_base.get(s, 0),
                "last_staleness": prog.last_staleness.get(s),
            }
            for s in state.sites
        },
    }


def _global_scores(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Site -> its pseudo-Dice of the global model (sites that reported one)."""
    return {s: m[GLOBAL_PSEUDO_DICE] for s, m in metrics.items() if GLOBAL_PSEUDO_DICE in m}


def latest_global_score(state: ExperimentState, site: str) -> float | None:
    """The most recent score of a global model at ``site`` (evaluate phase, else rounds)."""
    if site in state.final_global_eval:
        return state.final_global_eval[site].get(GLOBAL_PSEUDO_DICE)
    st = state.sites_status.get(site)
    if st is not None and st.report is not None and GLOBAL_PSEUDO_DICE in st.report.metrics:
        return st.report.metrics[GLOBAL_PSEUDO_DICE]
    if state.last_round is not None:
        return state.last_round.metrics.get(site, {}).get(GLOBAL_PSEUDO_DICE)
    return None


def global_model_line(state: ExperimentState) -> str | None:
    """One line on the global model's federated evaluation, or None before the first."""
    if state.final_global_dice is not None:
        of_round, dice = state.rounds_closed, state.final_global_dice
    elif state.last_round is not None and state.last_round.global_dice is not None:
        of_round, dice = state.last_round.round - 1, state.last_round.global_dice
    else:
        return None
    line = f"global model after round {of_round}: pseudo-Dice {dice:.3f} (case-weighted)"
    if state.global_dice_ema is not None:
        line += f", EMA {state.global_dice_ema:.3f}"
    if state.best_global_round is not None and state.best_global_dice_ema is not None:
        line += f"; best: round {state.best_global_round} (EMA {state.best_global_dice_ema:.3f})"
    return line


def eta_seconds(state: ExperimentState, now: float) -> float | None:
    if state.phase != Phase.TRAIN or not state.rounds_closed or state.train_started_at is None:
        return None
    per_round = (now - state.train_started_at) / state.rounds_closed
    return max(0.0, per_round * (state.options.rounds - state.rounds_closed))


def round_summary(state: ExperimentState) -> str:
    """``round k/N`` while training, else how many of the N rounds were completed."""
    prog = state.asynchronous
    if prog is not None:
        return f"version {prog.version}, {prog.consumed_epochs}/{prog.target_epochs} site-epochs"
    completed = state.rounds_closed
    if state.phase == Phase.TRAIN and state.round:
        return f"round {min(state.round, state.options.rounds)}/{state.options.rounds}"
    return f"{completed}/{state.options.rounds} rounds completed"


# Site table column -> how readily it is left out when the terminal is too narrow for
# every column with whole words (higher first; 0 never). Headers are never cut.
COLUMN_PRIORITY = {
    "site": 0,
    "state": 0,
    "Dice": 1,
    "local-only Dice": 1,
    "progress": 2,
    "fine-tuned Dice": 1,
    "loss": 3,
    "pseudo-Dice": 3,
    "global pseudo-Dice": 3,
    "try": 4,
    "MB moved": 5,
    "heartbeat": 6,
}
# Columns of the async train phase only (site-epochs applied, last staleness, idle share).
ASYNC_COLUMN_PRIORITY = {"epochs": 2, "staleness": 3, "idle": 4}


def _priority(column: str) -> int:
    return COLUMN_PRIORITY.get(column, ASYNC_COLUMN_PRIORITY.get(column, 9))


class SiteTable:
    """The per-site table, with as many columns as fit the width it is drawn at.

    Rich squeezes a too-wide table by cutting words (``progre…``), headers included.
    Here columns are sized so that every word stays whole: each column gets at least
    its longest word, spare width goes to the columns that would otherwise wrap, and
    the least important columns are left out (and named) when even that is too wide.
    """

    def __init__(self, columns: list[str], rows: list[list[Any]]) -> None:
        self.columns, self.rows = columns, rows

    def _texts(self, col: str) -> list[str]:
        i = self.columns.index(col)
        return [col] + [str(row[i]) for row in self.rows]

    def _natural(self, col: str) -> int:
        return max(len(t) for t in self._texts(col))

    def _longest_word(self, col: str) -> int:
        return max(len(w) for t in self._texts(col) for w in (t.split() or [""]))

    @staticmethod
    def _overhead(n_columns: int) -> int:
        return 3 * n_columns + 1  # padding 1 + 1 and a border per column, one more border

    def table(self, keep: list[str], widths: dict[str, int] | None = None) -> Table:
        table = Table(show_header=True, header_style="bold")
        for col in keep:
            table.add_column(col, width=(widths or {}).get(col))
        for row in self.rows:
            table.add_row(
                *(cell for col, cell in zip(self.columns, row, strict=True) if col in keep)
            )
        return table

    def fitting(self, max_width: int) -> tuple[Table, list[str]]:
        """The table that fits ``max_width`` without cutting a word; and the columns left out."""
        keep = list(self.columns)
        droppable = sorted(
            (c for c in keep if _priority(c) > 0),
            key=lambda c: (_priority(c), keep.index(c)),
        )

        def min_width() -> int:
            return sum(self._longest_word(c) for c in keep) + self._overhead(len(keep))

        while min_width() > max_width and droppable:
            keep.remove(droppable.pop())
        dropped = [c for c in self.columns if c not in keep]
        natural = {c: self._natural(c) for c in keep}
        if sum(natural.values()) + self._overhead(len(keep)) <= max_width:
            return self.table(keep), dropped
        widths = {c: self._longest_word(c) for c in keep}
        spare = max_width - min_width()
        for col in sorted(keep, key=lambda c: natural[c] - widths[c]):  # least wrapping first
            grow = min(spare, natural[col] - widths[col])
            widths[col] += grow
            spare -= grow
        return self.table(keep, widths), dropped

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table, dropped = self.fitting(options.max_width)
        yield table
        if dropped:
            yield Text(f"(left out, too narrow: {', '.join(dropped)})", style="dim")

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table(list(self.columns)))


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
        f"  method {state.options.method}  phase ",
        (state.phase, "bold"),
    )
    parts: list[Any] = [head]
    asyncp = state.asynchronous
    shows_rounds = (Phase.TRAIN, Phase.EVALUATE, Phase.VALIDATE, Outcome.DONE)
    if asyncp is not None and state.phase in shows_rounds:
        bar = Table.grid(padding=(0, 2))
        bar.add_row(
            Text(round_summary(state)),
            ProgressBar(total=asyncp.target_epochs, completed=asyncp.consumed_epochs, width=40),
        )
        parts.append(bar)
    elif state.phase in shows_rounds and state.options.rounds:
        eta = info["eta_s"]
        # One grid row: a bare ProgressBar ends no line, and the table's top border
        # would be drawn on the bar's line.
        bar = Table.grid(padding=(0, 2))
        bar.add_row(
            Text(round_summary(state) + (f"  ETA {eta:,.0f}s" if eta is not None else "")),
            ProgressBar(total=state.options.rounds, completed=state.rounds_closed, width=40),
        )
        parts.append(bar)
    has_local = any("local_mean_dice" in m for m in state.final_metrics.values())
    has_tuned = any("finetuned_mean_dice" in m for m in state.final_metrics.values())
    columns = ["site", "state", "try", "progress", "loss", "pseudo-Dice", "global pseudo-Dice"]
    columns += ["Dice"] + (["fine-tuned Dice"] if has_tuned else [])
    columns += ["local-only Dice"] if has_local else []
    if asyncp is not None:
        columns += ["epochs", "staleness", "idle"]
    columns += ["MB moved", "heartbeat"]
    ended = state.phase in TERMINAL  # the final table: nobody is in the middle of a round
    rows = []
    for site, row in info["sites"].items():
        prog = progress.get(site, {})
        metrics = row["metrics"] or {}
        last_round = state.last_round.metrics.get(site, {}) if state.last_round else {}
        loss = metrics.get("train_loss", last_round.get("train_loss"))
        pdice = metrics.get("pseudo_dice", last_round.get("pseudo_dice"))
        dice = (state.final_metrics.get(site) or {}).get("mean_dice")
        hb = row["last_heartbeat_s_ago"]
        final = state.final_metrics.get(site) or {}
        local = final.get("local_mean_dice")
        gdice = latest_global_score(state, site)
        cells = [
            site,
            Text(row["state"], style=_STATE_STYLE.get(row["state"], "")),
            str(row["attempt"]),
            _position(row["state"], prog),
            f"{loss:.4f}" if isinstance(loss, float) else "",
            f"{pdice:.3f}" if isinstance(pdice, float) else "",
            f"{gdice:.3f}" if isinstance(gdice, float) else "",
            f"{dice:.3f}" if isinstance(dice, float) else "",
        ]
        if has_tuned:
            tuned = final.get("finetuned_mean_dice")
            cells.append(f"{tuned:.3f}" if isinstance(tuned, float) else "n/a")
        if has_local:
            cells.append(f"{local:.3f}" if isinstance(local, float) else "n/a")
        if asyncp is not None:
            tau = asyncp.last_staleness.get(site)
            idle = info["time_use"].get(site, {}).get("idle_fraction")
            cells += [
                str(asyncp.applied_epochs.get(site, 0)),
                "" if tau is None else str(tau),
                "" if idle is None else f"{100 * idle:.0f}%",
            ]
        cells += [f"{row['bytes_moved'] / 1e6:.1f}", f"{hb:.0f}s ago" if hb is not None else ""]
        rows.append(cells)
    if ended:
        rows = [[c for col, c in zip(columns, r, strict=True) if col != "progress"] for r in rows]
        columns.remove("progress")
    parts.append(SiteTable(columns, rows))
    line = global_model_line(state)
    if line is not None:
        parts.append(Text(line))
    if state.error:
        parts.append(Text(f"error: {state.error}", style="bold red"))
    return Group(*parts)


def _position(site_state: str, prog: dict) -> str:
    """Where a running site is: epoch and iteration, else the phase it is working on."""
    it, of = prog.get("iteration"), prog.get("of_iterations")
    if it is not None and of:
        return f"ep {prog.get('epoch')} it {it}/{of}"
    if site_state in ("running", "queued") and prog.get("phase"):
        return str(prog["phase"])
    return ""
