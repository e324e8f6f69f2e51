"""The whole federation on the real RabbitMQ, Redis and S3, with a stand-in trainer.

Site workers and the coordinator run as separate processes exactly as in
production; only the nnU-Net compute is replaced (it has its own end-to-end test).
"""

from __future__ import annotations

import os

import pytest
import torch

from fednnunet.adapters.redis_state import RedisState
from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import decode_weights
from fednnunet.cli.simulate import LocalFederation, submit, wait_for
from fednnunet.spec import parse_spec
from tests.support.fedavg_oracle import fedavg_oracle
from tests.support.standin import BACKEND as STANDIN_BACKEND

pytestmark = pytest.mark.integration


def _standin_env(tmp_path) -> dict[str, str]:
    """The stand-in trainer, with every nnU-Net folder in the test's own folder."""
    return {
        "FEDNNUNET_SITE_BACKEND": STANDIN_BACKEND,
        "FEDNNUNET_STANDIN_DIR": str(tmp_path / "standin"),
        "nnUNet_raw": str(tmp_path),
        "nnUNet_preprocessed": str(tmp_path),
        "nnUNet_results": str(tmp_path),
    }


def _run(stack, spec, sites, tmp_path, timeout_s: float):
    """Submit ``spec`` to a local federation of ``sites``; (the submitted spec, final state)."""
    with LocalFederation(sites, tmp_path / "logs", env=_standin_env(tmp_path)) as fed:
        spec = submit(stack, spec)
        alive = lambda *_: fed.check_alive()  # noqa: E731
        state = wait_for(stack, spec.experiment_id, timeout_s, on_update=alive)
    return spec, state


def test_three_sites_three_rounds_fedavg_is_exact(stack, unique_id, tmp_path):
    sites = {unique_id("s"): i for i in (11, 12, 13)}
    spec = parse_spec(
        {
            "experiment_id": unique_id("exp-"),
            "sites": list(sites),
            "method": "asym",
            "rounds": 3,
            "configuration": "2d",
            "device": "cpu",
            "heartbeat_timeout_s": 30,
        }
    )
    env = _standin_env(tmp_path)
    with LocalFederation(sites, tmp_path / "logs", env=env) as fed:
        submit(stack, spec)
        # Each process is stopped as a group, yet shares this session: in a session of
        # its own (a scheduler autogroup) its niced background threads would take a
        # full share of the CPU from the other simulated sites.
        for proc in fed.procs.values():
            assert os.getpgid(proc.pid) == proc.pid
            assert os.getsid(proc.pid) == os.getsid(0)
        state = wait_for(stack, spec.experiment_id, 120, on_update=lambda *_: fed.check_alive())
    assert state.phase == "done", state.error
    assert [r.round for r in state.history] == [1, 2, 3]
    assert all(sorted(r.participants) == sorted(sites) for r in state.history)
    assert set(state.final_metrics) == set(sites)

    # The global weights of every round are the case-weighted mean of that round's updates.
    store = ArtifactStore(stack)
    for record in state.history:
        updates = []
        for site in sites:
            report_key = f"{spec.experiment_id}/train/r{record.round:05d}/{site}/update.safetensors"
            ref = store.stat(f"{stack.bucket_prefix}-site-{site}", report_key)
            assert ref is not None
            updates.append((decode_weights(store.get_bytes(ref)), float(record.num_cases[site])))
        expected = fedavg_oracle(updates)  # independent of the product's fedavg
        got = decode_weights(store.get_bytes(record.global_weights))
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.allclose(got[k], v, atol=1e-6), k
    # Each site's egress log lists every object it uploaded (what left the hospital).
    import json

    for site in sites:
        lines = (tmp_path / f"fednnunet_egress_{site}.jsonl").read_text().splitlines()
        entries = [json.loads(line) for line in lines]
        updates = [e for e in entries if e["kind"] == "weights_update"]
        assert len(updates) == 3
        assert all(e["bucket"] == f"{stack.bucket_prefix}-site-{site}" for e in entries)
        assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in entries)
    # What every site can read (the global bucket) holds nothing per site: the round
    # history, journal, summary and plots are in the coordinator's own bucket.
    from fednnunet.adapters.weights_codec import read_file_header
    from fednnunet.keys import coordinator_bucket, global_bucket

    global_keys = store.list_keys(global_bucket(stack.bucket_prefix), f"{spec.experiment_id}/")
    assert global_keys and all(k.split("/")[3] == "global" for k in global_keys), global_keys
    assert {k.rsplit("/", 1)[1] for k in global_keys} <= {
        "dataset_fingerprint.json",
        "weights.safetensors",
    }, global_keys
    for record in state.history:
        _, _, meta = read_file_header(store.get_file(record.global_weights))
        assert set(meta) <= {"participants", "aggregation", "fednnunet.aliases"}, meta
    private = store.list_keys(coordinator_bucket(stack.bucket_prefix), f"{spec.experiment_id}/")
    phases = {k.split("/")[1] for k in private}
    assert {"history", "journal", "final"} <= phases, phases
    # Redis holds the state under the experiment's namespace.
    assert RedisState.from_settings(stack).load(spec.experiment_id).phase == "done"


def test_pretrained_weights_are_every_sites_starting_point(stack, unique_id, tmp_path):
    """``-pretrained_weights``: the operator's checkpoint becomes round 0's global."""
    from tests.support.standin import build_state

    pretrained = build_state("tiny", 4242)
    ckpt = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"_orig_mod." + k: v for k, v in pretrained.items()},
                "trainer_name": "nnUNetTrainer"}, ckpt)  # fmt: skip
    sites = {unique_id("p"): i for i in (21, 22)}
    spec = parse_spec(
        {"experiment_id": unique_id("exp-"), "sites": list(sites), "method": "asym",
         "rounds": 1, "configuration": "2d", "device": "cpu", "heartbeat_timeout_s": 30,
         "train_args": ["-pretrained_weights", str(ckpt)]}
    )  # fmt: skip
    spec, state = _run(stack, spec, sites, tmp_path, timeout_s=120)
    assert state.phase == "done", state.error
    assert spec.initial_weights is not None
    initial = decode_weights(ArtifactStore(stack).get_bytes(spec.initial_weights))
    assert all(torch.equal(initial[k], v) for k, v in pretrained.items())
    for site in sites:  # every site loaded all four layers before its first epoch
        assert state.history[0].metrics[site]["layers_loaded"] == 4.0


def test_keep_rounds_leaves_the_last_rounds_the_best_and_the_initial_global(
    stack, unique_id, tmp_path
):
    """Retention over the real broker and S3: after 5 rounds with ``keep_rounds: 2``, S3
    holds each site's updates of rounds 4-5, the globals of rounds 4-5 and the best
    round, and the pretrained round-0 model; what is kept is still exact FedAvg, and each
    site's egress audit names rounds 1-3 as deleted by the site."""
    import time as _time

    from fednnunet.cli.egress import audit, read_egress_log, status_is_ok
    from fednnunet.keys import global_bucket, site_bucket
    from tests.support.standin import build_state

    ckpt = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": build_state("tiny", 4343)}, ckpt)
    sites = {unique_id("k"): i for i in (31, 32)}
    rounds, keep = 5, 2
    spec = parse_spec(
        {"experiment_id": unique_id("exp-"), "sites": list(sites), "method": "asym",
         "rounds": rounds, "keep_rounds": keep, "configuration": "2d", "device": "cpu",
         "heartbeat_timeout_s": 30, "train_args": ["-pretrained_weights", str(ckpt)]}
    )  # fmt: skip
    spec, state = _run(stack, spec, sites, tmp_path, timeout_s=180)
    assert state.phase == "done", state.error
    store = ArtifactStore(stack)
    exp = spec.experiment_id

    def stored_rounds(bucket: str, name: str) -> set[int]:
        keys = store.list_keys(bucket, f"{exp}/train/")
        return {int(k.split("/")[2][1:]) for k in keys if k.endswith("/" + name)}

    # Expected, from the spec alone: the last `keep` rounds, the best, round 0.
    last = set(range(rounds - keep + 1, rounds + 1))
    want_globals = last | {state.best_global_round, 0}
    gbucket = global_bucket(stack.bucket_prefix)
    deadline = _time.monotonic() + 15  # the deletes run after the pass that allows them
    while stored_rounds(gbucket, "weights.safetensors") != want_globals:
        assert _time.monotonic() < deadline, stored_rounds(gbucket, "weights.safetensors")
        _time.sleep(0.2)
    for site in sites:
        assert stored_rounds(site_bucket(stack.bucket_prefix, site), "update.safetensors") == last
    for record in state.history:
        if record.round not in last:
            continue
        updates = []
        for site in sites:
            key = f"{exp}/train/r{record.round:05d}/{site}/update.safetensors"
            ref = store.stat(site_bucket(stack.bucket_prefix, site), key)
            updates.append((decode_weights(store.get_bytes(ref)), float(record.num_cases[site])))
        expected = fedavg_oracle(updates)
        got = decode_weights(store.get_bytes(record.global_weights))
        assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in expected.items())
    for site in sites:
        rows = audit(read_egress_log(tmp_path / f"fednnunet_egress_{site}.jsonl", exp), store)
        status = {int(r["key"].split("/")[2][1:]): r["status"] for r in rows
                  if r["kind"] == "weights_update"}  # fmt: skip
        assert set(status) == set(range(1, rounds + 1))
        assert all(status[r] == "verified" for r in last), status
        assert all(status[r].startswith("deleted by this site") for r in range(1, 4)), status
        assert all(status_is_ok(r["status"]) for r in rows)
