"""What a site does with nnU-Net, behind the few calls ``SiteService`` makes.

Tests and benchmarks run whole federations without nnU-Net's compute by naming another
backend in ``FEDNNUNET_SITE_BACKEND`` (an import path, ``module:factory``, called with
the site's settings); the product never sets it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from fednnunet.errors import FedError
from fednnunet.messages import ExperimentOptions
from fednnunet.settings import Settings


@dataclass(frozen=True)
class Planned:
    """The outcome of a site's plan phase."""

    plans: dict[str, Any]
    plans_sha256: str  # equal hashes: equal networks
    num_cases: int  # the site's FedAvg weight for the whole experiment


class NnunetBackend:
    """nnU-Net's own fingerprinting, planning and trainer, at one site."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def warm_up(self) -> None:
        """Import nnU-Net now (torch, SimpleITK, nnunetv2: ~5 CPU-s), not in the first
        phase: a site worker is a long-lived service. Refuses an untested nnunetv2."""
        import fednnunet.nnunet.fingerprint
        import fednnunet.nnunet.planning
        import fednnunet.nnunet.session  # noqa: F401
        from fednnunet.nnunet.compat import import_nnunet

        import_nnunet()

    def fingerprint(self, dataset_id: int) -> dict[str, Any]:
        from fednnunet.nnunet.fingerprint import extract_site_fingerprint

        # nnU-Net's own extractor is skipped: FFE planning replaces its output with the
        # merged fingerprint anyway, and the summary reads every case itself.
        return extract_site_fingerprint(dataset_id, num_processes=2, run_nnunet=False)

    def plan(
        self, dataset_id: int, options: ExperimentOptions, fingerprint: dict[str, Any] | None
    ) -> Planned:
        from fednnunet.nnunet.planning import plan_and_preprocess, training_case_count

        plans = plan_and_preprocess(
            dataset_id,
            [options.configuration],
            fingerprint=fingerprint,
            plans_identifier=options.plans_identifier,
            num_processes=2,
        )
        return Planned(
            plans,
            self.plans_sha256(plans),
            training_case_count(
                dataset_id, options.configuration, options.fold, options.plans_identifier
            ),
        )

    def plans_sha256(self, plans: dict[str, Any]) -> str:
        from fednnunet.nnunet.planning import plans_sha256

        return plans_sha256(plans)

    def session(self, dataset_id: int, options: ExperimentOptions, run_id: str, **more: Any) -> Any:
        """The training session of one experiment (``FederatedTrainingSession``); ``more``:
        its ``trainer_folder`` and ``lr_scale`` (a fine-tuned model beside the federated one).
        """
        from fednnunet.nnunet.session import FederatedTrainingSession

        da = self.settings.da_processes
        return FederatedTrainingSession(
            dataset_id,
            options,
            torch_threads=self.settings.torch_threads or None,
            da_processes=None if da < 0 else da,
            run_id=run_id,
            **more,
        )


def load_backend(settings: Settings) -> NnunetBackend:
    """nnU-Net, or the backend ``settings.site_backend`` names (``module:factory``)."""
    if not settings.site_backend:
        return NnunetBackend(settings)
    module, _, name = settings.site_backend.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name or "backend")
    except (ImportError, AttributeError) as exc:
        raise FedError(f"FEDNNUNET_SITE_BACKEND={settings.site_backend}: {exc}") from None
    return factory(settings)
