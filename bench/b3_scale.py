"""B3: coordinator cost per round as the number of sites grows (2 … 64).

64 worker processes cannot run on 2 cores, so the real Coordinator runs
in-process against the real Redis and S3, and its ``send_task`` callback queues
the task; the driver then runs the site's real ``SiteService.handle`` (stand-in
session, tiny model, no sleep) in-process and feeds the report back through
``Coordinator.on_report``, exactly as the site worker would over the broker.

Measured per training round: coordinator wall time (all ``on_report`` calls
of that round, site work excluded), broker publishes (tasks sent + reports
that would be published back), Redis commands and round trips issued by the
coordinator, and S3 requests issued by the coordinator (counted on the minio
client, so internal calls such as put's existence check are included).
"""

from __future__ import annotations

import secrets
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import BenchResult, Target, purge_s3

SITE_COUNTS = (2, 8, 32, 64)


class CountingProxy:
    """Counts method calls on a wrapped client object (S3 requests)."""

    def __init__(self, inner: Any, counts: Counter) -> None:
        self._inner, self._counts = inner, counts

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._counts[name] += 1
            return attr(*args, **kwargs)

        return wrapped


def count_redis(client: Any, counts: Counter) -> None:
    """Count commands and round trips of a redis-py client (pipelines = one round trip)."""
    execute_command = client.execute_command

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts["commands"] += 1
        counts["round_trips"] += 1
        return execute_command(*args, **kwargs)

    client.execute_command = counted
    make_pipeline = client.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make_pipeline(*args, **kwargs)
        execute = pipe.execute

        def pipe_execute(*a: Any, **kw: Any) -> Any:
            counts["commands"] += len(pipe.command_stack)
            counts["round_trips"] += 1
            return execute(*a, **kw)

        pipe.execute = pipe_execute
        return pipe

    client.pipeline = pipeline


SHARED_SITE_BUCKET = "site-bench"


class Harness:
    """Coordinator + N in-process sites on the real Redis and S3.

    All simulated sites write into one shared bucket (their keys already carry the
    site id): SeaweedFS gives every bucket its own volumes and runs out of them
    after about a hundred buckets. The requests issued are the same.
    """

    def __init__(self, n_sites: int, rounds: int, workdir: Path, model: str = "tiny") -> None:
        from fednnunet.adapters.redis_state import RedisState
        from fednnunet.adapters.s3_store import ArtifactStore
        from fednnunet.coordinator.service import Coordinator
        from fednnunet.settings import get_settings
        from fednnunet.site.service import SiteService
        from fednnunet.spec import parse_spec
        from tests.support.standin import StandInBackend

        tag = secrets.token_hex(3)
        self.settings = get_settings()
        # Fixed site ids: their buckets are created once, not on every run.
        self.site_ids = [f"b3-s{i:02d}" for i in range(n_sites)]
        self.spec = parse_spec(
            {
                "experiment_id": f"b3-{n_sites}-{tag}",
                "sites": self.site_ids,
                "method": "asym",
                "rounds": rounds,
                "configuration": "2d",
                "device": "cpu",
            }
        )
        self.shared_bucket = f"{self.settings.bucket_prefix}-{SHARED_SITE_BUCKET}"
        self.s3_counts: Counter = Counter()
        self.redis_counts: Counter = Counter()
        store = ArtifactStore(self.settings, cache_dir=workdir / "coordinator-cache")
        store.client = CountingProxy(store.client, self.s3_counts)
        # Own namespace: coordinators of other runs on this Redis never see this experiment.
        state = RedisState(self.settings.redis_url, namespace=f"fedbench-{tag}")
        count_redis(state.r, self.redis_counts)
        self.published = 0
        self.pending: list = []
        self.coordinator = Coordinator(self.settings, state, store, self._send)
        self.sites = {}
        for i, site in enumerate(self.site_ids):
            site_settings = get_settings(site_id=site, dataset_id=100 + i)
            backend = StandInBackend(
                site_settings, model=model, sleep_s=0.0, workdir=workdir / site
            )
            service = SiteService(site_settings, ArtifactStore(site_settings), backend=backend)
            service.bucket = self.shared_bucket
            self.sites[site] = service
        self.redis = state
        self.store = store

    def _send(self, task: Any) -> None:
        self.published += 1
        self.pending.append(task)

    def snapshot(self) -> tuple[int, int, int, int]:
        return (
            self.published,
            self.redis_counts["commands"],
            self.redis_counts["round_trips"],
            sum(self.s3_counts.values()),
        )

    def run(self, on_round: Callable[[int, dict], None] | None = None) -> dict[int, dict]:
        """Drive the experiment to its end; per-round coordinator time and operation counts."""
        from unittest import mock

        per_round: dict[int, dict] = {}
        site_s = 0.0
        with mock.patch(
            "fednnunet.coordinator.service.site_bucket", lambda prefix, site: self.shared_bucket
        ):
            self.coordinator.start(self.spec)
        while self.pending:
            task = self.pending.pop(0)
            t0 = time.perf_counter()
            report = self.sites[task.site_id].handle(task)
            site_s += time.perf_counter() - t0
            before = self.snapshot()
            t0 = time.perf_counter()
            self.coordinator.on_report(report)
            elapsed = time.perf_counter() - t0
            after = self.snapshot()
            # Reports (one broker publish each) are attributed to the round they belong to.
            key = report.round if task.phase == "train" else 0
            rec = per_round.setdefault(
                key, {"coord_s": 0.0, "publishes": 0, "redis_cmds": 0, "redis_rtt": 0, "s3": 0}
            )
            rec["coord_s"] += elapsed
            rec["publishes"] += after[0] - before[0] + 1
            rec["redis_cmds"] += after[1] - before[1]
            rec["redis_rtt"] += after[2] - before[2]
            rec["s3"] += after[3] - before[3]
        state = self.redis.load(self.spec.experiment_id)
        if state is None or state.phase != "done":
            raise RuntimeError(f"experiment did not finish: {state and state.error}")
        per_round[-1] = {"site_s": site_s}
        return per_round

    def cleanup(self) -> None:
        from fednnunet.keys import global_bucket

        keys = list(self.redis.r.scan_iter(f"{self.redis.ns}:*"))
        if keys:
            self.redis.r.delete(*keys)
        prefix = self.spec.experiment_id + "/"
        purge_s3(self.store, self.shared_bucket, prefix)
        purge_s3(self.store, global_bucket(self.settings.bucket_prefix), prefix)


def run(quick: bool = False) -> BenchResult:
    rounds = 3 if quick else 5
    rows, raw = [], {}
    medians: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="fednnunet-b3-") as tmp:
        for n in SITE_COUNTS:
            harness = Harness(n, rounds, Path(tmp) / f"n{n}")
            try:
                per_round = harness.run()
            finally:
                harness.cleanup()
            train = [per_round[r] for r in sorted(per_round) if r >= 1]
            med = {k: statistics.median(rec[k] for rec in train) for k in train[0]}
            medians[n] = med["coord_s"]
            rows.append(
                [
                    n,
                    med["coord_s"],
                    med["coord_s"] / n * 1000,
                    med["publishes"],
                    med["redis_cmds"],
                    med["redis_rtt"],
                    med["s3"],
                    per_round[0]["coord_s"],
                ]
            )
            raw[str(n)] = {str(k): v for k, v in per_round.items()}
    growth = (medians[64] / medians[2]) / 32
    return BenchResult(
        name="b3",
        title=f"B3 coordinator scale: tiny model, {rounds} rounds, in-process sites (no compute)",
        columns=[
            "sites",
            "coord s/round",
            "ms/site",
            "publishes/round",
            "redis cmds/round",
            "redis RTT/round",
            "S3 req/round",
            "setup+validate s",
        ],
        rows=rows,
        targets=[
            Target(
                "time at 64 sites",
                "≤ 2 s per round",
                f"{medians[64]:.2f} s",
                medians[64] <= 2.0,
            ),
            Target(
                "growth",
                "≤ linear in sites",
                f"(t64/t2)/(64/2) = {growth:.2f}",
                growth <= 1.0,
            ),
        ],
        notes=[
            "coord s/round: sum of Coordinator.on_report wall time for that round's reports "
            "(Redis, S3 journal + aggregation downloads, averaging); site work excluded",
            "publishes = tasks sent + reports sent back (1 per task); medians over rounds",
        ],
        raw=raw,
    )


if __name__ == "__main__":
    import sys

    from bench.common import print_result, write_json

    res = run(quick="--quick" in sys.argv)
    print_result(res)
    write_json(res)
