"""Federated methods as plug-ins: one module per method, each exporting ``STRATEGY``.

Adding a method = adding a module here (its file name is the method's name).
"""

from __future__ import annotations

import pkgutil
from importlib import import_module
from typing import Annotated

from pydantic import AfterValidator

from fednnunet.strategies.base import Strategy

METHODS: tuple[str, ...] = tuple(
    sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")
)


def get_strategy(name: str) -> Strategy:
    """The strategy of ``name`` (one of :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; one of {', '.join(METHODS)}")
    strategy = import_module(f"fednnunet.strategies.{name}").STRATEGY
    if not isinstance(strategy, Strategy) or strategy.name != name:
        raise TypeError(f"fednnunet.strategies.{name}.STRATEGY is not a Strategy named {name!r}")
    return strategy


def _known_method(name: str) -> str:
    get_strategy(name)
    return name


# A method name as specs, tasks and the stored state carry it (validated against METHODS).
MethodName = Annotated[str, AfterValidator(_known_method)]

__all__ = ["METHODS", "MethodName", "Strategy", "get_strategy"]
