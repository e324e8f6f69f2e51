"""Bad site updates are quarantined, not averaged (real S3, real safetensors objects)."""

from __future__ import annotations

import pytest
import torch

from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import decode_weights, encode_weights
from fednnunet.coordinator.aggregator import aggregate_round
from fednnunet.messages import ArtifactRef, SiteReport

pytestmark = pytest.mark.integration
BUCKET = "fedtest-quarantine"


def _put(store, key, tensors) -> ArtifactRef:
    return store.put_bytes(BUCKET, key, encode_weights(tensors))


def _report(site, ref, cases=4) -> SiteReport:
    return SiteReport(
        experiment_id="e",
        site_id=site,
        phase="train",
        round=2,
        ok=True,
        artifact=ref,
        num_cases=cases,
    )


def test_nan_wrong_shape_absurd_norm_and_corrupt_updates_are_quarantined(
    stack, tmp_path, unique_id
):
    store = ArtifactStore(stack, cache_dir=tmp_path / "cache", retry_total_s=5)
    store.ensure_bucket(BUCKET)
    run = unique_id("q")
    previous = _put(store, f"{run}/global1", {"w": torch.ones(4), "b": torch.zeros(2)})
    good_a = _put(store, f"{run}/a", {"w": torch.full((4,), 2.0), "b": torch.ones(2)})
    good_b = _put(store, f"{run}/b", {"w": torch.full((4,), 4.0), "b": torch.ones(2)})
    nan = _put(
        store, f"{run}/c", {"w": torch.tensor([1.0, float("nan"), 1.0, 1.0]), "b": torch.ones(2)}
    )
    shape = _put(store, f"{run}/d", {"w": torch.ones(5), "b": torch.ones(2)})
    absurd = _put(store, f"{run}/e", {"w": torch.full((4,), 1e6), "b": torch.ones(2)})
    corrupt = ArtifactRef(bucket=BUCKET, key=good_a.key, sha256="0" * 64, size=good_a.size)
    reports = [
        _report("a", good_a, 1),
        _report("b", good_b, 3),
        _report("c", nan),
        _report("d", shape),
        _report("e", absurd),
        _report("f", corrupt),
    ]

    result = aggregate_round(store, reports, BUCKET, f"{run}/global2", previous, min_participants=2)

    assert result.participants == ["a", "b"]
    assert set(result.quarantined) == {"c", "d", "e", "f"}
    assert "NaN or Inf" in result.quarantined["c"]
    assert "shape" in result.quarantined["d"]
    assert "norm" in result.quarantined["e"]
    assert "verification" in result.quarantined["f"]
    merged = decode_weights(store.get_bytes(result.global_weights))
    assert torch.allclose(merged["w"], torch.full((4,), (2.0 * 1 + 4.0 * 3) / 4))


def test_below_quorum_after_quarantine_gives_no_global(stack, tmp_path, unique_id):
    store = ArtifactStore(stack, cache_dir=tmp_path / "cache", retry_total_s=5)
    store.ensure_bucket(BUCKET)
    run = unique_id("q")
    good = _put(store, f"{run}/a", {"w": torch.ones(2)})
    bad = _put(store, f"{run}/b", {"w": torch.tensor([float("inf"), 0.0])})
    result = aggregate_round(
        store, [_report("a", good), _report("b", bad)], BUCKET, f"{run}/g", None, min_participants=2
    )
    assert result.global_weights is None and set(result.quarantined) == {"b"}
    assert store.stat(BUCKET, f"{run}/g") is None
