import math

import torch

from fednnunet.adapters.weights_codec import (
    decode_weights,
    encode_weights,
    load_weights_file,
    read_file_header,
    save_weights_file,
)
from fednnunet.core.tensors import join_aliases, split_aliases, unique_nbytes
from fednnunet.core.update_checks import update_problems


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)


class Decoder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder  # nnU-Net's decoder keeps a reference to the encoder
        self.head = torch.nn.Conv2d(4, 2, 1)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder(self.encoder)


def test_aliases_found_and_restored():
    sd = Net().state_dict()
    assert "decoder.encoder.conv.weight" in sd
    unique, aliases = split_aliases(sd)
    assert aliases == {
        "decoder.encoder.conv.weight": "encoder.conv.weight",
        "decoder.encoder.conv.bias": "encoder.conv.bias",
    }
    assert unique_nbytes(sd) < sum(t.numel() * t.element_size() for t in sd.values())
    back = join_aliases(unique, aliases)
    assert back.keys() == sd.keys()
    assert back["decoder.encoder.conv.weight"].data_ptr() == back["encoder.conv.weight"].data_ptr()


def test_safetensors_roundtrip_stores_each_storage_once(tmp_path):
    sd = Net().state_dict()
    data = encode_weights(sd)
    out = decode_weights(data)
    assert out.keys() == sd.keys()
    for k in sd:
        assert torch.equal(out[k], sd[k])
    path = tmp_path / "w.safetensors"
    save_weights_file(sd, path)
    shapes, aliases, _ = read_file_header(path)
    assert "decoder.encoder.conv.weight" not in shapes
    assert aliases["decoder.encoder.conv.weight"] == "encoder.conv.weight"
    full = load_weights_file(path, expand_aliases=True)
    assert full.keys() == sd.keys()


def test_update_checks_flag_nan_shape_and_norm():
    good = {"a": torch.ones(3)}
    assert update_problems(good, {"a": (3,)}, reference_norm=math.sqrt(3)) == []
    assert "NaN" in update_problems({"a": torch.tensor([1.0, float("nan")])})[0]
    assert "Inf" in update_problems({"a": torch.tensor([float("inf")])})[0]
    assert "shape" in update_problems({"a": torch.ones(4)}, {"a": (3,)})[0]
    assert "norm" in update_problems({"a": torch.full((3,), 1e6)}, reference_norm=1.0)[0]
    assert update_problems({}) == ["update has no tensors"]
