"""Validity-preserving reward shaping: raw model score plus validity -> reward, and rewards -> ranking.

With ``softplus`` (the paper's) every valid program gets a reward > 0 and every
invalid one exactly 0.0, so validity dominates and the model orders the valid ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SHAPING_POLICIES = ("softplus", "none")


def softplus(score: float) -> float:
    """log(1 + e^score), computed without overflow for any finite score.

    The naive form overflows above ~710; ``max(s, 0) + log1p(exp(-|s|))`` does not.
    For very negative scores the result underflows towards 0 but stays > 0 down to
    about -745; below that it would be 0.0, so it is floored at the smallest
    positive float to keep "every valid reward > every invalid reward".
    """
    value = max(score, 0.0) + math.log1p(math.exp(-abs(score)))
    return max(value, math.ulp(0.0))


def shape(score: float | None, valid: bool, policy: str = "softplus", invalid_reward: float = 0.0) -> float:
    """The reward of one item.

    ``softplus``: valid -> softplus(score), invalid -> 0.0.
    ``none``: valid -> the raw score, invalid -> ``invalid_reward``.
    A valid item must carry a finite score; the caller reports non-finite scores as errors.
    """
    if policy not in SHAPING_POLICIES:
        raise ValueError(f"unknown shaping policy {policy!r}")
    if not valid or score is None:
        return 0.0 if policy == "softplus" else float(invalid_reward)
    if not math.isfinite(score):
        raise ValueError("score must be finite")
    return softplus(score) if policy == "softplus" else float(score)


def sigmoid(score: float) -> float:
    """Logistic function without overflow, for callers that expect 0..1 (OpenRLHF ``scores``)."""
    if score >= 0:
        return 1.0 / (1.0 + math.exp(-score))
    z = math.exp(score)
    return z / (1.0 + z)


def ranking(rewards: Sequence[float]) -> list[int]:
    """Best-of-N order, the one rule of /v1/rank and ``codescaler-serve rank``: reward, highest first; ties by index."""
    return sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
