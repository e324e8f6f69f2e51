"""`fednnunet experiment list` on the real Redis: what a newcomer sees first."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fednnunet.adapters.redis_state import RedisState
from fednnunet.cli.main import app
from fednnunet.core import state_machine as sm
from fednnunet.messages import ArtifactRef, ExperimentOptions

pytestmark = pytest.mark.integration
REF = ArtifactRef(bucket="b", key="k", sha256="0" * 64, size=1)


def _finished(experiment_id: str, rounds: int) -> sm.ExperimentState:
    state = sm.new_experiment(
        experiment_id, ["901"], ExperimentOptions(method="asym", rounds=rounds, quorum=1), 0.0
    )
    sm.apply_plans_checked(state, 0.0)
    for r in range(1, rounds + 1):
        record = sm.RoundRecord(
            round=r, participants=["901"], global_weights=REF, num_cases={"901": 4}
        )
        sm.apply_aggregated(state, record, float(r))
    sm.apply_validated(state, 10.0)
    return state


def test_list_shows_the_rounds_a_finished_experiment_completed(stack, unique_id):
    state = _finished(unique_id("list-"), 5)
    assert state.phase == "done"
    redis = RedisState.from_settings(stack)
    assert redis.create(state)
    try:
        result = CliRunner().invoke(app, ["experiment", "list"])
    finally:
        redis.r.delete(redis._k(state.experiment_id, "state"))
        redis.r.srem(f"{redis.ns}:experiments", state.experiment_id)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if state.experiment_id in x)
    assert "done" in line and "5/5 rounds completed" in line, line
    assert "round 0/5" not in line
