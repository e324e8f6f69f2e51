"""Undisturbed federation runs with the settings each fault test changes (measurement only).

``tests/faults`` records how long a run under each fault takes (``FEDNNUNET_FAULTS_REPORT``);
this measures the matching undisturbed runs, so the cost of a fault is the difference.
It lived in the test suite as a skipped "test" that asserted nothing about the product
beyond what ``test_undisturbed_run_matches_the_in_process_reference`` already checks.

    .venv/bin/python -m bench.fault_baselines [--report out.jsonl] [name ...]

Needs RabbitMQ (with ``rabbitmqctl``: one private vhost per run) and Redis; starts its
own SeaweedFS on free ports.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
from pathlib import Path

from fednnunet.settings import get_settings
from tests.faults.harness import (
    Federation,
    PrivateS3,
    check_history,
    close_isolated,
    drive,
    make_spec,
    open_isolated,
)
from tests.support.weed import free_port_block

DATASETS = (11, 12, 13)
# name -> (number of sites, spec overrides, worker environment overrides)
BASELINES: dict[str, tuple[int, dict, dict[str, str]]] = {
    "default": (3, {}, {}),
    "nnunet2d, 1 round": (3, {"rounds": 1}, {"FEDNNUNET_STANDIN_MODEL": "nnunet2d"}),
    "quorum 2/3, deadline 8 s": (
        3,
        {"quorum": 2, "round_deadline_s": 8, "heartbeat_timeout_s": 60},
        {},
    ),
    "1 site, 20 s round": (
        1,
        {"rounds": 1, "heartbeat_timeout_s": 60},
        {"FEDNNUNET_STANDIN_SLEEP_S": "20"},
    ),
}


def run_baseline(name: str, s3: PrivateS3, tmp: Path) -> dict:
    n_sites, spec_overrides, env = BASELINES[name]
    token = secrets.token_hex(3)
    iso = open_isolated(get_settings(), token, tmp / token, s3_endpoint=s3.endpoint)
    try:
        sites = {f"s{token}{i}": ds for i, ds in enumerate(DATASETS[:n_sites])}
        spec = make_spec(f"base-{token}", list(sites), **spec_overrides)
        with Federation(sites, iso.tmp / "logs", env=iso.with_env(**env)) as fed:
            fed.wait_ready(iso.vhost, ["coordinator", *(f"site.{s}" for s in sites)])
            run = drive(iso, fed, spec)
        check_history(iso, run.state, list(sites))  # a baseline of a broken run is no baseline
        return {"fault": f"none (baseline: {name})", "wall_s": round(run.wall_s, 2)}
    finally:
        close_isolated(iso)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(BASELINES), choices=list(BASELINES))
    parser.add_argument("--report", default=os.environ.get("FEDNNUNET_FAULTS_REPORT"))
    args = parser.parse_args(argv)
    base = get_settings()
    with tempfile.TemporaryDirectory(prefix="fednnunet-baselines-") as tmp_dir:
        tmp = Path(tmp_dir)
        s3 = PrivateS3(tmp / "s3", free_port_block(), base.s3_access_key, base.s3_secret_key)
        s3.start()
        try:
            for name in args.names:
                row = run_baseline(name, s3, tmp)
                print(json.dumps(row))
                if args.report:
                    with open(args.report, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row) + "\n")
        finally:
            s3.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
