"""B1: aggregation throughput and peak memory of the production streaming path.

K site updates of nnU-Net's real 2d / 3d_fullres networks (PlainConvUNet, as the
stand-in session builds them, random weights) are written once as safetensors
files, then averaged with :func:`aggregate_files` — the function
``aggregate_round`` runs after download and screening. Throughput is unique
update bytes × K per second. Peak memory is measured in a fresh subprocess per
case: ``ru_maxrss`` after the aggregation minus ``ru_maxrss`` after imports,
so it should stay ≈ result + one update whatever K.

Only 8 distinct update files are written per model; K = 32 cycles through them
(every load is still a full read of a file from the page cache, as it would be
after the download).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BenchResult, Target

MODELS = ("nnunet2d", "nnunet3d")
DISTINCT_FILES = 8


def _weights(k: int) -> list[float]:
    return [float(4 + i % 5) for i in range(k)]


def prepare(model: str, folder: Path, n: int = DISTINCT_FILES) -> tuple[list[Path], int]:
    """Write ``n`` differently seeded updates of ``model``; return (paths, unique bytes)."""
    from fednnunet.adapters.weights_codec import save_weights_file
    from fednnunet.core.tensors import unique_nbytes
    from tests.support.standin import build_state

    paths, nbytes = [], 0
    for i in range(n):
        state = build_state(model, seed=1000 + i)
        nbytes = unique_nbytes(state)
        path = folder / f"{model}-{i}.safetensors"
        save_weights_file(state, path)
        paths.append(path)
    return paths, nbytes


def _paths_for(paths: list[Path], k: int) -> list[Path]:
    return [paths[i % len(paths)] for i in range(k)]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM (Linux ≥ 4.0). ru_maxrss cannot be used: it survives fork+exec,
    so a child would report the benchmark parent's peak."""
    Path("/proc/self/clear_refs").write_text("5")


def _child(paths: list[str], out: str) -> None:
    """Subprocess entry: peak RSS growth of one aggregate_files call."""
    import torch  # noqa: F401 - imported before the baseline is taken

    from fednnunet.coordinator.aggregator import aggregate_files

    base = _status_mb("VmRSS")
    _reset_peak()
    aggregate_files([Path(p) for p in paths], _weights(len(paths)), Path(out))
    print(json.dumps({"base_mb": base, "peak_mb": _status_mb("VmHWM")}))


def peak_memory_mb(paths: list[Path], out: Path) -> float:
    proc = subprocess.run(  # noqa: S603 - own interpreter, argv list, no shell
        [sys.executable, "-m", "bench.b1_aggregation", "--child", str(out), *map(str, paths)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return info["peak_mb"] - info["base_mb"]


def _timed(fn, repeats: int) -> tuple[float, float, list[float]]:
    """(median wall s, median CPU s of this process, wall samples)."""
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), walls


def run(quick: bool = False) -> BenchResult:
    from fednnunet.coordinator.aggregator import aggregate_files, screen_update_file

    ks = (2, 8, 32)
    repeats = 3 if quick else 5
    rows, raw = [], {}
    peak_ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fednnunet-b1-") as tmp:
        folder = Path(tmp)
        for model in MODELS:
            files, nbytes = prepare(model, folder)
            model_mb = nbytes / 1e6
            # Screening is per update (linear in K): measured once over the distinct files.
            screen_wall, screen_cpu, _ = _timed(
                lambda files=files: [screen_update_file(p, None, 1.0) for p in files], 1
            )
            screen_per_update = screen_wall / len(files)
            for k in ks:
                paths = _paths_for(files, k)
                out = folder / f"out-{model}-{k}.safetensors"
                wall, cpu, samples = _timed(
                    lambda paths=paths, out=out: aggregate_files(paths, _weights(len(paths)), out),
                    repeats,
                )
                peak = peak_memory_mb(paths, out)
                data_gb = nbytes * k / 1e9
                rows.append(
                    [
                        model,
                        k,
                        model_mb,
                        wall,
                        data_gb / wall,
                        data_gb / cpu,
                        data_gb / (wall + k * screen_per_update),
                        peak,
                        peak / model_mb,
                    ]
                )
                raw[f"{model}/K{k}"] = {
                    "unique_bytes": nbytes,
                    "avg_wall_samples": samples,
                    "avg_cpu_s": cpu,
                    "screen_s_per_update": screen_per_update,
                    "screen_cpu_s_per_update": screen_cpu / len(files),
                    "peak_mb": peak,
                }
                peak_ratios.append(peak / model_mb)
    # K = 2 is dominated by the fixed cost of writing the result (one model): the
    # throughput target is judged where averaging dominates.
    min_gbps = min(r[4] for r in rows if r[1] >= 8)
    max_ratio = max(peak_ratios)
    return BenchResult(
        name="b1",
        title="B1 aggregation: aggregate_files (streaming FedAvg from safetensors files)",
        columns=[
            "model",
            "K",
            "model MB",
            "avg s",
            "avg GB/s",
            "avg GB/CPU-s",
            "screen+avg GB/s",
            "peak ΔRSS MB",
            "peak/model",
        ],
        rows=rows,
        targets=[
            Target(
                "throughput",
                "≥ 1 GB/s (averaging, K ≥ 8)",
                f"min {min_gbps:.2f} GB/s",
                min_gbps >= 1,
            ),
            Target(
                "peak memory",
                "≤ 3 × model, independent of K",
                f"max {max_ratio:.2f} × model",
                max_ratio <= 3,
            ),
        ],
        notes=[
            "avg = aggregate_files (load one update at a time, StreamingFedAvg, write result);",
            "screen = aggregate_round's quarantine checks (NaN/Inf, norm), a pass per update",
            "GB/CPU-s = data / CPU time of the process (less sensitive to other load on the box)",
            f"medians over {repeats} repeats; {DISTINCT_FILES} distinct files, K=32 cycles them",
        ],
        raw=raw,
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[3:], sys.argv[2])
    else:
        from bench.common import print_result, write_json

        res = run(quick="--quick" in sys.argv)
        print_result(res)
        write_json(res)
