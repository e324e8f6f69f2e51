"""Round state in Redis, namespaced by experiment.

Keys (``{ns}`` defaults to ``fednnunet``)::

    {ns}:experiments                 set of experiment ids
    {ns}:exp:{id}:state              ExperimentState as JSON (bounded: no round history)
    {ns}:exp:{id}:history            hash round -> RoundRecord JSON (one entry per closed
                                     round, written with the state save that closes it)
    {ns}:exp:{id}:lock               coordinator lock (one decision at a time)
    {ns}:exp:{id}:fence              fencing token: bumped by each lock holder; a state
                                     save by an older holder is refused
    {ns}:exp:{id}:refused            hash reason-kind -> count of refused site messages
    {ns}:exp:{id}:refusals           list of the last refused messages (JSON)
    {ns}:refused / {ns}:refusals     the same for messages naming no known experiment
    {ns}:exp:{id}:heartbeat          hash site -> unix time of last heartbeat
    {ns}:exp:{id}:progress           hash site -> last ProgressEvent JSON
    {ns}:exp:{id}:position           hash site -> last training position (epoch, iteration)
    {ns}:exp:{id}:bytes              hash site -> bytes moved (sent+received)
    {ns}:alive                       set at coordinator start; missing => Redis lost state
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import redis

from fednnunet.core.state_machine import ExperimentState, RoundRecord
from fednnunet.errors import FedError, ServiceUnreachable
from fednnunet.keys import IDLE_EXPERIMENT
from fednnunet.messages import ProgressEvent
from fednnunet.settings import Settings

POSITION_FIELDS = ("phase", "round", "epoch", "iteration", "of_iterations")


class LockLost(FedError):
    """This coordinator no longer holds the experiment's lock: it must not write."""


@dataclass
class Fence:
    """The holder's fencing token; ``lost`` is set when renewing the lock failed."""

    experiment: str
    token: int
    lost: bool = False

    def check(self) -> None:
        if self.lost:
            raise LockLost(f"lost the lock of experiment {self.experiment}; not writing")


# Save only while our token is the newest: a paused coordinator whose lock expired
# (and was taken by another) cannot overwrite the newer state. The round records the
# save closes (ARGV[4..]: round, record, round, record, ...) go in the same atomic step.
_FENCED_SAVE = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[3])
if #ARGV > 3 then redis.call('HSET', KEYS[4], unpack(ARGV, 4)) end
return 1
"""
MAX_REFUSALS_KEPT = 100


class RedisState:
    def __init__(self, url: str, namespace: str = "fednnunet") -> None:
        self.url = url
        self.ns = namespace
        self.r = redis.Redis.from_url(
            url,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
            decode_responses=True,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisState:
        return cls(settings.redis_url, namespace=settings.redis_namespace)

    def ping(self) -> None:
        try:
            self.r.ping()
        except redis.RedisError as exc:
            raise ServiceUnreachable("Redis", self.url, type(exc).__name__) from exc

    def _k(self, experiment: str, what: str) -> str:
        return f"{self.ns}:exp:{experiment}:{what}"

    # -- experiment state ----------------------------------------------------
    def load(self, experiment: str, with_history: bool = False) -> ExperimentState | None:
        """The state (bounded); ``with_history``: also every round record (O(rounds):
        for reports and tests, never on the coordinator's per-report path)."""
        raw = self.r.get(self._k(experiment, "state"))
        if not raw:
            return None
        state = ExperimentState.model_validate_json(raw)
        if state.history and not state.rounds_closed:
            self._migrate_embedded_history(state)
        if with_history:
            state.history = self.history(experiment, 0, state.rounds_closed)
        return state

    def _migrate_embedded_history(self, state: ExperimentState) -> None:
        """A state saved before the history moved out: its records go to the hash."""
        records = state.history
        self.r.hset(
            self._k(state.experiment_id, "history"),
            mapping={str(r.round): r.model_dump_json() for r in records},
        )
        state.rounds_closed, state.last_round = records[-1].round, records[-1]
        state.train_started_at = records[0].opened_at
        state.history = []

    def history(self, experiment: str, after: int, upto: int) -> list[RoundRecord]:
        """Round records ``after``+1 .. ``upto`` (one round trip, only those rounds):
        readers keep what they have and ask for the new rounds only."""
        if upto <= after:
            return []
        raw = self.r.hmget(
            self._k(experiment, "history"), [str(r) for r in range(after + 1, upto + 1)]
        )
        return [RoundRecord.model_validate_json(x) for x in raw if x]

    def round_record(self, experiment: str, round_: int) -> RoundRecord | None:
        raw = self.r.hget(self._k(experiment, "history"), str(round_))
        return RoundRecord.model_validate_json(raw) if raw else None

    def exists(self, experiment: str) -> bool:
        return bool(self.r.exists(self._k(experiment, "state")))

    def save(
        self,
        state: ExperimentState,
        fence: Fence | None = None,
        records: Sequence[RoundRecord] = (),
    ) -> None:
        """Store the state and the round ``records`` it closes (one hash entry each, in
        the same atomic step); with a ``fence``, only if that holder still owns the lock.

        A record is keyed by its round, so writing it again is idempotent.
        """
        exp = state.experiment_id
        history = {str(r.round): r.model_dump_json() for r in records}
        entries = [x for item in history.items() for x in item]
        if fence is None:
            pipe = self.r.pipeline()
            pipe.set(self._k(exp, "state"), state.model_dump_json())
            pipe.sadd(f"{self.ns}:experiments", exp)
            if entries:
                pipe.hset(self._k(exp, "history"), mapping=history)
            pipe.execute()
            return
        fence.check()
        keys = [
            self._k(exp, "state"),
            self._k(exp, "fence"),
            f"{self.ns}:experiments",
            self._k(exp, "history"),
        ]
        if not self.r.eval(
            _FENCED_SAVE, 4, *keys, state.model_dump_json(), str(fence.token), exp, *entries
        ):
            fence.lost = True
            raise LockLost(f"experiment {exp} has a newer lock holder; state not saved")

    def create(self, state: ExperimentState) -> bool:
        """Store a new experiment; False if the id already exists."""
        ok = self.r.set(self._k(state.experiment_id, "state"), state.model_dump_json(), nx=True)
        if ok:
            self.r.sadd(f"{self.ns}:experiments", state.experiment_id)
        return bool(ok)

    def experiments(self) -> list[str]:
        return sorted(self.r.smembers(f"{self.ns}:experiments"))

    @contextlib.contextmanager
    def locked(
        self, experiment: str, timeout_s: float = 20.0, wait_s: float = 600.0
    ) -> Iterator[Fence]:
        """Exclusive section per experiment: two coordinators never decide at once.

        The lock expires ``timeout_s`` after its holder stops renewing it, so a
        SIGKILLed coordinator blocks its successor for seconds, not minutes; a live
        holder renews it from a thread, so a long aggregation keeps it.
        """
        lock = self.r.lock(
            self._k(experiment, "lock"),
            timeout=timeout_s,
            blocking_timeout=wait_s,
            sleep=0.01,  # reports arrive together: a waiter must not nap 0.1 s (the default)
            thread_local=False,
        )
        if not lock.acquire():
            raise TimeoutError(f"could not lock experiment {experiment}")
        fence = Fence(experiment, int(self.r.incr(self._k(experiment, "fence"))))
        done = threading.Event()

        def renew() -> None:
            while not done.wait(timeout_s / 3):
                try:
                    lock.reacquire()
                except (redis.RedisError, redis.exceptions.LockError):
                    # Fatal for this pass: every later write of the holder is refused.
                    fence.lost = True
                    return

        renewer = threading.Thread(target=renew, name="fednnunet-lock", daemon=True)
        renewer.start()
        try:
            yield fence
        finally:
            done.set()
            renewer.join()
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()

    # -- refused messages ---------------------------------------------------
    def record_refusal(
        self, experiment: str | None, kind: str, reason: str, sender: str | None
    ) -> None:
        """Count and keep (bounded) a site message the coordinator refused."""
        base = self._k(experiment, "") if experiment else f"{self.ns}:"
        entry = json.dumps(
            {"time": time.time(), "kind": kind, "sender": sender, "reason": reason[:300]}
        )
        pipe = self.r.pipeline()
        pipe.hincrby(base + "refused", kind, 1)
        pipe.lpush(base + "refusals", entry)
        pipe.ltrim(base + "refusals", 0, MAX_REFUSALS_KEPT - 1)
        pipe.execute()

    def refusals(self, experiment: str | None) -> tuple[dict[str, int], list[dict]]:
        """(count per kind, newest refused messages first)."""
        base = self._k(experiment, "") if experiment else f"{self.ns}:"
        counts = {k: int(v) for k, v in self.r.hgetall(base + "refused").items()}
        return counts, [json.loads(x) for x in self.r.lrange(base + "refusals", 0, -1)]

    # -- liveness and progress ----------------------------------------------
    def mark_alive(self) -> None:
        self.r.set(f"{self.ns}:alive", "1")

    def is_alive_marked(self) -> bool:
        return bool(self.r.exists(f"{self.ns}:alive"))

    def record_progress(self, event: ProgressEvent, received: float | None = None) -> None:
        """Store a progress event; times are the coordinator's receive times (no clock skew)."""
        received = time.time() if received is None else received
        if event.experiment_id == IDLE_EXPERIMENT:
            self.r.hset(f"{self.ns}:idle", event.site_id, received)
            return
        pipe = self.r.pipeline()
        pipe.hset(self._k(event.experiment_id, "heartbeat"), event.site_id, received)
        if event.kind == "progress" or event.kind == "heartbeat":
            payload = event.model_dump(mode="json") | {"received": received}
            pipe.hset(self._k(event.experiment_id, "progress"), event.site_id, json.dumps(payload))
        if event.kind == "progress" and event.iteration is not None:
            # Kept apart: the next heartbeat replaces the event above, not the position.
            position = event.model_dump(mode="json", include=set(POSITION_FIELDS))
            pipe.hset(self._k(event.experiment_id, "position"), event.site_id, json.dumps(position))
        moved = event.bytes_sent + event.bytes_received
        if moved:
            pipe.hincrby(self._k(event.experiment_id, "bytes"), event.site_id, moved)
        pipe.execute()

    def idle_since(self) -> dict[str, float]:
        """Site -> last time its worker said it had no task."""
        return {k: float(v) for k, v in self.r.hgetall(f"{self.ns}:idle").items()}

    def heartbeats(self, experiment: str) -> dict[str, float]:
        return {k: float(v) for k, v in self.r.hgetall(self._k(experiment, "heartbeat")).items()}

    def progress(self, experiment: str) -> dict[str, dict]:
        """Site -> its last event, with the last training position of the same phase and round.

        Heartbeats (every few seconds) carry no position; without the merge a watcher
        would see an empty progress column after each one.
        """
        pipe = self.r.pipeline()
        pipe.hgetall(self._k(experiment, "progress"))
        pipe.hgetall(self._k(experiment, "position"))
        latest_raw, positions_raw = pipe.execute()
        out = {}
        for site, raw in latest_raw.items():
            event = json.loads(raw)
            position = json.loads(positions_raw.get(site, "null")) or {}
            same_task = (position.get("phase"), position.get("round")) == (
                event.get("phase"),
                event.get("round"),
            )
            if event.get("iteration") is None and same_task:
                event |= {k: position[k] for k in ("epoch", "iteration", "of_iterations")}
            out[site] = event
        return out

    def bytes_moved(self, experiment: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(self._k(experiment, "bytes")).items()}
