"""Every nnU-Net internal fednnunet relies on is checked by name against the installed
nnunetv2; an upgrade that changes one fails here, saying which."""

from __future__ import annotations

import importlib
import multiprocessing

import pytest

from fednnunet.errors import FedError
from fednnunet.nnunet import compat


@pytest.mark.parametrize("internal", list(compat.INTERNALS))
def test_nnunet_internal_is_as_fednnunet_expects(internal: str) -> None:
    compat.INTERNALS[internal]()  # raises IncompatibleNnunet naming the internal


def test_the_installed_nnunet_is_a_tested_version_and_has_no_incompatibility() -> None:
    assert compat.require_tested_nnunet().startswith("2.8.")
    assert compat.incompatibilities() == []


@pytest.mark.parametrize("version", ["2.7.0", "2.6.4", "2.9.0", "3.0.1", "1.7"])
def test_untested_nnunet_versions_are_refused_in_one_line(version: str) -> None:
    with pytest.raises(FedError) as err:
        compat.check_nnunet_version(version)
    text = str(err.value)
    assert f"nnunetv2 {version} is not supported" in text and "\n" not in text


@pytest.mark.parametrize("version", ["2.8.0", "2.8.1", "2.8.10"])
def test_tested_versions_pass(version: str) -> None:
    compat.check_nnunet_version(version)


def test_a_changed_internal_is_named_in_the_failure(monkeypatch) -> None:
    """Simulated upgrade: run_training calls one more hook per epoch."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    source = compat._source(nnUNetTrainer.run_training)
    changed = source.replace("self.on_epoch_end()", "self.on_epoch_end()\n    self.on_new()")
    monkeypatch.setattr(compat, "_source", lambda obj: changed)
    with pytest.raises(compat.IncompatibleNnunet, match=r"nnUNetTrainer\.run_training"):
        compat.INTERNALS["run_training hook order"]()
    assert any("run_training" in p for p in compat.incompatibilities())


def test_an_eagerly_bound_path_variable_is_detected(monkeypatch) -> None:
    """nnunetv2 < 2.8 bound nnUNet_raw at import: temporary_env would not reach it."""
    import nnunetv2.paths as paths

    monkeypatch.setattr(paths, "nnUNet_raw", "/bound/at/import")
    with pytest.raises(compat.IncompatibleNnunet, match=r"nnunetv2\.paths\.nnUNet_raw"):
        compat.INTERNALS["nnunetv2.paths (read at each use)"]()


def test_pool_globals_are_swapped_and_restored() -> None:
    with compat.inline_pools():
        for name, attr in compat.POOL_GLOBALS:
            swapped = getattr(importlib.import_module(name), attr)
            pool = swapped.get_context("spawn").Pool if attr == "multiprocessing" else swapped
            assert pool is compat.InlinePool, name
    utils = importlib.import_module("nnunetv2.utilities.utils")
    assert utils.Pool is multiprocessing.Pool
