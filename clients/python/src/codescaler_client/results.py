"""What the client sends and gets back: the item, the result types and the one error type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ScoreItem:
    """One (problem, response) pair; ``language`` defaults to the server's (python)."""

    problem: str
    response: str
    language: str | None = None


#: A (problem, response) pair: a ScoreItem, a mapping with those keys (and "language"), or a tuple.
ItemLike = ScoreItem | Mapping[str, Any] | tuple[str, str]


@dataclass(frozen=True, slots=True)
class ScoreResult:
    """The server's answer for one item (see POST /v1/score); ``index`` is the input position."""

    index: int
    reward: float
    score: float | None
    valid: bool
    extraction_status: str
    language: str
    code: str | None
    truncated: bool
    tokens: int
    error: str | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], index: int) -> ScoreResult:
        """Parse one element of ``results``, re-indexed to its place in the caller's list."""
        extraction = data["extraction"]
        return cls(index, float(data["reward"]), data["score"], bool(data["valid"]), extraction["status"],
                   extraction["language"], extraction.get("code"), bool(data["truncated"]), int(data["tokens"]),
                   data["error"])


@dataclass(frozen=True, slots=True)
class RankResult:
    """Best-of-N: ``ranking`` lists indices by reward, highest first, ties by index."""

    model: str
    best: int
    ranking: list[int]
    results: list[ScoreResult]


@dataclass(frozen=True, slots=True)
class RewardResult:
    """OpenRLHF's shape (POST /get_reward), aligned with the queries."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class CodeScalerError(Exception):
    """The service refused or failed a request, or could not be reached (``status`` None).

    ``code`` and ``message`` are the server's; ``retry_after`` is its ``Retry-After`` in seconds.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str = "error",
                 request_id: str | None = None, retry_after: float | None = None) -> None:
        suffix = f" (request {request_id})" if request_id else ""
        super().__init__(f"{status or 'no answer'} {code}: {message}{suffix}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after
