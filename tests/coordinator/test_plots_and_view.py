"""The progress picture and the live view, rendered from a real ExperimentState."""

from __future__ import annotations

import pytest
from rich.console import Console

from fednnunet.cli.view import COLUMN_PRIORITY, render, round_summary, status_dict
from fednnunet.coordinator.plots import build_figure, global_series, render_png
from fednnunet.core import state_machine as sm
from fednnunet.messages import ArtifactRef, ExperimentOptions, SiteReport

REF = ArtifactRef(bucket="b", key="k", sha256="0" * 64, size=1)


def _state_with_rounds(n: int = 3) -> sm.ExperimentState:
    s = sm.new_experiment(
        "exp-view",
        ["901", "902", "903"],
        ExperimentOptions(method="asym", rounds=5, quorum=2),
        0.0,
    )
    sm.apply_plans_checked(s, 0.0)
    for r in range(1, n + 1):
        metrics = {
            site: {
                "train_loss": 1.0 / (r + i),
                "pseudo_dice": 0.2 * r + 0.01 * i,
                "global_pseudo_dice": 0.15 * r + 0.01 * i,
            }
            for i, site in enumerate(s.sites)
        }
        record = sm.RoundRecord(
            round=r,
            participants=list(s.sites),
            global_weights=REF,
            metrics=metrics,
            num_cases={"901": 4, "902": 8, "903": 4},
            opened_at=float(r),
        )
        sm.apply_aggregated(s, record, float(r + 1))
        s.history.append(record)  # the read side: what RedisState.load(with_history) gives
    return s


def test_png_has_a_curve_per_site_and_a_global_curve():
    state = _state_with_rounds(3)
    fig = build_figure(state)
    *local, global_model = fig.axes
    for ax in local:
        assert len(ax.lines) == 4  # 3 sites + global
        assert all(len(line.get_xdata()) == 3 for line in ax.lines)
    # The global model at each site: 3 sites, case-weighted, its EMA, the best global.
    labels = [line.get_label() for line in global_model.lines]
    assert labels == [
        "site 901",
        "site 902",
        "site 903",
        "case-weighted",
        "EMA (best rule)",
        "best global",
    ]
    assert list(global_model.lines[0].get_xdata()) == [0, 1, 2]  # the global's round
    weighted = global_model.lines[3].get_ydata()
    assert weighted[0] == pytest.approx((0.15 * 4 + 0.16 * 8 + 0.17 * 4) / 16)
    png = render_png(state)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_global_series_is_case_weighted():
    state = _state_with_rounds(1)
    m = state.history[0].metrics
    expected = (
        m["901"]["train_loss"] * 4 + m["902"]["train_loss"] * 8 + m["903"]["train_loss"] * 4
    ) / 16
    assert abs(global_series(state, "train_loss")[0] - expected) < 1e-12


def test_watch_view_shows_every_site_round_and_progress():
    state = _state_with_rounds(2)
    st = state.sites_status
    st["901"].state, st["902"].state = "running", "done"
    st["902"].report = SiteReport(
        experiment_id="exp-view",
        site_id="902",
        phase="train",
        round=3,
        ok=True,
        metrics={"train_loss": 0.25, "pseudo_dice": 0.75},
    )
    st["903"].state = "late"
    progress = {"901": {"epoch": 2, "iteration": 7, "of_iterations": 250, "metrics": {}}}
    console = Console(record=True, width=140)
    console.print(render(state, progress, {"901": 31_000_000}, {"901": 1e18}))
    text = console.export_text()
    for needle in (
        "exp-view",
        "round 3/5",
        "901",
        "902",
        "903",
        "running",
        "done",
        "late",
        "it 7/250",
        "0.2500",
        "0.750",
        "31.0",
    ):
        assert needle in text, needle
    info = status_dict(state, progress, {}, {})
    assert info["round"] == 3 and set(info["sites"]) == {"901", "902", "903"}
    # Federated evaluation: every round's incoming global, per site and case-weighted.
    for entry in info["history"]:
        g = entry["global_model"]
        assert g["of_round"] == entry["round"] - 1
        assert set(g["sites"]) == {"901", "902", "903"}
        assert g["dice"] == pytest.approx(
            sum(g["sites"][s] * n for s, n in {"901": 4, "902": 8, "903": 4}.items()) / 16
        )
    assert info["global_model"]["best_round"] == 1  # the first global with an object
    assert "global pseudo-Dice" in text and "global model after round 1" in text


def test_final_table_compares_federated_and_local_only_dice(tmp_path):
    import json

    from fednnunet.site.service import local_baseline_dice

    fold = tmp_path / "fold_0"
    (fold / "validation").mkdir(parents=True)
    (fold / "validation" / "summary.json").write_text(
        json.dumps({"foreground_mean": {"Dice": 0.8125}})
    )
    assert local_baseline_dice(str(fold)) == 0.8125
    assert local_baseline_dice(str(tmp_path / "missing")) is None
    assert local_baseline_dice(None) is None

    state = _state_with_rounds(5)
    sm.apply_validated(state, 10.0)
    state.final_metrics = {
        "901": {"mean_dice": 0.9, "local_mean_dice": 0.8125, "finetuned_mean_dice": 0.9375},
        "902": {"mean_dice": 0.95},
        "903": {"mean_dice": 0.97},
    }
    console = Console(record=True, width=200)
    console.print(render(state, {}, {}, {}))
    text = console.export_text()
    assert "local-only Dice" in text and "0.812" in text and "n/a" in text and "0.950" in text
    assert "fine-tuned Dice" in text and "0.938" in text


def test_plot_x_axis_has_integer_round_ticks():
    fig = build_figure(_state_with_rounds(3))
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_round_summary_counts_completed_rounds():
    state = _state_with_rounds(5)
    sm.apply_validated(state, 10.0)
    assert state.phase == "done"
    assert round_summary(state) == "5/5 rounds completed"
    training = _state_with_rounds(2)
    assert training.phase == "train" and round_summary(training) == "round 3/5"


def _lines(renderable, width: int) -> list[str]:
    console = Console(record=True, width=width)
    console.print(renderable)
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 60])
def test_tables_fit_the_terminal_without_cutting_a_header(width):
    """Non-TTY output is 80 columns: headers wrap or their column is left out, never cut."""
    state = _state_with_rounds(5)
    sm.apply_validated(state, 10.0)
    state.final_metrics = {
        "901": {"mean_dice": 0.9, "local_mean_dice": 0.8125},
        "902": {"mean_dice": 0.95},
        "903": {"mean_dice": 0.97},
    }
    lines = _lines(render(state, {}, {"901": 12_000_000}, {"901": 1e9}), width)
    text = "\n".join(lines)
    assert all(len(line) <= width for line in lines)
    assert "…" not in text
    header = " ".join(line for line in lines if line.startswith("┃"))
    words = set(header.replace("┃", " ").split())
    shown = [c for c in COLUMN_PRIORITY if set(c.split()) <= words]
    assert {"site", "state", "Dice"} <= set(shown)
    left_out = [c for c in COLUMN_PRIORITY if c not in shown and c != "progress"]
    if left_out:  # what did not fit is named, not silently gone
        assert "left out, too narrow:" in text
        conditional = ("local-only Dice", "fine-tuned Dice")  # only when there are values
        assert all(c in text.split("too narrow:")[1] for c in left_out if c not in conditional)


def test_round_bar_and_table_border_are_on_separate_lines():
    state = _state_with_rounds(2)
    lines = _lines(render(state, {}, {}, {}), 130)
    bar = [i for i, line in enumerate(lines) if "round 3/5" in line]
    assert len(bar) == 1 and "┏" not in lines[bar[0]]
    assert lines[bar[0] + 1].startswith("┏")


def test_progress_column_names_the_phase_before_the_first_iteration():
    state = _state_with_rounds(2)
    state.sites_status["901"].state = "running"
    text = "\n".join(_lines(render(state, {"901": {"phase": "train"}}, {}, {}), 130))
    row = next(line for line in text.splitlines() if "901" in line)
    assert "train" in row
