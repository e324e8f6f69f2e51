"""A site's error text leaves the hospital without case identifiers, file names or paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.core.redaction import redact_error
from fednnunet.messages import ExperimentOptions, SiteTask
from fednnunet.nnunet.demo_data import make_demo_federation
from fednnunet.site.service import SiteService
from tests.support.nnunet_dirs import make_nnunet_dirs


@pytest.mark.parametrize(
    ("text", "cases", "expected"),
    [
        ("Dataset905: case pat_77 lacks channel 1 (pat_77_0001.nii.gz)", ["pat_77"],
         "Dataset905: case <case> lacks channel 1 (<file>)"),
        ("cannot read /data/nnUNet_raw/Dataset905_x/imagesTr/pat_77_0000.nii.gz: truncated",
         ["pat_77"], "cannot read <path>: truncated"),
        ("case_1 and case_10 differ", ["case_1", "case_10"], "<case> and <case> differ"),
        ("no images ending in _0000.nii.gz in imagesTr", [],
         "no images ending in _0000.nii.gz in imagesTr"),
        ("mricase7 is not case7", ["case7"], "mricase7 is not <case>"),
        ("KeyError: 'spacing' in C:\\hospital\\scans\\p1.nrrd", ["p1"],
         "KeyError: 'spacing' in <path>"),
    ],
)  # fmt: skip
def test_redaction_removes_every_case_trace(text, cases, expected):
    assert redact_error(text, cases) == expected


@pytest.mark.integration
def test_a_failing_site_reports_without_its_case_ids(stack, tmp_path: Path, monkeypatch):
    """Real dataset check, real report: the local log keeps the name, the report does not."""
    env = make_nnunet_dirs(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    (folder,) = make_demo_federation(Path(env["nnUNet_raw"]), [905], num_cases=3, seed=2)
    label = sorted((folder / "labelsTr").iterdir())[0]
    case_id = label.name.split(".", 1)[0]
    label.unlink()

    settings = stack.model_copy(update={"site_id": "901", "dataset_id": 905})
    service = SiteService(settings, ArtifactStore(settings))
    task = SiteTask(experiment_id="e1", site_id="901", phase="fingerprint", round=0,
                    options=ExperimentOptions(configuration="2d", fold=0))  # fmt: skip
    report = service.handle(task)
    assert not report.ok
    assert "has no label file" in report.error, report.error
    assert case_id not in report.error and "<case>" in report.error, report.error
