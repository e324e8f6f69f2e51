"""aggregate_files: the file-based streaming FedAvg the coordinator runs (and B1 measures)."""

import pytest
import torch

from fednnunet.adapters.weights_codec import load_weights_file, read_file_header, save_weights_file
from fednnunet.coordinator.aggregator import aggregate_files
from fednnunet.core.aggregation import StreamingFedAvg
from tests.support.reference import fedavg


def _aliased(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=gen)
    return {"enc.w": w, "dec.enc.w": w, "head": torch.randn(2, generator=gen)}


def test_files_average_equals_in_memory_fedavg_and_keeps_aliases(tmp_path):
    states = [_aliased(i) for i in range(3)]
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"u{i}.safetensors")
        save_weights_file(state, paths[-1])
    out = tmp_path / "global.safetensors"
    names = aggregate_files(paths, [1.0, 2.0, 5.0], out, metadata={"participants": "a,b,c"})
    assert names == ["enc.w", "head"]  # the alias is stored (and averaged) once
    expected = fedavg([(s, w) for s, w in zip(states, [1.0, 2.0, 5.0], strict=True)])
    got = load_weights_file(out, expand_aliases=True)
    assert set(got) == {"enc.w", "dec.enc.w", "head"}
    for k in ("enc.w", "head"):
        assert torch.allclose(got[k], expected[k], atol=1e-6)
    assert torch.equal(got["dec.enc.w"], got["enc.w"])
    shapes, aliases, meta = read_file_header(out)
    assert aliases == {"dec.enc.w": "enc.w"} and meta["participants"] == "a,b,c"


def test_files_average_leaves_inputs_untouched(tmp_path):
    path = tmp_path / "u.safetensors"
    save_weights_file({"x": torch.ones(5)}, path)
    before = path.read_bytes()
    aggregate_files([path, path], [3.0, 1.0], tmp_path / "out.safetensors")
    assert path.read_bytes() == before  # the owned first update is scaled in memory only


def test_owned_first_update_is_not_copied_and_result_is_stable():
    acc = StreamingFedAvg(["x"])
    first = torch.full((3,), 2.0)
    acc.add({"x": first}, 1.0, owned=True)
    acc.add({"x": torch.full((3,), 5.0)}, 2.0)
    out = acc.result()
    assert out["x"].data_ptr() == first.data_ptr()  # averaged in place, no second model
    assert torch.allclose(out["x"], torch.full((3,), 4.0))
    assert torch.allclose(acc.result()["x"], torch.full((3,), 4.0))  # not divided twice
    with pytest.raises(RuntimeError):
        acc.add({"x": torch.ones(3)}, 1.0)


def test_not_owned_update_is_left_alone():
    acc = StreamingFedAvg(["x"])
    mine = torch.full((2,), 3.0)
    acc.add({"x": mine}, 2.0)
    acc.result()
    assert torch.equal(mine, torch.full((2,), 3.0))


def test_mismatched_weights_rejected(tmp_path):
    with pytest.raises(ValueError):
        aggregate_files([], [], tmp_path / "o")
