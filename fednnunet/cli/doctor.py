"""``fednnunet doctor``: every dependency a site or coordinator needs, pass/fail, with a fix."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fednnunet.settings import Settings


def _check(fn: Callable[[], str]) -> tuple[bool, str]:
    try:
        return True, fn()
    except Exception as exc:  # noqa: BLE001 - report every failure as a row
        return False, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def run_checks(settings: Settings, console: Console) -> bool:
    from fednnunet.adapters.broker import check_broker
    from fednnunet.adapters.redis_state import RedisState
    from fednnunet.adapters.s3_store import ArtifactStore

    def broker() -> str:
        check_broker(settings)
        return "reachable"

    def redis() -> str:
        RedisState.from_settings(settings).ping()
        return "reachable"

    def s3() -> str:
        ArtifactStore(settings, retry_total_s=3).ping()
        return f"reachable at {settings.s3_endpoint}"

    def nnunet_var(var: str) -> Callable[[], str]:
        def fn() -> str:
            val = os.environ.get(var)
            if not val:
                raise RuntimeError(f"{var} is not set")
            if not Path(val).is_dir():
                raise RuntimeError(f"{var}={val} is not a directory")
            if not os.access(val, os.W_OK):
                raise RuntimeError(f"{var}={val} is not writable")
            return val

        return fn

    def nnunet_pkg() -> str:
        """A tested nnunetv2 whose internals are as fednnunet relies on (compat.py)."""
        from fednnunet.nnunet import compat

        installed = compat.require_tested_nnunet()
        problems = compat.incompatibilities()
        if problems:
            raise RuntimeError("; ".join(problems))
        return f"nnunetv2 {installed}, {len(compat.INTERNALS)} internals as expected"

    def torch_device() -> str:
        import torch

        if torch.cuda.is_available():
            return f"torch {torch.__version__}, CUDA: {torch.cuda.get_device_name(0)}"
        return f"torch {torch.__version__}, CPU only (train with -device cpu)"

    def dataset() -> str:
        if settings.dataset_id is None:
            return "no FEDNNUNET_DATASET_ID (coordinator node?)"
        raw = os.environ.get("nnUNet_raw", "")
        found = list(Path(raw).glob(f"Dataset{settings.dataset_id:03d}_*")) if raw else []
        if not found:
            raise RuntimeError(f"Dataset{settings.dataset_id:03d}_* not found in nnUNet_raw")
        return str(found[0])

    checks = [
        ("RabbitMQ", broker, "start RabbitMQ or set FEDNNUNET_BROKER_URL"),
        ("Redis", redis, "start Redis or set FEDNNUNET_REDIS_URL (coordinator only)"),
        ("S3", s3, "run `fednnunet stack up` or set FEDNNUNET_S3_ENDPOINT/keys"),
        ("nnUNet_raw", nnunet_var("nnUNet_raw"), "export nnUNet_raw=/path (as for nnU-Net)"),
        ("nnUNet_preprocessed", nnunet_var("nnUNet_preprocessed"), "export nnUNet_preprocessed"),
        ("nnUNet_results", nnunet_var("nnUNet_results"), "export nnUNet_results"),
        ("nnU-Net", nnunet_pkg, "pip install -e . (pins the tested nnunetv2)"),
        ("torch device", torch_device, "install the CUDA build of torch for GPU training"),
        ("site dataset", dataset, "set FEDNNUNET_DATASET_ID to a dataset in nnUNet_raw"),
    ]
    table = Table(title="fednnunet doctor")
    for col in ("check", "result", "detail", "fix"):
        table.add_column(col)
    all_ok = True
    for name, fn, fix in checks:
        ok, detail = _check(fn)
        all_ok &= ok
        table.add_row(name, "[green]pass[/]" if ok else "[red]FAIL[/]", detail, "" if ok else fix)
    console.print(table)
    return all_ok
