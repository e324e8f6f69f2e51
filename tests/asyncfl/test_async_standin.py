"""Asynchronous federation (FedBuff) on the real RabbitMQ, Redis and S3, stand-in trainer.

Every published version is recomputed here from the S3 objects with an independent
formula: G_v = G_{v-1} + sum s(tau) n (w - G_base) / sum s(tau) n, s(tau) = (1+tau)^-a.
"""

from __future__ import annotations

import pytest
import torch

from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import decode_weights
from fednnunet.cli.simulate import LocalFederation, submit, wait_for
from fednnunet.spec import parse_spec
from tests.support.fedbuff_oracle import fedbuff_oracle, first_version_oracle
from tests.support.standin import BACKEND as STANDIN_BACKEND

pytestmark = pytest.mark.integration


def _global(store, stack, exp, version):
    ref = store.stat(
        f"{stack.bucket_prefix}-global", f"{exp}/train/r{version:05d}/global/weights.safetensors"
    )
    assert ref is not None, version
    return decode_weights(store.get_bytes(ref))


def test_async_three_sites_one_slow_versions_match_the_fedbuff_formula(stack, unique_id, tmp_path):
    sites = {unique_id("s"): i for i in (11, 12, 13)}
    slow = list(sites)[2]
    spec = parse_spec(
        {
            "experiment_id": unique_id("exp-"),
            "sites": list(sites),
            "method": "asym",
            "mode": "async",
            "rounds": 3,
            "buffer_size": 2,
            "server_lr": 0.8,
            "staleness_exponent": 0.5,
            "configuration": "2d",
            "device": "cpu",
            "heartbeat_timeout_s": 30,
            "simulate_slowdown": {slow: 3.0},
        }
    )
    env = {
        "FEDNNUNET_SITE_BACKEND": STANDIN_BACKEND,
        "FEDNNUNET_STANDIN_SLEEP_S": "0.4",
        "FEDNNUNET_STANDIN_DIR": str(tmp_path / "standin"),
        "nnUNet_raw": str(tmp_path),
        "nnUNet_preprocessed": str(tmp_path),
        "nnUNet_results": str(tmp_path),
    }
    with LocalFederation(sites, tmp_path / "logs", env=env) as fed:
        submit(stack, spec)
        state = wait_for(stack, spec.experiment_id, 180, on_update=lambda *_: fed.check_alive())
    assert state.phase == "done", state.error
    prog = state.asynchronous
    assert prog.consumed_epochs == 9 == sum(prog.applied_epochs.values())
    assert set(state.final_metrics) == set(sites)
    # The slow site took part, but less often than the fast ones.
    assert 1 <= prog.applied_epochs[slow] < max(prog.applied_epochs.values())

    store = ArtifactStore(stack)
    exp = spec.experiment_id
    versions = [r.round for r in state.history]
    assert versions == list(range(1, prog.version + 1))
    previous = None
    for record in state.history:
        updates = []
        assert record.updates and all(
            u["staleness"] == record.round - 1 - u["base_version"] >= 0 for u in record.updates
        )
        for u in record.updates:
            ref = store.stat(
                f"{stack.bucket_prefix}-site-{u['site']}",
                f"{exp}/train/r{u['epoch']:05d}/{u['site']}/update.safetensors",
            )
            weights = decode_weights(store.get_bytes(ref))
            base = (
                previous
                if u["base_version"] == 0
                else _global(store, stack, exp, u["base_version"])
            )
            updates.append((weights, base, u["staleness"], record.num_cases[u["site"]]))
        got = _global(store, stack, exp, record.round)
        if previous is None:  # the first version: case-weighted mean of the weights
            expected = first_version_oracle([(w, n) for w, _, _, n in updates], list(got))
        else:
            expected = fedbuff_oracle({k: previous[k] for k in got}, updates, 0.5, 0.8)
        for k, v in expected.items():
            assert torch.allclose(got[k].double(), v.double(), atol=1e-5), (record.round, k)
        previous = got
