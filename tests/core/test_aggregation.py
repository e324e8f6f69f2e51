import torch

from fednnunet.core.aggregation import StreamingFedAvg, common_layers
from tests.support.fedavg_oracle import fedavg_oracle
from tests.support.reference import fedavg


def test_weighted_fedavg_matches_manual_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    out = fedavg([(a, 1.0), (b, 3.0)])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(out["b"], torch.tensor([3.0]))


def test_common_layers_requires_same_name_and_shape_everywhere():
    shapes = [
        {"enc.w": (4, 3), "dec.w": (2, 2), "seg.w": (3, 1)},
        {"enc.w": (4, 3), "dec.w": (2, 5), "seg.w": (3, 1)},
        {"enc.w": (4, 3), "seg.w": (3, 1), "extra": (1,)},
    ]
    assert common_layers(shapes) == ["enc.w", "seg.w"]


def test_asymmetric_updates_average_only_common_layers():
    a = {"enc": torch.ones(3), "head": torch.zeros(2)}
    b = {"enc": torch.full((3,), 3.0), "head": torch.zeros(5)}
    out = fedavg([(a, 1.0), (b, 1.0)])
    assert set(out) == {"enc"}
    assert torch.allclose(out["enc"], torch.full((3,), 2.0))


def test_streaming_keeps_dtype_and_takes_first_integer_counter():
    acc = StreamingFedAvg(["w", "n"])
    acc.add({"w": torch.ones(2, dtype=torch.float16), "n": torch.tensor(5)}, 1.0)
    acc.add({"w": torch.zeros(2, dtype=torch.float16), "n": torch.tensor(9)}, 1.0)
    out = acc.result({"w": torch.float16})
    assert out["w"].dtype == torch.float16
    assert torch.allclose(out["w"].float(), torch.full((2,), 0.5))
    assert int(out["n"]) == 5


def test_streaming_equals_in_memory_for_many_sites():
    gen = torch.Generator().manual_seed(0)
    updates = [({"x": torch.randn(50, generator=gen)}, float(i + 1)) for i in range(8)]
    expected = sum(u["x"] * w for u, w in updates) / sum(w for _, w in updates)
    assert torch.allclose(fedavg(updates)["x"], expected, atol=1e-6)


def test_bad_weight_rejected():
    acc = StreamingFedAvg(["x"])
    for bad in (0.0, -1.0, float("nan")):
        try:
            acc.add({"x": torch.ones(1)}, bad)
        except ValueError:
            continue
        raise AssertionError(f"weight {bad} accepted")


# ---------------------------------------------------------------- the independent oracle
def test_oracle_is_the_textbook_formula():
    """Worked by hand: (1*[0, 2] + 3*[4, 6]) / 4 = [3, 5]; layers not shared are left out."""
    a = {"w": torch.tensor([0.0, 2.0]), "only_a": torch.ones(1), "step": torch.tensor(7)}
    b = {"w": torch.tensor([4.0, 6.0]), "step": torch.tensor(9)}
    out = fedavg_oracle([(a, 1.0), (b, 3.0)])
    assert set(out) == {"w", "step"}
    assert out["w"].tolist() == [3.0, 5.0] and out["w"].dtype == torch.float32
    assert out["step"].item() == 7  # counters are not averaged


def test_product_fedavg_agrees_with_the_oracle():
    gen = torch.Generator().manual_seed(0)
    updates = [
        ({"a": torch.randn(5, 3, generator=gen), "b": torch.randn(4, generator=gen)}, n)
        for n in (3.0, 11.0, 1.0)
    ]
    got, want = fedavg(updates), fedavg_oracle(updates)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k


def test_a_sum_allocated_before_the_first_update_gives_the_same_bits():
    """Preallocated at -0.0 (the identity of float addition), the sum of w * x is bit for
    bit the sum started from the first update, negative zeros included."""
    g = torch.Generator().manual_seed(3)
    updates = []
    for _ in range(3):
        w = torch.randn(64, generator=g)
        w[:8] = -0.0  # products that are negative zero
        w[8:16] = 0.0
        updates.append({"w": w, "h": torch.randn(5, generator=g).to(torch.float64),
                        "n": torch.tensor(7)})  # fmt: skip
    weights = [3.0, 1.0, 2.5]

    def mean(like):
        acc = StreamingFedAvg(["w", "h", "n"], like=like)
        for u, wt in zip(updates, weights, strict=True):
            acc.add({k: v.clone() for k, v in u.items()}, wt)
        return acc.result()

    plain, early = mean(None), mean(updates[0])
    for name in ("w", "h"):
        bits = torch.int64 if plain[name].dtype == torch.float64 else torch.int32
        assert torch.equal(plain[name].view(bits), early[name].view(bits))
    assert int(early["n"]) == 7
    # and the mean itself, by the independent formula
    expected = sum(wt * u["w"] for u, wt in zip(updates, weights, strict=True)) / sum(weights)
    assert torch.allclose(early["w"], expected, rtol=1e-6, atol=1e-7)
