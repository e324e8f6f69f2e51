"""``fednnunet site egress``: the egress log in words, verified against the real S3 store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.cli.main import app
from fednnunet.core.fingerprint_merge import DEFAULT_SKETCH
from fednnunet.core.fingerprint_schema import SCHEMA, validate_summary
from fednnunet.core.geometry_sketch import GEOMETRY_SKETCH, summarize_geometry

pytestmark = pytest.mark.integration


def _summary() -> dict:
    rng = np.random.default_rng(0)
    cases = [
        {
            "spacing": [2.0, 0.8, 0.8],
            "shape_after_crop": [int(v) for v in rng.integers(20, 40, 3)],
            "relative_size_after_cropping": float(rng.uniform(0.3, 0.9)),
        }
        for _ in range(16)
    ]
    s = {
        "schema": SCHEMA,
        "dataset_name": "Dataset901_DemoSite1",
        "num_cases": 16,
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "a": 1},
        "file_ending": ".nii.gz",
        "sketch": dict(DEFAULT_SKETCH),
        "geometry_sketch": dict(GEOMETRY_SKETCH),
        **summarize_geometry(cases),
        "intensity_per_channel": {
            "0": {
                "weight": 16.0,
                "num_voxels": 1600,
                "mean": 1.0,
                "m2": 1.0,
                "min": 0.0,
                "max": 2.0,
                "hist": {"zero": 16.0, "pos": {}, "neg": {}},
            }
        },
    }
    return validate_summary(json.loads(json.dumps(s)))


def test_site_egress_prints_words_and_catches_tampering(stack, unique_id, tmp_path) -> None:
    settings = stack.model_copy(update={"bucket_prefix": unique_id("fedtest-eg")})
    log = tmp_path / "egress.jsonl"
    store = ArtifactStore(settings, egress_log=str(log))
    bucket = f"{settings.bucket_prefix}-site-a"
    store.ensure_bucket(bucket)
    exp = unique_id("exp")
    store.put_json(bucket, f"{exp}/fingerprint/r00000/a/fingerprint_summary.json", _summary(),
                   kind="fingerprint_summary")  # fmt: skip
    store.put_json(bucket, f"{exp}/plan/r00000/a/report.json", {"num_cases": 16},
                   kind="plan_report")  # fmt: skip
    store.put_json(bucket, "other-exp/plan/r00000/a/report.json", {"x": 1}, kind="plan_report")

    runner = CliRunner()
    res = runner.invoke(app, ["site", "egress", exp, "--log", str(log)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "spacing sketch: 3 axes, 1/1/1 buckets (relative width 0.001), 16 cases" in out
    assert "physical extent sketch: 3 axes" in out and "intensity channel 0" in out
    assert 'plan report: {"num_cases": 16}' in out
    assert out.count("verified") == 2 and "other-exp" not in out
    assert "2 objects" in out

    # Someone replaces the object behind the log's back: the audit says so and fails.
    key = f"{exp}/plan/r00000/a/report.json"
    store.client.remove_object(bucket, key)
    store.put_json(bucket, key, {"num_cases": 999}, kind="plan_report")
    res = runner.invoke(app, ["site", "egress", exp, "--log", str(log)])
    assert res.exit_code == 2
    assert "MISMATCH" in res.output and "do not match" in res.output
