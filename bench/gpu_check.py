"""GPU check: federation overhead per round on one CUDA device (``bench/gpu_check.sh``).

3 simulated sites share one GPU; nnU-Net 3d_fullres on demo volumes large enough for
a real network (64x160x160 voxels: nnU-Net plans a 6-stage 3d U-Net); 3 rounds x 50
iterations, once synchronous and once asynchronous (FedBuff, K = 2). Prints one
table: per round (sync) or per site-epoch (async), the federation's overhead (wall
not spent in local training: pull, push, aggregation, dispatch, waiting) as a
fraction of the local epoch time.

``--dry-run``: the same plumbing on the CPU with tiny volumes and 2 iterations (proves
the script, measures nothing about a GPU).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _overheads(info: dict, sites: dict[str, int]) -> dict[str, float]:
    state = info["state"]
    if state.asynchronous is None:
        rows = []
        for r in state.history:
            train = [r.metrics.get(s, {}).get("train_s") for s in r.participants]
            train = [t for t in train if t]
            if train and r.overhead_s() is not None:
                rows.append((r.overhead_s(), max(train)))
        epoch = statistics.median(t for _, t in rows)
        over = statistics.median(o for o, _ in rows)
    else:
        # Per site: train-phase wall / its epochs - its median epoch time.
        per_epoch, epochs = [], []
        for s in sites:
            train = [
                r.metrics[s]["train_s"] for r in state.history if "train_s" in r.metrics.get(s, {})
            ]
            n = state.asynchronous.applied_epochs.get(s, 0)
            if train and n:
                per_epoch.append(info["train_s"] / n - statistics.median(train))
                epochs.append(statistics.median(train))
        epoch, over = statistics.median(epochs), statistics.median(per_epoch)
    return {"epoch_s": epoch, "overhead_s": over, "fraction": over / epoch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes")
    args = parser.parse_args(argv)

    import torch

    from fednnunet.cli.simulate import LocalFederation
    from fednnunet.nnunet.demo_data import make_demo_federation
    from fednnunet.settings import get_settings

    p7 = importlib.import_module("bench.async")
    make_nnunet_dirs = p7.make_nnunet_dirs
    if args.dry_run:
        device, shape, iterations, rounds, val_it = "cpu", (16, 32, 32), 2, 2, 1
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --dry-run to test the plumbing on the CPU)")
            return 2
        device, shape, iterations, rounds, val_it = "cuda", (64, 160, 160), 50, 3, 5
    root = Path(tempfile.mkdtemp(prefix="fednnunet-gpu-check-"))
    env = make_nnunet_dirs(root) | {"nnUNet_def_n_proc": "2"}
    ids = (901, 902, 903)
    make_demo_federation(Path(env["nnUNet_raw"]), ids, num_cases=8, shape=shape, seed=0)
    tag = time.strftime("%H%M%S")
    sites = {f"gpu-{tag}-{ds}": ds for ds in ids}
    params = {
        "configuration": "3d_fullres",
        "device": device,
        "rounds": rounds,
        "iterations_per_epoch": iterations,
        "val_iterations_per_epoch": val_it,
        "simulate_slowdown": {},
    }
    rows = []
    t0 = time.time()
    with LocalFederation(sites, root / "logs", env=env, cpus=6) as fed:
        fed.wait_ready()
        for mode, extra in (("sync", {}), ("async", {"mode": "async", "buffer_size": 2})):
            info = p7.run_experiment(get_settings(), fed, sites, mode, params | extra)
            o = _overheads(info, sites)
            rows.append((mode, info["train_s"], info["wall_s"], o))
    head = ("mode", "train wall s", "experiment wall s", "epoch s", "overhead s", "overhead/epoch")
    print(
        f"\nGPU check ({device}{', DRY RUN' if args.dry_run else ''}; "
        f"{torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}; "
        f"3 sites, 3d_fullres {shape}, {rounds} rounds x {iterations} it; "
        f"total {time.time() - t0:.0f} s)"
    )
    print(" | ".join(head))
    for mode, train_s, wall_s, o in rows:
        print(
            f"{mode} | {train_s:.1f} | {wall_s:.1f} | {o['epoch_s']:.2f} | "
            f"{o['overhead_s']:.2f} | {100 * o['fraction']:.1f} %"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
