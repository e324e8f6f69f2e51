"""P7: asynchronous federation (FedBuff) vs synchronous rounds with one slow site.

3 sites, real nnU-Net (2d, CPU) on the demo data, site 3 made 3x slower with the
simulation switch (``simulate_slowdown``). Three runs on one set of long-lived workers:

- ``sync-all``: every round waits for every site;
- ``sync quorum 2/3 + deadline``: a round closes once 2 sites reported and the deadline
  (1.5x the fast sites' median task time in sync-all) passed;
- ``async``: FedBuff, K = 2, the same total of site-epochs (rounds x sites).

Reported: wall time of the train phase to its end and of the whole experiment; wall
until the case-weighted global Dice first reaches sync-all's final value (within 0.01);
each site's final Dice (nnU-Net's own validation at the site); each site's idle
fraction (train-phase wall not spent in its train tasks). The global Dice of every
published round/version is measured afterwards with nnU-Net's predictor on every
site's validation cases (fold 0; no evaluation case in any training set).

``python -m bench.run p7`` (``--quick``: fewer iterations). Timings on a shared 2-core
machine are upper bounds.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import BenchResult, Target
from tests.support.nnunet_dirs import make_nnunet_dirs  # gpu_check uses it from here too

SITE_IDS = (901, 902, 903)
SLOW_DATASET = 903
SLOWDOWN = 3.0


def run_experiment(settings, fed, sites: dict[str, int], label: str, params: dict, **extra) -> dict:
    """Run one experiment on the running federation: its state, walls, idle fractions."""
    from fednnunet.cli.simulate import submit, wait_for
    from fednnunet.cli.view import time_use
    from fednnunet.spec import parse_spec

    slow = next((s for s, d in sites.items() if d == SLOW_DATASET), None)
    spec = parse_spec(
        {
            "experiment_id": f"p7-{label}-{time.strftime('%H%M%S')}",
            "sites": list(sites),
            "method": "ffe",
            "configuration": "2d",
            "fold": 0,
            "device": "cpu",
            "heartbeat_timeout_s": 600,
            "simulate_slowdown": {slow: SLOWDOWN} if slow else {},
            **params,
            **extra,
        }
    )
    t0 = time.time()
    submit(settings, spec)
    marks: dict[str, float] = {}

    def on_update(state, _redis) -> None:
        fed.check_alive()
        marks.setdefault(state.phase, time.time())

    state = wait_for(settings, spec.experiment_id, 3600, on_update=on_update)
    if state.phase != "done":
        raise RuntimeError(f"{label} run ended {state.phase}: {state.error}")
    train_start = marks.get("train", t0)
    train_end = marks.get("validate", time.time())
    if state.asynchronous is not None:
        train_start = state.asynchronous.opened_at or train_start
        train_end = state.asynchronous.closed_at or train_end
    return {
        "spec": spec,
        "state": state,
        "wall_s": time.time() - t0,
        "train_start": train_start,
        "train_s": train_end - train_start,
        "idle": {s: v["idle_fraction"] for s, v in time_use(state, train_end).items()},
        "globals": [(r.closed_at - train_start, r.global_weights) for r in state.history],
    }


def _val_cases(env: dict[str, str], dataset_id: int) -> tuple[Path, list[str]]:
    pre = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{dataset_id}_*"))
    raw = next(Path(env["nnUNet_raw"]).glob(f"Dataset{dataset_id}_*"))
    splits = json.loads((pre / "splits_final.json").read_text())
    return raw, list(splits[0]["val"])


def _dice(pred, ref) -> float:
    """Mean foreground Dice over the labels present in either (nnU-Net counts both empty
    as NaN; here such a label is left out)."""
    import numpy as np

    labels = sorted(set(np.unique(ref).tolist()) | set(np.unique(pred).tolist()) - {0})
    scores = []
    for lab in labels:
        if lab == 0:
            continue
        p, r = pred == lab, ref == lab
        denom = p.sum() + r.sum()
        if denom:
            scores.append(2.0 * (p & r).sum() / denom)
    return float(np.mean(scores)) if scores else 1.0


class GlobalEvaluator:
    """Dice of a global model on every site's validation cases (nnU-Net's predictor)."""

    def __init__(self, env: dict[str, str], sites: dict[str, int], work: Path) -> None:
        import SimpleITK as sitk  # noqa: N813 - nnU-Net's own dependency
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.sitk, self.work = sitk, work
        self.sites = sites
        self.predictors = {}
        self.cases: dict[str, list[tuple[Path, Path]]] = {}
        for site, ds in sites.items():
            (model_dir,) = Path(env["nnUNet_results"]).glob(
                f"Dataset{ds}_*/nnUNetTrainer__nnUNetPlans__2d"
            )
            pred = nnUNetPredictor(
                tile_step_size=0.5,
                use_gaussian=True,
                use_mirroring=False,
                perform_everything_on_device=False,
                device=torch.device("cpu"),
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
            pred.initialize_from_trained_model_folder(str(model_dir), (0,), "checkpoint_final.pth")
            self.predictors[site] = pred
            raw, val = _val_cases(env, ds)
            inputs = work / f"in-{site}"
            inputs.mkdir(parents=True, exist_ok=True)
            ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
            pairs = []
            for case in val:
                link = inputs / f"{case}_0000{ending}"
                if not link.exists():
                    link.symlink_to(raw / "imagesTr" / f"{case}_0000{ending}")
                pairs.append((case, raw / "labelsTr" / f"{case}{ending}"))
            self.cases[site] = pairs
            self.ending = ending

    def dice(self, weights: dict) -> tuple[float, dict[str, float]]:
        """(case-weighted mean over all sites' validation cases, per-site mean)."""
        all_scores, per_site = [], {}
        for site, pred in self.predictors.items():
            pred.list_of_parameters = [weights]
            out = self.work / f"out-{site}"
            out.mkdir(parents=True, exist_ok=True)  # nnU-Net writes its arguments there first
            pred.predict_from_files_sequential(
                str(self.work / f"in-{site}"), str(out), save_probabilities=False, overwrite=True
            )
            scores = []
            for case, label in self.cases[site]:
                p = self.sitk.GetArrayFromImage(
                    self.sitk.ReadImage(str(out / f"{case}{self.ending}"))
                )
                r = self.sitk.GetArrayFromImage(self.sitk.ReadImage(str(label)))
                scores.append(_dice(p, r))
            per_site[site] = float(statistics.mean(scores))
            all_scores += scores
        return float(statistics.mean(all_scores)), per_site


def run(
    quick: bool = False, rounds: int | None = None, iterations: int | None = None
) -> BenchResult:

    from fednnunet.cli.simulate import LocalFederation
    from fednnunet.nnunet.demo_data import make_demo_federation
    from fednnunet.settings import get_settings

    rounds = rounds or (3 if quick else 6)
    iterations = iterations or (3 if quick else 10)
    params = {"rounds": rounds, "iterations_per_epoch": iterations, "val_iterations_per_epoch": 1}
    settings = get_settings()
    root = Path(tempfile.mkdtemp(prefix="fednnunet-p7-"))
    env = make_nnunet_dirs(root) | {"nnUNet_def_n_proc": "1"}
    make_demo_federation(Path(env["nnUNet_raw"]), SITE_IDS, num_cases=8, seed=0)
    tag = time.strftime("%H%M%S")
    sites = {f"p7-{tag}-{ds}": ds for ds in SITE_IDS}
    runs: dict[str, dict] = {}
    with LocalFederation(sites, root / "logs", env=env) as fed:
        fed.wait_ready()
        runs["sync-all"] = run_experiment(settings, fed, sites, "sync", params)
        fast = [
            r.metrics[s]["train_s"] + r.metrics[s].get("pull_s", 0)
            for r in runs["sync-all"]["state"].history
            for s in r.participants
            if sites[s] != SLOW_DATASET and "train_s" in r.metrics.get(s, {})
        ]
        deadline = round(1.5 * statistics.median(fast), 1)
        runs["sync quorum 2/3"] = run_experiment(
            settings, fed, sites, "quorum", params, quorum=2, round_deadline_s=deadline
        )
        runs["async"] = run_experiment(settings, fed, sites, "async", params, mode="async")

    return evaluate(settings, env, root, sites, runs, rounds, iterations, deadline)


def evaluate(settings, env, root, sites, runs, rounds, iterations, deadline) -> BenchResult:
    """Evaluate every global of the runs at every site; the table and targets."""
    from fednnunet.adapters.s3_store import ArtifactStore
    from fednnunet.adapters.weights_codec import decode_weights

    store = ArtifactStore(settings)
    evaluator = GlobalEvaluator(env, sites, root / "eval")
    for info in runs.values():
        info["curve"] = []
        for at, ref in info["globals"]:
            mean, _ = evaluator.dice(decode_weights(store.get_bytes(ref)))
            info["curve"].append((round(at, 1), round(mean, 4)))
    target_dice = runs["sync-all"]["curve"][-1][1]
    rows, raw = [], {}
    slow_site = next(s for s, d in sites.items() if d == SLOW_DATASET)
    for name, info in runs.items():
        state = info["state"]
        reach = next((t for t, d in info["curve"] if d >= target_dice - 0.01), None)
        final = {s: state.final_metrics.get(s, {}).get("mean_dice") for s in sites}
        idle = info["idle"]
        fast_idle = max(v for s, v in idle.items() if s != slow_site)
        consumed = (
            state.asynchronous.applied_epochs
            if state.asynchronous
            else {s: sum(s in r.participants for r in state.history) for s in sites}
        )
        rows.append(
            [
                name,
                round(info["train_s"], 1),
                round(info["wall_s"], 1),
                reach,
                info["curve"][-1][1],
                *(None if final[s] is None else round(final[s], 3) for s in sites),
                round(fast_idle, 3),
                round(idle[slow_site], 3),
                "/".join(str(consumed.get(s, 0)) for s in sites),
                len(state.history),
            ]
        )
        raw[name] = {
            "train_s": info["train_s"],
            "wall_s": info["wall_s"],
            "curve": info["curve"],
            "final_dice": final,
            "idle": idle,
            "site_epochs": consumed,
            "versions_or_rounds": len(state.history),
            "async": state.asynchronous.model_dump(mode="json", exclude={"buffer"})
            if state.asynchronous
            else None,
        }
    sync_row, async_row = raw["sync-all"], raw["async"]
    ratio = async_row["train_s"] / sync_row["train_s"]
    dice_gap = {
        s: (async_row["final_dice"][s] or 0) - (sync_row["final_dice"][s] or 0) for s in sites
    }
    async_fast_idle = max(v for s, v in async_row["idle"].items() if s != slow_site)
    targets = [
        Target(
            "async wall",
            "async train wall <= 0.6 x sync-all",
            f"{ratio:.2f} x ({async_row['train_s']:.0f} s vs {sync_row['train_s']:.0f} s)",
            ratio <= 0.6,
        ),
        Target(
            "per-site Dice",
            "async final Dice >= sync-all - 0.01 at every site (slow one included)",
            ", ".join(f"{s}: {d:+.3f}" for s, d in dice_gap.items()),
            all(d >= -0.01 for d in dice_gap.values()),
        ),
        Target(
            "fast sites idle",
            "async: fast sites idle <= 5 %",
            f"{100 * async_fast_idle:.1f} %",
            async_fast_idle <= 0.05,
        ),
    ]
    return BenchResult(
        name="p7_async",
        title="P7: async (FedBuff) vs sync rounds, 3 sites, one 3x slower (real nnU-Net 2d, CPU)",
        columns=[
            "mode",
            "train wall s",
            "experiment wall s",
            "s to sync-all's final global Dice",
            "final global Dice",
            *(f"Dice {s.rsplit('-', 1)[-1]}" for s in sites),
            "fast idle",
            "slow idle",
            "site-epochs",
            "rounds/versions",
        ],
        rows=rows,
        targets=targets,
        notes=[
            f"{rounds} rounds x {iterations} iterations per epoch (sync: {rounds * 3} "
            f"site-epochs; async: the same total), site {SLOW_DATASET} slowed "
            f"{SLOWDOWN:g}x by simulate_slowdown (it sleeps 2x its measured epoch time); "
            f"quorum deadline {deadline} s (1.5x the fast sites' median task time).",
            "Global Dice: every round's / version's global evaluated after the run with "
            "nnU-Net's predictor (no mirroring) on every site's fold-0 validation cases, "
            "case-weighted; per-site Dice: nnU-Net's own final validation at the site.",
            "2-core machine (load average in the header): walls are upper bounds; one run "
            "(one seed).",
        ],
        raw=raw,
    )


if __name__ == "__main__":
    import argparse

    from bench.common import print_result, write_json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 rounds x 3 iterations")
    parser.add_argument("--rounds", type=int, help="sync rounds (async: the same site-epochs)")
    parser.add_argument("--iterations", type=int, help="iterations per local epoch")
    args = parser.parse_args()
    result = run(quick=args.quick, rounds=args.rounds, iterations=args.iterations)
    print_result(result)
    print(write_json(result))
