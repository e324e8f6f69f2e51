"""Errors that the CLI turns into one clear line (no traceback)."""

from __future__ import annotations


class FedError(Exception):
    """Base class: an error whose message is meant for a human, one line."""


class ServiceUnreachable(FedError):
    def __init__(self, service: str, url: str, detail: str = "") -> None:
        from fednnunet.settings import redact_url

        url = redact_url(url)  # never print a password
        self.service, self.url = service, url
        tail = f": {detail}" if detail else ""
        super().__init__(f"{service} unreachable at {url}{tail}")


class IntegrityError(FedError):
    """An artifact whose sha256 or size does not match its reference."""


class SpecError(FedError):
    """An invalid experiment spec; carries every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid experiment spec:\n" + "\n".join(f"  - {p}" for p in problems))


class DatasetError(FedError):
    """A malformed nnU-Net dataset at a site."""


class UpdateRejected(FedError):
    """A site update that must not be aggregated (NaN/Inf, wrong shape, absurd norm...)."""


class PolicyRefusal(FedError):
    """A task the site will not run (outside its policy, or unsafe): never retried."""
