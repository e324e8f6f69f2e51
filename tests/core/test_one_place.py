"""Options, phases and keys each have one definition that every reader and writer uses."""

from __future__ import annotations

import pytest

from fednnunet import keys
from fednnunet.adapters.broker import SITE_TASKS
from fednnunet.core import state_machine as sm
from fednnunet.messages import ExperimentOptions, SiteTask
from fednnunet.phases import TERMINAL, Outcome, Phase
from fednnunet.spec import parse_spec

# A value other than the default for every option that has an obvious other value.
NOT_DEFAULT = {
    "configuration": "2d",
    "fold": "all",
    "trainer": "nnUNetTrainer_5epochs",
    "plans_identifier": "nnUNetResEncUNetMPlans",
    "device": "cpu",
    "seed": 7,
    "export_npz": True,
    "method": "asym",
    "rounds": 4,
    "local_epochs": 2,
    "iterations_per_epoch": 3,
    "val_iterations_per_epoch": 2,
    "aggregation": "trimmed_mean",
    "max_site_weight": 0.5,
    "quorum": 2,
    "round_deadline_s": 30.0,
    "heartbeat_timeout_s": 9.0,
    "max_attempts": 5,
    "stop_after": "plan",
}


def test_options_travel_unchanged_from_spec_to_state_to_task() -> None:
    spec = parse_spec({"experiment_id": "exp-one", "sites": ["a", "b"], **NOT_DEFAULT})
    options = spec.options()
    assert options.model_dump(mode="json") == ExperimentOptions(**NOT_DEFAULT).model_dump(
        mode="json"
    )
    state = sm.new_experiment(spec.experiment_id, spec.sites, options, now=0.0)
    stored = sm.ExperimentState.model_validate_json(state.model_dump_json())
    assert stored.options == options
    task = SiteTask(experiment_id="exp-one", site_id="a", phase=Phase.PLAN, options=stored.options)
    assert SiteTask.model_validate_json(task.model_dump_json()).options == options


def test_train_args_override_the_spec_fields_they_name() -> None:
    spec = parse_spec({"sites": ["a"], "trainer": "X", "train_args": ["-device", "cpu"]})
    # Like nnUNetv2_train: a flag left out takes nnU-Net's default (here: the trainer).
    assert (spec.options().trainer, spec.options().device) == ("nnUNetTrainer", "cpu")


def test_a_state_stored_before_options_were_one_model_still_loads() -> None:
    old = {
        "experiment_id": "exp-old",
        "method": "asym",
        "sites": ["a", "b"],
        "rounds": 3,
        "quorum": 1,
        "heartbeat_timeout_s": 60.0,
        "options": {"configuration": "2d", "fold": 0, "device": "cpu"},
        "phase": "train",
        "round": 2,
    }
    state = sm.ExperimentState.model_validate(old)
    assert (state.options.method, state.options.rounds, state.quorum) == ("asym", 3, 1)
    assert (state.options.configuration, state.phase) == ("2d", Phase.TRAIN)


def test_every_phase_has_a_site_task_and_phases_compare_as_strings() -> None:
    assert set(SITE_TASKS) == set(Phase)
    assert TERMINAL == {"done", "failed", "cancelled"} == set(Outcome)
    assert Phase.TRAIN == "train" and f"{Phase.TRAIN}" == "train"


@pytest.mark.parametrize(
    ("key", "folder", "round_", "site", "name"),
    [
        (keys.global_weights_key("exp-a", 3), "train", 3, "global", "weights.safetensors"),
        (keys.initial_weights_key("exp-a"), "train", 0, "global", "weights.safetensors"),
        (keys.site_update_key("exp-a", 2, "s1"), "train", 2, "s1", "update.safetensors"),
        (
            keys.site_report_key("exp-a", Phase.VALIDATE, 0, "s1"),
            "validate",
            0,
            "s1",
            "report.json",
        ),
        (
            keys.merged_fingerprint_key("exp-a"),
            "fingerprint",
            0,
            "global",
            "dataset_fingerprint.json",
        ),
        (keys.final_summary_key("exp-a"), "final", 0, "global", "summary.json"),
        (keys.history_key("exp-a", 12), "history", 12, "global", "round.json"),
        (
            keys.journal_key("exp-a", 1, 42, Phase.TRAIN),
            "journal",
            1,
            "global",
            "000042-train.json",
        ),
        (keys.plot_key("exp-a", 100_000), "plots", 100_000, "global", "progress.png"),
    ],
)
def test_every_key_parses_back_into_its_parts(key, folder, round_, site, name) -> None:
    parsed = keys.parse_artifact_key(key)
    assert parsed == keys.ArtifactKey("exp-a", folder, round_, site, name)
    assert key.startswith(keys.folder_prefix("exp-a", folder, round_))
    assert key.startswith(keys.experiment_prefix("exp-a"))


@pytest.mark.parametrize(
    "key", ["exp-a/plots/progress.png", "exp-a/plots/rx/global/p.png", "a/b/r00001/c/d/e", ""]
)
def test_other_keys_do_not_parse(key) -> None:
    assert keys.parse_artifact_key(key) is None
