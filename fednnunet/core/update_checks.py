"""Checks an update must pass before it is aggregated (pure).

A site update with NaN/Inf, a shape that does not match the expected
architecture, or an absurd norm is quarantined: one bad site must not poison
the global model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# An update whose L2 norm exceeds this many times the reference norm is absurd.
DEFAULT_MAX_NORM_RATIO = 100.0


def update_problems(
    update: Mapping[str, torch.Tensor],
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    reference_norm: float | None = None,
    max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO,
) -> list[str]:
    """Every reason to refuse this update (empty list: acceptable)."""
    return screen_values(update, expected_shapes, reference_norm, max_norm_ratio)[0]


def screen_values(
    update: Mapping[str, torch.Tensor],
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    reference_norm: float | None = None,
    max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO,
) -> tuple[list[str], float]:
    """(every reason to refuse, L2 norm over the float tensors) from one pass over the
    values: the coordinator needs both, and a second norm pass over a 125 MB update
    would sit on the round's critical path."""
    problems: list[str] = []
    if not update:
        return ["update has no tensors"], 0.0
    floats = {n: t for n, t in update.items() if t.is_floating_point()}
    norms = _norms(list(floats.values()))
    sq = 0.0
    for (name, tensor), norm in zip(floats.items(), norms, strict=True):
        # A tensor norm is finite iff every value is (barring float32 overflow of huge
        # finite values, which the norm check below refuses anyway): one fused pass.
        if not math.isfinite(norm) and not bool(torch.isfinite(tensor).all()):
            problems.append(f"{name}: NaN or Inf values")
            continue
        sq += norm * norm
    for name, tensor in update.items():
        expected = (expected_shapes or {}).get(name)
        if expected is not None and tuple(tensor.shape) != tuple(expected):
            problems.append(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(expected)}")
    norm = math.sqrt(sq)
    if not math.isfinite(norm):
        problems.append("L2 norm overflows")
    elif (
        reference_norm is not None and reference_norm > 0 and norm > max_norm_ratio * reference_norm
    ):
        problems.append(
            f"L2 norm {norm:.3g} is more than {max_norm_ratio:g}x the global norm "
            f"{reference_norm:.3g}"
        )
    return problems, norm


def _norms(tensors: list[torch.Tensor]) -> list[float]:
    """Per-tensor L2 norms with one vectorized call (float32 math, float64 result)."""
    if not tensors:
        return []
    return [float(n) for n in torch._foreach_norm(tensors)]


def l2_norm(update: Mapping[str, torch.Tensor]) -> float:
    norms = _norms([t for t in update.values() if t.is_floating_point()])
    return math.sqrt(sum(n * n for n in norms))


# ---------------------------------------------------------------- architecture checks
@dataclass(frozen=True)
class Signature:
    """What an update declares about the model: tensors (shape, dtype) and aliases."""

    tensors: Mapping[str, tuple[tuple[int, ...], str]]
    aliases: Mapping[str, str]

    def key(self) -> tuple:
        return (tuple(sorted(self.tensors.items())), tuple(sorted(self.aliases.items())))


def signature_problems(update: Signature, reference: Signature, exact: bool) -> list[str]:
    """Why ``update`` does not carry the reference model (empty: it does).

    ``exact`` (FFE: one architecture everywhere): the same tensors and aliases, nothing
    more. Otherwise (AsymFedAvg) the update may hold site-only layers besides the shared
    ones, but every shared layer with the same shape and dtype, and no alias of its own
    over a shared name.
    """
    problems = []
    missing = [n for n in reference.tensors if n not in update.tensors]
    if missing:
        problems.append(f"{len(missing)} shared layer(s) missing, e.g. {missing[0]!r}")
    for name, (shape, dtype) in reference.tensors.items():
        got = update.tensors.get(name)
        if got is not None and got != (shape, dtype):
            problems.append(
                f"{name}: shape {list(got[0])} {got[1]} != expected {list(shape)} {dtype}"
            )
            break
    if exact:
        extra = [n for n in update.tensors if n not in reference.tensors]
        if extra:
            problems.append(f"{len(extra)} unexpected layer(s), e.g. {extra[0]!r}")
    if exact:
        aliases_ok = dict(update.aliases) == dict(reference.aliases)
    else:
        # Every shared alias as in the reference, and no shared tensor name turned into
        # an alias (that would replace an averaged layer by another tensor).
        aliases_ok = all(update.aliases.get(a) == c for a, c in reference.aliases.items())
        aliases_ok = aliases_ok and not any(a in reference.tensors for a in update.aliases)
    if not aliases_ok:
        problems.append("alias map differs from the reference model's")
    return problems


def majority_signature(signatures: Mapping[str, Signature]) -> Signature | None:
    """The signature more than half of the sites share, if any (FFE's first round:
    every honest site planned the same architecture, so a minority is refused)."""
    counts: dict[tuple, list[str]] = {}
    for site, sig in signatures.items():
        counts.setdefault(sig.key(), []).append(site)
    best = max(counts.values(), key=len, default=[])
    if len(best) * 2 > len(signatures):
        return signatures[best[0]]
    return None


def common_signature(signatures: Sequence[Signature]) -> Signature:
    """AsymFedAvg's shared model: layers with one shape and dtype at every site, and the
    aliases every site agrees on (a single site cannot add one)."""
    if not signatures:
        return Signature({}, {})
    first = signatures[0]
    tensors = {
        n: spec
        for n, spec in first.tensors.items()
        if all(s.tensors.get(n) == spec for s in signatures)
    }
    aliases = {
        a: c
        for a, c in first.aliases.items()
        if c in tensors and all(s.aliases.get(a) == c for s in signatures)
    }
    return Signature(tensors, aliases)


def norm_outliers(
    norms: Mapping[str, float], max_ratio: float = DEFAULT_MAX_NORM_RATIO
) -> dict[str, str]:
    """Sites whose update norm exceeds ``max_ratio`` x the round's median norm.

    Works from the first round on (no previous global needed); a single site cannot
    move the median of three or more.
    """
    if not norms:
        return {}
    median = statistics.median(norms.values())
    return {
        site: f"L2 norm {n:.3g} is more than {max_ratio:g}x the round's median {median:.3g}"
        for site, n in norms.items()
        if median > 0 and n > max_ratio * median
    }
