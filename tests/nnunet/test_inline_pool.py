"""nnU-Net's per-case pools run inline for small datasets: same outputs, no processes."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from fednnunet.nnunet.compat import InlinePool, inline_pools
from fednnunet.nnunet.demo_data import make_demo_federation
from fednnunet.nnunet.planning import plan_and_preprocess


def _fails(x: int) -> int:
    raise ValueError(f"bad case {x}")


def test_inline_pool_behaves_like_the_parts_of_a_pool_nnunet_uses() -> None:
    with InlinePool(4) as pool:
        assert pool.starmap(pow, [(2, 3), (3, 2)]) == [8, 9]
        assert pool.map(abs, [-1, 2]) == [1, 2]
        assert all(w.is_alive() for w in pool._pool)
        done = pool.starmap_async(pow, [(2, 2)])
        assert done.ready() and done.get() == [4]
        failed = pool.starmap_async(_fails, [(7,)])  # raised on get(), as from a pool
        assert failed.ready()
        with pytest.raises(ValueError, match="bad case 7"):
            failed.get()


def test_patches_are_undone_even_after_an_error() -> None:
    import nnunetv2.preprocessing.preprocessors.default_preprocessor as pre
    import nnunetv2.utilities.utils as utils

    with pytest.raises(RuntimeError), inline_pools():
        assert pre.multiprocessing.get_context("spawn").Pool is InlinePool
        assert utils.Pool is InlinePool
        raise RuntimeError("boom")
    assert pre.multiprocessing is multiprocessing
    assert utils.Pool is multiprocessing.Pool
    with inline_pools(enabled=False):
        assert utils.Pool is multiprocessing.Pool


def _preprocessed(folder: Path) -> dict[str, np.ndarray]:
    """Every array nnU-Net wrote (blosc2 .b2nd or npz), by file name."""
    import blosc2

    out = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".b2nd":
            out[f.name] = np.asarray(blosc2.open(urlpath=str(f), mode="r")[:])
        elif f.suffix in (".npz", ".npy"):
            out[f.name] = np.load(f)
    return out


@pytest.mark.nnunet
def test_inline_and_pooled_preprocessing_write_the_same_data(tmp_path, monkeypatch) -> None:
    multiprocessing.set_start_method("spawn", force=True)
    raw = tmp_path / "raw"
    make_demo_federation(raw, dataset_ids=(901,), num_cases=4)
    results = {}
    for mode in ("inline", "pooled"):
        pre = tmp_path / f"pre-{mode}"
        pre.mkdir()
        monkeypatch.setenv("nnUNet_raw", str(raw))
        monkeypatch.setenv("nnUNet_preprocessed", str(pre))
        monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
        children_before = len(multiprocessing.active_children())
        plans = plan_and_preprocess(901, ["2d"], num_processes=2, inline=mode == "inline")
        if mode == "inline":
            assert len(multiprocessing.active_children()) == children_before
        folder = pre / "Dataset901_DemoSite1" / plans["configurations"]["2d"]["data_identifier"]
        results[mode] = (plans, _preprocessed(folder), sorted(os.listdir(folder)))
    plans_a, arrays_a, files_a = results["inline"]
    plans_b, arrays_b, files_b = results["pooled"]
    assert plans_a == plans_b
    assert files_a == files_b and len(arrays_a) >= 4
    for name, array in arrays_a.items():
        np.testing.assert_array_equal(array, arrays_b[name], err_msg=name)
