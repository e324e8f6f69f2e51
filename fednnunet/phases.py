"""The phases of an experiment: the one enumeration that the state machine, messages,
object keys, the broker's task names and the site's handlers all use."""

from __future__ import annotations

from enum import Enum


class _Name(str, Enum):
    """An enumeration whose members are their strings (``enum.StrEnum`` before 3.11)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Phase(_Name):
    """A phase in which the sites work, in the order an experiment runs them.

    FFE runs all five; asym starts at PLAN. EVALUATE scores the last global model at every
    site (federated evaluation) so the best global is known before VALIDATE. A member
    equals its string (``Phase.TRAIN == "train"``), which is what messages, keys and stored
    states carry.
    """

    FINGERPRINT = "fingerprint"
    PLAN = "plan"
    TRAIN = "train"
    EVALUATE = "evaluate"
    VALIDATE = "validate"


class Outcome(_Name):
    """The phase of an experiment that has ended."""

    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ExperimentPhase = Phase | Outcome
TERMINAL: frozenset[ExperimentPhase] = frozenset(Outcome)
