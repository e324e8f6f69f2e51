"""Quality and end-to-end cost: FFE federation vs centralized nnU-Net on the pooled data.

One run answers four questions on the same demo data (3 sites):

- quality: per-site Dice of the FFE model vs the centralized model (same total epochs,
  same iterations per epoch), each evaluated on the site's own fold-0 validation cases;
- B4: federated wall time vs the local training time of the slowest site;
- B5: one-machine simulation wall vs centralized training wall;
- B6: federated fingerprint+plan+preprocess vs plan+preprocess of the pooled data
  (wall and peak memory of the whole process tree).

``python -m bench.quality [--rounds 10] [--iterations 25]`` (needs the local stack).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import BenchResult, Target, print_result, write_json

REPO = Path(__file__).resolve().parents[1]
SITE_IDS = (901, 902, 903)
POOLED_ID = 910


class TreeMemory(threading.Thread):
    """Summed RSS of processes and all their descendants, sampled every 0.2 s.

    Samples keep their (wall-clock) time, so the peak of one phase can be read.
    """

    def __init__(self, pids_fn) -> None:
        super().__init__(daemon=True)
        self.pids_fn, self.peak, self._stop_event = pids_fn, 0, threading.Event()
        self.samples: list[tuple[float, int]] = []

    def peak_between(self, t0: float, t1: float) -> int:
        return max((b for t, b in self.samples if t0 <= t <= t1), default=0)

    def run(self) -> None:
        while not self._stop_event.wait(0.2):
            total = 0
            for pid in _tree(self.pids_fn()):
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            self.samples.append((time.time(), total))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def _tree(roots: list[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return out


def _env(root: Path) -> dict[str, str]:
    from fednnunet.nnunet.env import make_nnunet_dirs

    return dict(os.environ) | make_nnunet_dirs(root)


def _dice(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> float:
    scores = []
    for lab in labels:
        p, r = pred == lab, ref == lab
        denom = p.sum() + r.sum()
        scores.append(1.0 if denom == 0 else 2.0 * (p & r).sum() / denom)
    return float(np.mean(scores))


def centralized(root: Path, epochs: int, iterations: int, val_iterations: int) -> dict:
    """Runs in a child process: plan+preprocess the pooled data, then train like nnU-Net."""
    import torch

    from fednnunet.nnunet.planning import plan_and_preprocess
    from fednnunet.nnunet.session import FederatedTrainingSession

    t0 = time.perf_counter()
    plan_window = [time.time()]
    plan_and_preprocess(POOLED_ID, ["2d"], num_processes=2)
    plan_window.append(time.time())
    t_plan = time.perf_counter() - t0
    t1 = time.perf_counter()
    session = FederatedTrainingSession(
        POOLED_ID,
        "2d",
        0,
        device="cpu",
        total_epochs=epochs,
        iterations_per_epoch=iterations,
        val_iterations_per_epoch=val_iterations,
        torch_threads=torch.get_num_threads(),
        da_processes=0,
    )
    session.train_epochs(epochs)
    t_train = time.perf_counter() - t1
    result = session.finish(run_validation=True)
    session.close()
    return {
        "plan_s": t_plan,
        "plan_window": plan_window,
        "train_s": t_train,
        "total_s": time.perf_counter() - t0,
        "fold_folder": str(result.get("fold_folder") or result["results_folder"]),
    }


def _site_val_cases(env: dict[str, str], dataset_id: int) -> list[str]:
    pre = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{dataset_id}_*"))
    return json.loads((pre / "splits_final.json").read_text())[0]["val"]


def _centralized_dice_per_site(env: dict[str, str], model_fold: Path, out: Path) -> dict:
    import SimpleITK as sitk

    from fednnunet.nnunet.predict import predict_folder

    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    dice = {}
    for ds in SITE_IDS:
        raw = next(Path(env["nnUNet_raw"]).glob(f"Dataset{ds}_*"))
        cases = _site_val_cases(env, ds)
        inp = out / f"in{ds}"
        inp.mkdir(parents=True, exist_ok=True)
        for c in cases:
            link = inp / f"{c}_0000.nii.gz"
            if not link.exists():
                link.symlink_to(raw / "imagesTr" / f"{c}_0000.nii.gz")
        preds = predict_folder(model_fold.parent, inp, out / f"pred{ds}", folds=(0,), device="cpu")
        labels = [
            v
            for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items()
            if k != "background"
        ]
        scores = []
        for p in preds:
            case = p.name[: -len(".nii.gz")]
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / p.name)))
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
            scores.append(_dice(pred, ref, labels))
            del case
        dice[str(ds)] = float(np.mean(scores))
    return dice


def _run_federated(
    env: dict[str, str], rounds: int, iterations: int, val_iterations: int, log_dir: Path
) -> tuple[dict, float, int]:
    from fednnunet.cli.simulate import LocalFederation, submit, wait_for
    from fednnunet.settings import get_settings
    from fednnunet.spec import parse_spec

    settings = get_settings()
    sites = {f"q{time.strftime('%H%M%S')}-{i}": i for i in SITE_IDS}
    spec = parse_spec(
        {
            "experiment_id": f"quality-{time.strftime('%Y%m%d-%H%M%S')}",
            "sites": list(sites),
            "method": "ffe",
            "configuration": "2d",
            "fold": 0,
            "rounds": rounds,
            "iterations_per_epoch": iterations,
            "val_iterations_per_epoch": val_iterations,
            "device": "cpu",
            "heartbeat_timeout_s": 600,
        }
    )
    phase_times: dict[str, float] = {}
    phase_clock: dict[str, float] = {}
    t0 = time.perf_counter()
    fed = LocalFederation(
        sites,
        log_dir,
        env={k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")},
    )
    with fed:
        mem = TreeMemory(lambda: [p.pid for p in fed.procs.values()])
        mem.start()
        fed.wait_ready()  # long-lived site services: their start-up is not federation time
        t0 = time.perf_counter()
        submit(settings, spec)

        def on_update(state, _redis) -> None:
            fed.check_alive()
            phase_times.setdefault(state.phase, time.perf_counter() - t0)
            phase_clock.setdefault(state.phase, time.time())

        phase_clock["submitted"] = time.time()
        state = wait_for(settings, spec.experiment_id, 7200, on_update=on_update)
        mem.stop()
        # B6 compares planning with planning: the window from submission to the first
        # training round (the workers' own idle memory included, as it is in the
        # centralized process).
        peak_planning = mem.peak_between(
            phase_clock["submitted"], phase_clock.get("train", time.time())
        )
    wall = time.perf_counter() - t0
    if state.phase != "done":
        raise RuntimeError(f"federated run ended {state.phase}: {state.error}")
    info = {"state": state.model_dump(mode="json"), "phase_times": phase_times, "sites": sites}
    return info, wall, peak_planning


def run(quick: bool = False) -> BenchResult:
    """Entry point of ``python -m bench.run quality``."""
    return measure(rounds=4 if quick else 10, iterations=10 if quick else 25)


def measure(
    rounds: int = 10, iterations: int = 25, val_iterations: int = 5, workdir: Path | None = None
) -> BenchResult:
    import statistics

    from fednnunet.core.state_machine import ExperimentState
    from fednnunet.nnunet.demo_data import make_demo_federation, make_pooled_dataset

    root = (workdir or REPO / "bench" / "out" / "quality_run").resolve()
    if root.exists():
        import shutil

        shutil.rmtree(root)
    env = _env(root)
    make_demo_federation(Path(env["nnUNet_raw"]), SITE_IDS, num_cases=8, seed=0)
    make_pooled_dataset(Path(env["nnUNet_raw"]), SITE_IDS, POOLED_ID)

    info, fed_wall, fed_peak = _run_federated(
        env, rounds, iterations, val_iterations, root / "logs"
    )
    state = ExperimentState.model_validate(info["state"])
    pt = info["phase_times"]
    fed_planning = pt.get("train", 0.0) - pt.get("fingerprint", 0.0)
    site_train = {
        s: sum(r.metrics.get(s, {}).get("train_s", 0.0) for r in state.history) for s in state.sites
    }
    slowest = max(site_train.values())
    overheads = [r.overhead_s() for r in state.history if r.overhead_s() is not None]

    # Centralized baseline in a child process (its own nnU-Net env), memory sampled.
    t0 = time.perf_counter()
    child = subprocess.Popen(  # noqa: S603 - own interpreter, argv list, no shell
        [
            sys.executable,
            "-c",
            "import json,sys; from bench.quality import centralized; "
            f"print('RESULT'+json.dumps(centralized(__import__('pathlib').Path('{root}'), "
            f"{rounds}, {iterations}, {val_iterations})))",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    mem = TreeMemory(lambda: [child.pid])
    mem.start()
    out, _ = child.communicate()
    mem.stop()
    if child.returncode != 0:
        raise RuntimeError(f"centralized run failed:\n{out[-3000:]}")
    cen = json.loads(out.rsplit("RESULT", 1)[1].splitlines()[0])
    cen_wall = time.perf_counter() - t0
    cen_peak = mem.peak_between(*cen["plan_window"])

    cen_dice = _centralized_dice_per_site(env, Path(cen["fold_folder"]), root / "cen_pred")
    fed_dice = {str(info["sites"][s]): state.final_metrics[s]["mean_dice"] for s in state.sites}

    rows = [
        [f"site {ds}", fed_dice[str(ds)], cen_dice[str(ds)], fed_dice[str(ds)] - cen_dice[str(ds)]]
        for ds in SITE_IDS
    ]
    rows.append(
        [
            "mean",
            statistics.mean(fed_dice.values()),
            statistics.mean(cen_dice.values()),
            statistics.mean(fed_dice.values()) - statistics.mean(cen_dice.values()),
        ]
    )
    fed_train_wall = pt.get("validate", fed_wall) - pt.get("train", 0.0)
    b4 = fed_train_wall / slowest
    b5 = fed_train_wall / cen["train_s"]
    b6_wall = fed_planning / cen["plan_s"]
    notes = [
        f"{rounds} rounds x 1 epoch x {iterations} iterations per site; centralized "
        f"{rounds} epochs x {iterations} iterations on the pooled data (same total epochs)",
        f"federated wall {fed_wall:.1f}s (fingerprint+plan {fed_planning:.1f}s, training "
        f"{fed_train_wall:.1f}s); slowest site local training {slowest:.1f}s",
        f"centralized: plan+preprocess {cen['plan_s']:.1f}s, training {cen['train_s']:.1f}s, "
        f"total {cen_wall:.1f}s",
        "B6 centralized = what nnUNetv2_plan_and_preprocess does (integrity check, fingerprint, "
        "plans, preprocessing with 2 spawned workers per step), nnU-Net's imports included; the "
        "site workers import nnU-Net when they start (long-lived services, ready before the "
        "experiment is submitted) and, below 16 cases, run those per-case steps inline",
        f"per-round overhead outside local training: median "
        f"{statistics.median(overheads):.2f}s over {len(overheads)} rounds"
        if overheads
        else "no overhead measured",
        f"peak RSS while planning (process tree): federation {fed_peak / 1e9:.2f} GB "
        f"(coordinator + 3 site workers and their children), centralized "
        f"{cen_peak / 1e9:.2f} GB",
    ]
    targets = [
        Target(
            "B4",
            "federated training wall <= 1.10 x slowest site's local training",
            f"{b4:.2f}x",
            b4 <= 1.10,
        ),
        Target("B5", "simulation wall <= 1.2 x centralized training wall", f"{b5:.2f}x", b5 <= 1.2),
        Target(
            "B6",
            "federated fingerprint+plan+preprocess <= 1.5 x centralized wall",
            f"{b6_wall:.2f}x",
            b6_wall <= 1.5,
        ),
        Target(
            "B6-mem",
            "peak memory <= 1.5 x centralized",
            f"{fed_peak / cen_peak:.2f}x",
            fed_peak <= 1.5 * cen_peak,
        ),
    ]
    return BenchResult(
        name="quality",
        title="FFE vs centralized nnU-Net (Dice on each site's fold-0 val cases)",
        columns=["site", "FFE Dice", "centralized Dice", "difference"],
        rows=rows,
        targets=targets,
        notes=notes,
        raw={
            "fed_dice": fed_dice,
            "cen_dice": cen_dice,
            "fed_wall_s": fed_wall,
            "fed_planning_s": fed_planning,
            "fed_train_wall_s": fed_train_wall,
            "site_train_s": site_train,
            "round_overheads_s": overheads,
            "centralized": cen,
            "fed_peak_rss": fed_peak,
            "cen_peak_rss": cen_peak,
            "phase_times": pt,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--val-iterations", type=int, default=5)
    args = parser.parse_args()
    subprocess.run(["bash", str(REPO / "deploy" / "local" / "stack.sh"), "up"], check=True)  # noqa: S603, S607 - bash runs our own script
    result = measure(args.rounds, args.iterations, args.val_iterations)
    print_result(result)
    print(f"  -> {write_json(result)}")


if __name__ == "__main__":
    main()
