"""The weights codec against the safetensors library itself (an independent reader
and writer), and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fednnunet.adapters.weights_codec import (
    ALIASES_META,
    MalformedWeights,
    decode_weights,
    encode_weights,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(4, 3, generator=g)
    return {
        "encoder.w": shared,
        "decoder.encoder.w": shared,  # an alias: stored once
        "encoder.b": torch.randn(3, generator=g, dtype=torch.float64),
        "norm.half": torch.randn(5, generator=g).to(torch.float16),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 2),
    }


def test_safetensors_reads_what_we_write_and_we_read_what_it_writes():
    state = _state()
    data = encode_weights(state, {"source": "test"})
    theirs = st_load(bytes(data))
    assert set(theirs) == set(state) - {"decoder.encoder.w"}
    for name, tensor in theirs.items():
        assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name])
    unique = {k: v for k, v in state.items() if k != "decoder.encoder.w"}
    written_by_them = st_save(
        unique, metadata={ALIASES_META: json.dumps({"decoder.encoder.w": "encoder.w"})}
    )
    ours = decode_weights(written_by_them)
    assert set(ours) == set(state)
    for name, tensor in state.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor)
    assert ours["decoder.encoder.w"].data_ptr() == ours["encoder.w"].data_ptr()


def test_same_state_same_bytes_and_a_bytearray_is_viewed_without_copy():
    assert encode_weights(_state()) == encode_weights(_state())
    data = encode_weights(_state())
    tensors = decode_weights(data, expand_aliases=False)
    buffer = torch.frombuffer(data, dtype=torch.uint8)
    start, end = buffer.data_ptr(), buffer.data_ptr() + len(data)
    assert start <= tensors["encoder.w"].data_ptr() < end


F32 = {"dtype": "F32", "shape": [1]}


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


@pytest.mark.parametrize(
    ("header", "body", "why"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
        ({"a": F32 | {"data_offsets": [0, 4]}}, b"\0" * 8, "after the last"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4, "inconsistent"),
        ({"a": F32 | {"dtype": "PICKLE", "data_offsets": [0, 4]}}, b"\0" * 4, "inconsistent"),
        ({"__metadata__": {ALIASES_META: json.dumps({"x": "nope"})},
          "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "alias"),
    ],
)  # fmt: skip
def test_malformed_layouts_are_refused_before_any_tensor_is_built(header, body, why):
    with pytest.raises(MalformedWeights, match=why):
        decode_weights(_with_header(header, body))


def test_a_header_longer_than_the_object_is_refused():
    with pytest.raises(MalformedWeights, match="not a safetensors file"):
        decode_weights((10**9).to_bytes(8, "little") + b"{}")


def test_the_hash_made_while_encoding_is_the_hash_of_the_bytes():
    import hashlib

    from fednnunet.adapters.weights_codec import encode_weights_sha256

    big = {f"layer{i}.w": torch.randn(1 << 20) for i in range(12)}  # 48 MB: many spans
    for state in (_state(), big):
        data, sha = encode_weights_sha256(state, {"k": "v"})
        assert data == encode_weights(state, {"k": "v"})
        assert sha == hashlib.sha256(data).hexdigest()
