"""Bad input at a site stops the experiment with one clear line (real workers, real nnU-Net)."""

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
SITES = {f"s{_RUN}-{i}": i for i in (901, 902)}
SITE_OF = {i: s for s, i in SITES.items()}


def _fingerprint_run(stack, tmp: Path, unique_id, spoil) -> tuple:
    env = make_nnunet_dirs(tmp)
    folders = make_demo_federation(Path(env["nnUNet_raw"]), [901, 902], num_cases=4, seed=1)
    spoil(folders[1])
    spec = parse_spec(
        {
            "experiment_id": unique_id("bad-"),
            "sites": list(SITES),
            "configuration": "2d",
            "device": "cpu",
            "stop_after": "fingerprint",
        }
    )
    with LocalFederation(SITES, tmp / "logs", env=env) as fed:
        submit(stack, spec)
        state = wait_for(stack, spec.experiment_id, 300, on_update=lambda *_: fed.check_alive())
    return state


def test_malformed_dataset_fails_fast_with_a_clear_message(stack, tmp_path, unique_id):
    def break_dataset_json(folder: Path) -> None:
        (folder / "dataset.json").write_text("{ not json")

    state = _fingerprint_run(stack, tmp_path, unique_id, break_dataset_json)
    assert state.phase == "failed"
    assert SITE_OF[902] in state.error and "dataset" in state.error.lower()
    # Not retried: a malformed dataset does not heal by itself.
    assert state.sites_status[SITE_OF[902]].attempt == 1


def test_sites_with_different_label_sets_are_refused(stack, tmp_path, unique_id):
    def relabel(folder: Path) -> None:
        ds = json.loads((folder / "dataset.json").read_text())
        ds["labels"] = {"background": 0, "tumour": 1, "cube": 2}
        (folder / "dataset.json").write_text(json.dumps(ds))

    state = _fingerprint_run(stack, tmp_path, unique_id, relabel)
    assert state.phase == "failed"
    assert "fingerprint merge" in state.error and "label" in state.error.lower()


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda f: next((f / "labelsTr").iterdir()).unlink(), "has no label file"),
        (
            lambda f: [
                p.rename(p.with_name(p.name.replace(".nii.gz", ".nrrd")))
                for p in (f / "imagesTr").iterdir()
            ],
            "no images ending in _0000.nii.gz",
        ),
        (lambda f: (f / "dataset.json").write_text('{"labels": {}}'), "dataset.json lacks"),
        (lambda f: (f / "dataset.json").write_text("{ not json"), "not valid JSON"),
    ],
    ids=["missing-label", "wrong-file-ending", "incomplete-dataset-json", "broken-json"],
)
def test_raw_dataset_mistakes_are_one_line(tmp_path, spoil, message):
    from fednnunet.errors import DatasetError
    from fednnunet.nnunet.fingerprint import check_raw_dataset

    (folder,) = make_demo_federation(tmp_path, [905], num_cases=3, seed=2)
    check_raw_dataset(folder)  # the good one passes
    spoil(folder)
    with pytest.raises(DatasetError, match=message) as err:
        check_raw_dataset(folder)
    assert "\n" not in str(err.value) and "Dataset905" in str(err.value)
