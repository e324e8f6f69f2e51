"""The interface every federated method implements (pure: no I/O).

A method decides four things and nothing else: how sites plan (one federated
fingerprint and identical plans, or each site alone), which layers the federation
shares (one exact architecture, or the layers every site has with the same shape),
when a round closes, and how accepted updates combine. The state machine, the
coordinator and the site ask the experiment's strategy instead of testing its name,
so a further method is one new module in this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from fednnunet.phases import Phase

PlanningMode = Literal["federated", "local"]
SharedLayers = Literal["all", "common"]


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    # "federated": sites plan from one merged fingerprint and must end with identical
    # plans; "local": each site plans alone from its own data.
    planning: PlanningMode
    # "all": every update carries one exact architecture; "common": only the layers with
    # the same name and shape at every site are averaged, the rest stay local.
    shared_layers: SharedLayers
    # How updates combine: case-weighted FedAvg (the coordinator's ``aggregation`` and
    # ``max_site_weight`` options refine it) over the shared layers.
    combine: Literal["fedavg"] = "fedavg"

    @property
    def federated_fingerprint(self) -> bool:
        return self.planning == "federated"

    @property
    def first_phase(self) -> Phase:
        return Phase.FINGERPRINT if self.federated_fingerprint else Phase.PLAN

    @property
    def exact_architecture(self) -> bool:
        return self.shared_layers == "all"

    def plans_problem(self, plans_sha256: Mapping[str, str]) -> str | None:
        """Why the sites' plans cannot train together (None: they can)."""
        if self.federated_fingerprint and len(set(plans_sha256.values())) != 1:
            return f"{self.name.upper()} sites ended with different plans: " + ", ".join(
                f"{s}={h[:12]}" for s, h in sorted(plans_sha256.items())
            )
        return None

    def expected_plans(self, plans_sha256: Mapping[str, str]) -> str | None:
        """The plans hash every training site must hold (None: each keeps its own)."""
        if self.federated_fingerprint and plans_sha256:
            return next(iter(plans_sha256.values()))
        return None

    def round_closes(
        self, done: int, quorum: int, all_done: bool, settled: bool, deadline_passed: bool
    ) -> bool:
        """A synchronous round closes when every site answered, or when everyone who
        will answer did (or the deadline passed) and at least ``quorum`` did."""
        return all_done or ((settled or deadline_passed) and done >= quorum)
