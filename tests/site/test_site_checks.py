"""A site checks what the coordinator asks before running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from fednnunet.errors import FedError, PolicyRefusal
from fednnunet.messages import ExperimentOptions, SiteReport, SiteTask
from fednnunet.settings import Settings, resolve_under
from fednnunet.site.policy import load_policy
from fednnunet.site.service import SiteService
from fednnunet.workers.site_worker import validated_task

SETTINGS = Settings(site_id="a", dataset_id=1, development=True)


def _task(**options) -> dict:
    opts = {"configuration": "2d", "fold": 0} | options
    return {"experiment_id": "e1", "site_id": "a", "phase": "plan", "round": 0,
            "options": opts}  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [{"plans_identifier": "../../../raw/Dataset001_x/dataset"},
     {"plans_identifier": "/etc/passwd"}, {"trainer": "os.system"},
     {"configuration": "../x"}, {"rounds": 10**9},
     # Would make the site delete its update of the previous round, which a restarted
     # coordinator may still need (core/retention.py).
     {"keep_rounds": 1}],
)  # fmt: skip
def test_an_unsafe_task_is_refused_for_good_before_anything_runs(options):
    out = validated_task(_task(**options), "plan", SETTINGS)
    assert isinstance(out, SiteReport)
    assert not out.ok and not out.retryable
    assert out.error.startswith("task refused by the site:")
    assert out.experiment_id == "e1"


def test_a_valid_task_passes():
    assert isinstance(validated_task(_task(), "plan", SETTINGS), SiteTask)


def test_paths_stay_under_the_nnunet_folders(tmp_path: Path):
    assert resolve_under(tmp_path, "nnUNetPlans.json") == tmp_path / "nnUNetPlans.json"
    with pytest.raises(PolicyRefusal):
        resolve_under(tmp_path, "../outside.json")


def test_site_policy_bounds_what_the_site_runs(tmp_path: Path):
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        "allowed_trainers: [nnUNetTrainer]\nallowed_configurations: [2d]\n"
        "max_rounds: 10\nmax_upload_mb: 1\n"
    )
    settings = SETTINGS.model_copy(update={"site_policy": str(policy_file)})

    class Store:
        max_object_bytes = 2 << 30

    store = Store()
    service = SiteService(settings, store)  # type: ignore[arg-type]
    assert store.max_object_bytes == 1_000_000
    for options, why in (
        ({"trainer": "nnUNetTrainerNoMirroring"}, "trainer"),
        ({"configuration": "3d_fullres"}, "configuration"),
        ({"rounds": 11}, "rounds"),
    ):
        task = SiteTask.model_validate(_task(**options))
        report = service.handle(task)
        assert not report.ok and not report.retryable and why in report.error
        assert report.error.startswith("refused by site policy:")


def test_a_bad_policy_file_is_one_line(tmp_path: Path):
    bad = tmp_path / "p.yaml"
    bad.write_text("max_rounds: -1\nunknown: 3\n")
    with pytest.raises(FedError, match="site policy .*max_rounds.*unknown"):
        load_policy(str(bad))


@pytest.mark.nnunet
def test_the_trainer_must_be_an_nnunet_trainer_class():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from fednnunet.nnunet.session import resolve_trainer_class

    assert resolve_trainer_class("nnUNetTrainer") is nnUNetTrainer
    # nnU-Net's lookup finds any attribute by that name, e.g. a function its modules import.
    for name in ("join", "nnUNetTrainerDoesNotExist"):
        with pytest.raises(PolicyRefusal):
            resolve_trainer_class(name)
    assert ExperimentOptions(configuration="2d", fold=0).trainer == "nnUNetTrainer"
