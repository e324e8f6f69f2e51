"""Who may say what: a sender's identity is its broker user, validated by RabbitMQ.

Pure rules, no I/O. A site publishes with the AMQP ``user_id`` of its broker user
(``site-<id>``); RabbitMQ closes the channel of any publish whose ``user_id`` is not
the authenticated user, so the coordinator can believe that property, and nothing
in a message body that names a site.
"""

from __future__ import annotations

from dataclasses import dataclass

from fednnunet.keys import site_user


@dataclass(frozen=True)
class SenderPolicy:
    """The coordinator's rules for accepting a message from a broker user.

    ``own_user``: the coordinator's broker user. ``operators``: users that may start and
    cancel experiments. ``shared_user_trusted``: development stacks where every process
    is the same broker user; that user may then speak for any site (never in production).
    """

    own_user: str
    operators: frozenset[str]
    shared_user_trusted: bool = False

    @classmethod
    def from_settings(cls, settings) -> SenderPolicy:  # noqa: ANN001 - avoids an import cycle
        from fednnunet.adapters.broker import broker_user

        return cls(broker_user(settings), frozenset(settings.operator_users), settings.development)

    def may_speak_for(self, sender: str | None, site: str) -> bool:
        """``None`` means an in-process caller (tests, simulation), which is trusted."""
        if sender is None:
            return True
        if sender == site_user(site):
            return True
        return self.shared_user_trusted and sender == self.own_user

    def is_operator(self, sender: str | None) -> bool:
        return sender is None or sender == self.own_user or sender in self.operators
