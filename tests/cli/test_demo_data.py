"""`fednnunet demo-data --hard`: the quality benchmark's harder federation, from the CLI."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from fednnunet.cli.main import app


def _spacing_and_intensity(folder):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(sorted((folder / "imagesTr").iterdir())[0]))
    arr = sitk.GetArrayFromImage(img)
    return img.GetSpacing()[2], float(np.median(arr[arr != 0]))


def test_hard_demo_federation_sites_differ_in_size_spacing_intensity_and_balance(tmp_path):
    result = CliRunner().invoke(
        app, ["demo-data", "--raw", str(tmp_path), "--datasets", "901 902 903", "--hard"]
    )
    assert result.exit_code == 0, result.output
    folders = sorted(tmp_path.glob("Dataset90*_HardSite*"))
    assert [f.name for f in folders] == [
        "Dataset901_HardSite1",
        "Dataset902_HardSite2",
        "Dataset903_HardSite3",
    ]
    sizes = [json.loads((f / "dataset.json").read_text())["numTraining"] for f in folders]
    assert sizes == [6, 12, 9]
    spacing, intensity = zip(*(_spacing_and_intensity(f) for f in folders), strict=True)
    assert len(set(spacing)) == 3 and max(spacing) / min(spacing) > 2
    assert max(intensity) / min(intensity) > 3  # bright vs dark scanner

    import SimpleITK as sitk

    def cube_share(folder):
        labels = sorted((folder / "labelsTr").iterdir())
        return np.mean([2 in sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in labels])

    assert cube_share(folders[0]) < cube_share(folders[1])  # class balance differs


def test_hard_refuses_a_case_count_it_would_ignore(tmp_path):
    result = CliRunner().invoke(
        app, ["demo-data", "--raw", str(tmp_path), "--hard", "--cases", "4"]
    )
    assert result.exit_code != 0 and "--cases" in result.output
    assert not list(tmp_path.iterdir())
