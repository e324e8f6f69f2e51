"""Quality and end-to-end cost: FFE vs AsymFedAvg vs centralized vs local-only nnU-Net.

One run answers, on the same demo data (3 sites) and the same leak-free splits:

- quality: per-site Dice of four models, each trained for the same number of epochs and
  iterations per epoch, each scored on the site's own fold-0 validation cases, which no
  model trained on (``bench/pooled.py``): FFE federation, AsymFedAvg federation, plain
  nnU-Net on the pooled data (centralized), and plain nnU-Net on the site's data alone
  with its own plans (local-only); every row over several training seeds, mean and spread;
- B4: federated wall time vs the local training time of the slowest site;
- B5: one-machine simulation wall vs centralized training wall;
- B6: federated fingerprint+plan+preprocess vs plan+preprocess of the pooled data
  (wall and peak memory of the whole process tree).
B4-B6 come from the first seed's FFE and centralized runs.

Every Dice is nnU-Net's own final validation (``perform_actual_validation``: sliding
window, resampled to the original spacing, ``foreground_mean`` Dice over the labels); the
centralized model's pooled validation is split back into sites by case name.

``python -m bench.quality [--rounds 10] [--iterations 25] [--seeds 0 1] [--hard]``
(needs the local stack); ``--hard``: the harder demo federation (``hard=True``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, BenchResult, Target, print_result, write_json
from bench.pooled import (
    foreground_dice_of_cases,
    leak_free_splits,
    make_pooled_dataset,
    pooled_dice_by_site,
    read_splits,
    write_splits,
)

REPO = Path(__file__).resolve().parents[1]
SITE_IDS = (901, 902, 903)
POOLED_ID = 910
SEEDS = (0, 1)
ARMS = ("ffe", "asym", "centralized", "local")
ARM_TITLES = {
    "ffe": "FFE",
    "asym": "AsymFedAvg",
    "centralized": "centralized",
    "local": "local-only",
}
SPREAD_GOAL = 0.01


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


def _arm_env(root: Path, raw: Path, tag: str, results: str = "results") -> dict[str, str]:
    """nnU-Net folders of one run: shared raw data, its own preprocessed and results."""
    env = {
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(root / tag / "pre"),
        "nnUNet_results": str(root / tag / results),
    }
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    return env


def _validation_summary(results: Path, dataset_id: int) -> dict:
    """nnU-Net's final validation summary of the fold-0 model of one dataset."""
    hits = sorted(results.glob(f"Dataset{dataset_id:03d}_*/*__2d/fold_0/validation/summary.json"))
    if len(hits) != 1:
        raise RuntimeError(f"expected one validation summary for {dataset_id} in {results}: {hits}")
    return json.loads(hits[0].read_text())


def _check_splits_used(env: dict[str, str], splits: dict[int, Any], ids) -> None:
    """The run trained and validated on the helper's splits (nnU-Net did not replace them)."""
    for ds in ids:
        used = read_splits(Path(env["nnUNet_preprocessed"]), Path(env["nnUNet_raw"]), ds)
        if used != splits[ds]:
            raise RuntimeError(f"dataset {ds}: splits_final.json differs from the leak-free split")


# ---- child processes (own nnU-Net environment, like a user running nnUNetv2_train) -------


def _train_and_validate(
    dataset_id: int,
    epochs: int,
    iterations: int,
    val_iterations: int,
    seed: int,
    validation_processes: int,
) -> tuple[float, dict]:
    """Train one dataset alone (2d, fold 0, one torch thread) and validate it like
    nnU-Net: (training seconds, nnU-Net's validation result)."""
    from fednnunet.messages import ExperimentOptions
    from fednnunet.nnunet.session import FederatedTrainingSession

    t0 = time.perf_counter()
    options = ExperimentOptions(
        configuration="2d",
        fold=0,
        device="cpu",
        rounds=epochs,  # one epoch per "round": nnU-Net's schedule spans all of them
        iterations_per_epoch=iterations,
        val_iterations_per_epoch=val_iterations,
        seed=seed,
    )
    session = FederatedTrainingSession(dataset_id, options, torch_threads=1, da_processes=0)
    session.train_epochs(epochs)
    t_train = time.perf_counter() - t0
    result = session.finish(run_validation=True, validation_processes=validation_processes)
    session.close()
    return t_train, result


def centralized(
    epochs: int, iterations: int, val_iterations: int, seed: int, plan: bool = True
) -> dict:
    """Plan+preprocess the pooled data (``plan``), then train and validate like nnU-Net.

    One torch thread, like each federated site and each local-only run: on a shared
    2-core machine a second thread mostly spin-waits (measured: 7x slower epochs at load 12).
    """
    from fednnunet.nnunet.planning import plan_and_preprocess

    t0 = time.perf_counter()
    plan_window = [time.time()]
    if plan:
        plan_and_preprocess(POOLED_ID, ["2d"], num_processes=2)
    plan_window.append(time.time())
    t_plan = time.perf_counter() - t0
    t_train, result = _train_and_validate(
        POOLED_ID, epochs, iterations, val_iterations, seed, validation_processes=2
    )
    return {
        "plan_s": t_plan,
        "plan_window": plan_window,
        "train_s": t_train,
        "total_s": time.perf_counter() - t0,
        "fold_folder": str(result["fold_folder"]),
    }


def local_only(
    dataset_id: int, epochs: int, iterations: int, val_iterations: int, seed: int
) -> dict:
    """One site alone: its own fingerprint and plans, same epochs, one torch thread."""
    from fednnunet.nnunet.planning import plan_and_preprocess

    pre = next(Path(os.environ["nnUNet_preprocessed"]).glob(f"Dataset{dataset_id:03d}_*"))
    if not (pre / "nnUNetPlans.json").is_file():
        plan_and_preprocess(dataset_id, ["2d"], num_processes=1)
    t_train, result = _train_and_validate(
        dataset_id, epochs, iterations, val_iterations, seed, validation_processes=1
    )
    return {"train_s": t_train, "mean_dice": result["mean_dice"]}


def _start_child(call: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(  # noqa: S603 - own interpreter, argv list, no shell
        [
            sys.executable,
            "-c",
            "import json; import bench.quality as q\n"
            f"if __name__ == '__main__': print('RESULT' + json.dumps(q.{call}))",
        ],
        env=dict(os.environ) | env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _child_result(child: subprocess.Popen, what: str) -> dict:
    out, _ = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out[-3000:]}")
    return json.loads(out.rsplit("RESULT", 1)[1].splitlines()[0])


# ---- the four arms -------------------------------------------------------------------------


def _run_federated(
    env: dict[str, str],
    method: str,
    seed: int,
    rounds: int,
    iterations: int,
    val_iterations: int,
    log_dir: Path,
) -> tuple[dict, float, int]:
    from bench.common import purge_s3
    from fednnunet.adapters.s3_store import ArtifactStore
    from fednnunet.cli.simulate import LocalFederation, submit, wait_for
    from fednnunet.keys import global_bucket, site_bucket
    from fednnunet.settings import get_settings
    from fednnunet.spec import parse_spec

    settings = get_settings()
    # Fixed site ids: their buckets are reused (the local S3 server has finite volumes).
    sites = {f"quality-{i}": i for i in SITE_IDS}
    spec = parse_spec(
        {
            "experiment_id": f"quality-{method}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}",
            "sites": list(sites),
            "method": method,
            "configuration": "2d",
            "fold": 0,
            "rounds": rounds,
            "iterations_per_epoch": iterations,
            "val_iterations_per_epoch": val_iterations,
            "device": "cpu",
            "seed": seed,
            "heartbeat_timeout_s": 600,
        }
    )
    phase_times: dict[str, float] = {}
    phase_clock: dict[str, float] = {}
    t0 = time.perf_counter()
    fed = LocalFederation(sites, log_dir, env=env)
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
    store = ArtifactStore(settings)
    for site in sites:
        purge_s3(store, site_bucket(settings.bucket_prefix, site), spec.experiment_id + "/")
    purge_s3(store, global_bucket(settings.bucket_prefix), spec.experiment_id + "/")
    if state.phase != "done":
        raise RuntimeError(f"federated {method} run ended {state.phase}: {state.error}")
    state_json = state.model_dump(mode="json")
    state_json["history"] = [r.model_dump(mode="json") for r in state.history]
    info = {"state": state_json, "phase_times": phase_times, "sites": sites}
    return info, wall, peak_planning


def _seed_runs(
    root: Path,
    raw: Path,
    splits: dict,
    seed: int,
    rounds: int,
    iterations: int,
    val_iterations: int,
    first: bool,
) -> dict:
    """All four arms for one training seed: Dice per site and arm, plus timing."""
    dice: dict[str, dict[str, float]] = {}
    walls: dict[str, float] = {}
    extra: dict[str, Any] = {}
    site_splits = {ds: splits[ds] for ds in SITE_IDS}
    for method in ("ffe", "asym"):
        env = _arm_env(root, raw, f"{method}_s{seed}")
        write_splits(Path(env["nnUNet_preprocessed"]), raw, site_splits)
        t0 = time.perf_counter()
        info, wall, peak = _run_federated(
            env,
            method,
            seed,
            rounds,
            iterations,
            val_iterations,
            root / "logs" / f"{method}_s{seed}",
        )
        walls[method] = time.perf_counter() - t0
        _check_splits_used(env, splits, SITE_IDS)
        results = Path(env["nnUNet_results"])
        dice[method] = {
            str(ds): foreground_dice_of_cases(_validation_summary(results, ds)) for ds in SITE_IDS
        }
        extra[method] = {"info": info, "wall": wall, "peak": peak}

    # Centralized: the pooled data with the pooled split built from the sites' splits.
    env = _arm_env(root, raw, "centralized", f"results_s{seed}")
    write_splits(Path(env["nnUNet_preprocessed"]), raw, {POOLED_ID: splits[POOLED_ID]})
    plan = first or not any(Path(env["nnUNet_preprocessed"]).glob("*/nnUNetPlans.json"))
    t0 = time.perf_counter()
    child = _start_child(
        f"centralized({rounds}, {iterations}, {val_iterations}, {seed}, plan={plan})",
        env | {"OMP_NUM_THREADS": "1"},
    )
    mem = TreeMemory(lambda: [child.pid])
    mem.start()
    cen = _child_result(child, "centralized run")
    mem.stop()
    walls["centralized"] = time.perf_counter() - t0
    cen["peak_planning"] = mem.peak_between(*cen["plan_window"])
    _check_splits_used(env, splits, (POOLED_ID,))
    by_site = pooled_dice_by_site(_validation_summary(Path(env["nnUNet_results"]), POOLED_ID))
    dice["centralized"] = {str(ds): by_site[ds] for ds in SITE_IDS}
    extra["centralized"] = cen

    # Local-only: every site alone, its own plans, in parallel (one torch thread each, as
    # the federation's sites get).
    env = _arm_env(root, raw, "local", f"results_s{seed}")
    write_splits(Path(env["nnUNet_preprocessed"]), raw, site_splits)
    t0 = time.perf_counter()
    children = {
        ds: _start_child(
            f"local_only({ds}, {rounds}, {iterations}, {val_iterations}, {seed})",
            env | {"OMP_NUM_THREADS": "1"},
        )
        for ds in SITE_IDS
    }
    local = {ds: _child_result(c, f"local-only run of {ds}") for ds, c in children.items()}
    walls["local"] = time.perf_counter() - t0
    _check_splits_used(env, splits, SITE_IDS)
    results = Path(env["nnUNet_results"])
    dice["local"] = {
        str(ds): foreground_dice_of_cases(_validation_summary(results, ds)) for ds in SITE_IDS
    }
    extra["local"] = local
    return {"dice": dice, "walls": walls, "extra": extra}


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean over seeds and spread = max - min over seeds."""
    return statistics.mean(values), max(values) - min(values)


def _cell(values: list[float]) -> str:
    mean, spread = _mean_spread(values)
    return f"{mean:.3f} ± {spread:.3f}"


def global_dice_curves(state_json: dict) -> dict[str, list[tuple[int, float]]]:
    """Per site and case-weighted: (global after round k, its federated pseudo-Dice).

    Round k's record holds the scores of the global that round started from (k - 1);
    the evaluate phase scores the last one."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in state_json["history"]:
        scored = record["round"] - 1
        for site, metrics in record["metrics"].items():
            if metrics.get("global_pseudo_dice") is not None:
                curves.setdefault(site, []).append((scored, metrics["global_pseudo_dice"]))
        if record.get("global_dice") is not None:
            curves.setdefault("case-weighted", []).append((scored, record["global_dice"]))
    last = state_json["rounds_closed"]
    for site, metrics in (state_json.get("final_global_eval") or {}).items():
        if metrics.get("global_pseudo_dice") is not None:
            curves.setdefault(site, []).append((last, metrics["global_pseudo_dice"]))
    if state_json.get("final_global_dice") is not None:
        curves.setdefault("case-weighted", []).append((last, state_json["final_global_dice"]))
    return curves


def plot_global_dice(per_seed: dict, path: Path) -> Path:
    """One panel per federated arm: the global model's pseudo-Dice at each site, every round
    (solid: first seed, dashed: the others)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors: dict[str, Any] = {}
    for ax, arm in zip(axes, ("ffe", "asym"), strict=True):
        for i, (seed, result) in enumerate(per_seed.items()):
            curves = global_dice_curves(result["extra"][arm]["info"]["state"])
            for label, points in sorted(curves.items()):
                xs, ys = zip(*sorted(points), strict=True)
                color = colors.setdefault(label, f"C{len(colors)}")
                ax.plot(
                    xs,
                    ys,
                    color=color,
                    linestyle="-" if i == 0 else "--",
                    linewidth=2.5 if label == "case-weighted" else 1.2,
                    label=f"{label} (seed {seed})",
                )
        ax.set_title(f"{ARM_TITLES[arm]}: global model at each site")
        ax.set_xlabel("global after round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("pseudo-Dice on the site's val cases")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run(quick: bool = False, hard: bool = False) -> BenchResult:
    """Entry point of ``python -m bench.run quality [--quick] [--hard]``."""
    if quick:
        return measure(rounds=3, iterations=10, hard=hard)
    return measure(hard=hard)


def measure(
    rounds: int = 10,
    iterations: int = 25,
    val_iterations: int = 5,
    seeds: tuple[int, ...] = SEEDS,
    hard: bool = False,
    workdir: Path | None = None,
    reuse: bool = False,
    tag: str = "",
) -> BenchResult:
    """Run every arm for every seed; ``reuse``: keep seeds already finished in ``workdir``.

    Each finished seed is saved as ``seed_<n>.json`` in the work folder (with the run
    length it had), so a crash in one seed or in the table loses nothing.
    """
    from fednnunet.core.state_machine import ExperimentState
    from fednnunet.nnunet.demo_data import make_demo_federation

    if len(seeds) < 2:
        raise ValueError("at least 2 seeds: the spread between seeds is part of the result")
    t_bench = time.perf_counter()
    name = ("quality_hard" if hard else "quality") + (f"_{tag}" if tag else "")
    root = (workdir or REPO / "bench" / "out" / f"{name}_run").resolve()
    length = {"hard": hard, "rounds": rounds, "iterations": iterations, "val": val_iterations}
    if root.exists() and not reuse:
        import shutil

        shutil.rmtree(root)
    raw = root / "raw"
    if not raw.is_dir():
        make_demo_federation(raw, SITE_IDS, num_cases=8, seed=0, hard=hard)
        make_pooled_dataset(raw, SITE_IDS, POOLED_ID)
    splits = leak_free_splits(raw, SITE_IDS, POOLED_ID)
    val_cases = {str(ds): splits[ds][0]["val"] for ds in SITE_IDS}

    per_seed = {}
    for i, seed in enumerate(seeds):
        saved = root / f"seed_{seed}.json"
        if reuse and saved.is_file() and json.loads(saved.read_text())["length"] == length:
            per_seed[seed] = json.loads(saved.read_text())["result"]
        else:
            per_seed[seed] = _seed_runs(
                root, raw, splits, seed, rounds, iterations, val_iterations, first=i == 0
            )
            saved.write_text(json.dumps({"length": length, "result": per_seed[seed]}))
        print(f"seed {seed}: {json.dumps(per_seed[seed]['dice'])}", flush=True)
    bench_wall = time.perf_counter() - t_bench
    plot = plot_global_dice(per_seed, OUT_DIR / f"{name}_global_dice.png")

    # ---- quality table: per site and mean over sites, mean ± spread over seeds ----------
    def values(arm: str, site: str | None) -> list[float]:
        out = []
        for seed in seeds:
            d = per_seed[seed]["dice"][arm]
            out.append(d[site] if site else statistics.mean(d.values()))
        return out

    def diffs(a: str, b: str, site: str | None) -> list[float]:
        return [x - y for x, y in zip(values(a, site), values(b, site), strict=True)]

    rows = []
    for site in [str(ds) for ds in SITE_IDS] + [None]:
        rows.append(
            [f"site {site} ({len(val_cases[site])} val)" if site else "mean of sites"]
            + [_cell(values(arm, site)) for arm in ARMS]
            + [_cell(diffs("ffe", "centralized", site)), _cell(diffs("ffe", "local", site))]
        )
    spreads = {
        arm: max(_mean_spread(values(arm, site))[1] for site in [*map(str, SITE_IDS), None])
        for arm in ARMS
    }
    mean_spreads = {arm: _mean_spread(values(arm, None))[1] for arm in ARMS}

    # ---- B4-B6 from the first seed's FFE and centralized runs ---------------------------
    first = per_seed[seeds[0]]["extra"]
    info, fed_wall, fed_peak = first["ffe"]["info"], first["ffe"]["wall"], first["ffe"]["peak"]
    cen = first["centralized"]
    cen_peak = cen["peak_planning"]
    state = ExperimentState.model_validate(info["state"])
    pt = info["phase_times"]
    fed_planning = pt.get("train", 0.0) - pt.get("fingerprint", 0.0)
    site_train = {
        s: sum(r.metrics.get(s, {}).get("train_s", 0.0) for r in state.history) for s in state.sites
    }
    slowest = max(site_train.values())
    overheads = [r.overhead_s() for r in state.history if r.overhead_s() is not None]
    # The federated evaluation of the incoming global (issue 10) runs inside the round,
    # outside local training: reported on its own so the federation's cost stays visible.
    evals = [
        max(m.get("global_eval_s", 0.0) for m in r.metrics.values())
        for r in state.history
        if r.metrics
    ]
    eval_total = sum(evals)
    fed_train_wall = pt.get("validate", fed_wall) - pt.get("train", 0.0)
    b4 = fed_train_wall / slowest
    b4_without_eval = (fed_train_wall - eval_total) / slowest
    b5 = fed_train_wall / cen["train_s"]
    b6_wall = fed_planning / cen["plan_s"]
    federation = (
        "hard (hard=True: 6/12/9 cases, different contrast, noise, spacing and cube frequency)"
        if hard
        else "default (8 cases per site)"
    )
    arm_walls = {arm: statistics.mean(per_seed[s]["walls"][arm] for s in seeds) for arm in ARMS}
    notes = [
        f"demo federation: {federation}; "
        f"training seeds {list(seeds)}; cells are mean ± spread (max − min) over seeds",
        f"every arm: {rounds} epochs x {iterations} iterations (FFE/AsymFedAvg: {rounds} "
        f"rounds x 1 epoch per site; centralized: the pooled data; local-only: the site "
        f"alone with its own plans), {val_iterations} val iterations per epoch",
        "Dice: nnU-Net's final validation (foreground mean over labels) on each site's own "
        "fold-0 val cases; no model trained on them: the pooled splits_final.json is the "
        "union of the sites' fold-k splits (bench/pooled.py), checked after every run",
        "largest spread over seeds per arm (any row): "
        + ", ".join(f"{ARM_TITLES[a]} {spreads[a]:.3f}" for a in ARMS)
        + "; of the site mean: "
        + ", ".join(f"{ARM_TITLES[a]} {mean_spreads[a]:.3f}" for a in ARMS),
        "wall per seed (mean): "
        + ", ".join(f"{ARM_TITLES[a]} {arm_walls[a]:.0f}s" for a in ARMS)
        + f"; whole benchmark {bench_wall / 60:.1f} min (shared machine: see the load average)",
        f"B4-B6 from seed {seeds[0]}: federated wall {fed_wall:.1f}s (fingerprint+plan "
        f"{fed_planning:.1f}s, training {fed_train_wall:.1f}s); slowest site local training "
        f"{slowest:.1f}s; centralized plan+preprocess {cen['plan_s']:.1f}s, training "
        f"{cen['train_s']:.1f}s",
        f"per-round overhead outside local training: median "
        f"{statistics.median(overheads):.2f}s over {len(overheads)} rounds, of which the "
        f"federated evaluation of the incoming global (slowest site) median "
        f"{statistics.median(evals or [0.0]):.2f}s"
        if overheads
        else "no overhead measured",
        f"per-round global-model Dice at each site (federated evaluation of the incoming "
        f"global, every seed): {plot.relative_to(REPO)}",
        f"peak RSS while planning (process tree): federation {fed_peak / 1e9:.2f} GB "
        f"(coordinator + 3 site workers and their children), centralized "
        f"{cen_peak / 1e9:.2f} GB",
    ]
    targets = [
        Target(
            "seed spread",
            f"spread of every Dice between seeds < {SPREAD_GOAL}",
            f"max {max(spreads.values()):.3f} (site mean {max(mean_spreads.values()):.3f})",
            max(spreads.values()) < SPREAD_GOAL,
        ),
        Target(
            "B4",
            "federated training wall <= 1.10 x slowest site's local training",
            f"{b4:.2f}x ({b4_without_eval:.2f}x without the per-round federated evaluation)",
            b4 <= 1.10,
        ),
        Target("B5", "simulation wall <= 1.2 x centralized training wall", f"{b5:.2f}x", b5 <= 1.2),
    ]
    if cen["plan_s"] > 1.0:
        targets += [
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
        name=name,
        title=f"FFE vs AsymFedAvg vs centralized vs local-only nnU-Net"
        f"{' (hard demo federation)' if hard else ''}, {rounds} epochs x {iterations} "
        f"iterations: Dice on each site's fold-0 val cases",
        columns=["site"]
        + [ARM_TITLES[a] for a in ARMS]
        + ["FFE − centralized", "FFE − local-only"],
        rows=rows,
        targets=targets,
        notes=notes,
        raw={
            "hard": hard,
            "seeds": list(seeds),
            "rounds": rounds,
            "iterations": iterations,
            "val_iterations": val_iterations,
            "val_cases": val_cases,
            "dice": {str(s): per_seed[s]["dice"] for s in seeds},
            "walls": {str(s): per_seed[s]["walls"] for s in seeds},
            "bench_wall_s": bench_wall,
            "fed_wall_s": fed_wall,
            "fed_planning_s": fed_planning,
            "fed_train_wall_s": fed_train_wall,
            "site_train_s": site_train,
            "round_overheads_s": overheads,
            "centralized": cen,
            "local": {str(s): per_seed[s]["extra"]["local"] for s in seeds},
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
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--hard", action="store_true", help="the harder demo federation")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep seeds already finished (same length) in the work folder",
    )
    parser.add_argument(
        "--tag", default="", help="a second result beside the main one (quality_<tag>.json)"
    )
    args = parser.parse_args()
    stack_up = ["bash", str(REPO / "deploy" / "local" / "stack.sh"), "up"]
    subprocess.run(stack_up, check=True)  # noqa: S603, S607 - the repo's stack script
    result = measure(
        args.rounds,
        args.iterations,
        args.val_iterations,
        tuple(args.seeds),
        hard=args.hard,
        reuse=args.reuse,
        tag=args.tag,
    )
    print_result(result)
    print(f"  -> {write_json(result)}")


if __name__ == "__main__":
    main()
