"""Async federation end to end with real nnU-Net on CPU: 2 sites, one 3x slower.

Tiny epochs (3 iterations); each site ends with a plain nnU-Net results folder.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from fednnunet.cli.simulate import LocalFederation, submit, wait_for
from fednnunet.nnunet.demo_data import make_demo_federation
from fednnunet.spec import parse_spec
from tests.support.nnunet_dirs import make_nnunet_dirs

pytestmark = [pytest.mark.integration, pytest.mark.nnunet]
_RUN = secrets.token_hex(2)
SITES = {f"a{_RUN}-{i}": i for i in (901, 902)}


def test_async_two_sites_one_slowed_end_with_the_sync_total_and_nnunet_folders(
    stack, tmp_path, unique_id
):
    env = make_nnunet_dirs(tmp_path) | {"nnUNet_def_n_proc": "1"}
    make_demo_federation(Path(env["nnUNet_raw"]), list(SITES.values()), num_cases=8, seed=0)
    fast, slow = list(SITES)
    spec = parse_spec(
        {
            "experiment_id": unique_id("e2e-async-"),
            "sites": list(SITES),
            "method": "ffe",
            "mode": "async",
            "configuration": "2d",
            "fold": 0,
            "rounds": 3,
            "buffer_size": 1,
            "iterations_per_epoch": 3,
            "val_iterations_per_epoch": 1,
            "device": "cpu",
            "heartbeat_timeout_s": 300,
            "simulate_slowdown": {slow: 3.0},
        }
    )
    with LocalFederation(SITES, tmp_path / "logs", env=env) as fed:
        submit(stack, spec)
        state = wait_for(stack, spec.experiment_id, 900, on_update=lambda *_: fed.check_alive())
    assert state.phase == "done", state.error
    prog = state.asynchronous
    # The sync run's total training: rounds x sites site-epochs, no more, no less.
    assert prog.consumed_epochs == 6 == sum(prog.applied_epochs.values())
    assert prog.applied_epochs[fast] > prog.applied_epochs[slow] >= 1
    assert prog.version == len(state.history) == 6  # buffer_size 1: one version per update
    # Every site scored the last version (evaluate phase) and a best version was chosen.
    assert set(state.final_global_eval) == set(SITES) and state.final_global_dice is not None
    assert state.best_global is not None and 0 <= state.best_global_round <= 6
    # nnU-Net's poly LR follows the federation's progress when the epoch started (buffer
    # size 1: version b holds b site-epochs), not the site's own epoch counter.
    for record in state.history:
        (u,) = record.updates
        expected = 1e-2 * (1 - u["base_version"] / 6) ** 0.9
        assert record.metrics[u["site"]]["lr"] == pytest.approx(expected, rel=1e-6)
    for site, dataset in SITES.items():
        (folder,) = Path(env["nnUNet_results"]).glob(
            f"Dataset{dataset}_*/nnUNetTrainer__nnUNetPlans__2d"
        )
        fold = folder / "fold_0"
        assert (fold / "checkpoint_final.pth").is_file()
        # The best version by the EMA of fresh federated scores, as after sync rounds.
        assert (fold / "checkpoint_best.pth").is_file()
        summary = json.loads((fold / "validation" / "summary.json").read_text())
        assert state.final_metrics[site]["mean_dice"] == pytest.approx(
            summary["foreground_mean"]["Dice"], abs=1e-6
        )
