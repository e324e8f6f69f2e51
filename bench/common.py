"""Shared benchmark helpers: timing, machine description, result tables and JSON.

Each benchmark module exposes ``run(quick: bool) -> BenchResult``; the runner
prints the table and writes ``bench/results/<name>.json``. Timings on a shared
2-core machine are noisy, so every figure is a median over repeats and every
comparison is a ratio measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Benchmarks run on the local development stack (well-known credentials).
os.environ.setdefault("FEDNNUNET_DEVELOPMENT", "true")
# This checkout's local S3 (deploy/local/stack.sh keeps its port there).
_STACK_DIR = Path(os.environ.get("FEDNNUNET_STACK_DIR", Path(__file__).parents[1] / ".stack"))
if (_STACK_DIR / "s3_port").is_file():
    os.environ.setdefault(
        "FEDNNUNET_S3_ENDPOINT", f"127.0.0.1:{(_STACK_DIR / 's3_port').read_text().strip()}"
    )

OUT_DIR = Path(__file__).resolve().parent / "results"  # tracked: RESULTS.md is made from it


@dataclass
class Target:
    """One acceptance target and whether this run met it."""

    name: str
    goal: str
    measured: str
    met: bool


@dataclass
class BenchResult:
    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "machine": machine_info(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``repeats`` runs (and all samples)."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    import torch

    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "mem_gb": mem_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
    }


def write_json(result: BenchResult, out_dir: Path = OUT_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result.name}.json"
    path.write_text(json.dumps(result.to_json(), indent=2, default=str))
    return path


def print_result(result: BenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=result.title)
    for col in result.columns:
        table.add_column(col, justify="right")
    for row in result.rows:
        table.add_row(*(fmt(v) for v in row))
    console.print(table)
    for t in result.targets:
        mark = "[green]met[/]" if t.met else "[red]NOT met[/]"
        console.print(f"  target {t.name}: {t.goal} — measured {t.measured} → {mark}")
    for note in result.notes:
        console.print(f"  [dim]{note}[/]")


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def markdown_table(result: BenchResult) -> str:
    lines = [
        "| " + " | ".join(result.columns) + " |",
        "|" + "|".join("---:" for _ in result.columns) + "|",
    ]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in result.rows]
    return "\n".join(lines)


def purge_s3(store: Any, bucket: str, prefix: str) -> int:
    """Delete a benchmark's objects (the local S3 server has a finite number of volumes)."""
    from minio.deleteobjects import DeleteObject

    names = [DeleteObject(k) for k in store.list_keys(bucket, prefix)]
    if names:
        errors = list(store.client.remove_objects(bucket, names))
        if errors:
            raise RuntimeError(f"could not delete {len(errors)} objects from {bucket}")
    return len(names)
