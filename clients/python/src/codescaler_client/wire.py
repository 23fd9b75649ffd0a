"""The wire format: request bodies from the caller's arguments, results from the server's answers.

Long lists for ``score`` (and OpenRLHF's ``get_reward``) become requests of ``chunk_size``
items whose answers are merged back in input order; ``rank`` is always one request, so
that the server ranks all N candidates together. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from codescaler_client.results import CodeScalerError, ItemLike, RankResult, RewardResult, ScoreItem, ScoreResult
from codescaler_client.retry import retry_after_seconds

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Plan(Generic[T]):
    """The requests one call needs and how their answers become its result."""

    path: str
    payloads: list[dict[str, Any]]
    finish: Callable[[list[dict[str, Any]]], T]


def body_or_error(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a success; a CodeScalerError with the server's code (and Retry-After) otherwise."""
    if response.is_success:
        return response.json()
    code, message, request_id = "http_error", response.reason_phrase or "error", None
    try:
        error = response.json()["error"]
        code, message, request_id = error["code"], error["message"], error.get("request_id")
    except (ValueError, KeyError, TypeError):
        pass
    raise CodeScalerError(message, status=response.status_code, code=code, request_id=request_id,
                          retry_after=retry_after_seconds(response))


def given(**options: Any) -> dict[str, Any]:
    """The options the caller set (None means: the server's default)."""
    return {k: v for k, v in options.items() if v is not None}


def item_json(item: ItemLike) -> dict[str, str]:
    """One item as the API takes it, from a ScoreItem, a mapping or a (problem, response) tuple."""
    if isinstance(item, ScoreItem):
        item = {"problem": item.problem, "response": item.response, "language": item.language}
    elif not isinstance(item, Mapping):
        item = dict(zip(("problem", "response"), item, strict=True))
    return {"problem": item["problem"], "response": item["response"], **given(language=item.get("language"))}


def merge_results(bodies: Sequence[Mapping[str, Any]], sizes: Sequence[int]) -> list[ScoreResult]:
    """Results of all chunks in input order; a chunk answered with the wrong length is an error."""
    merged: list[ScoreResult] = []
    for body, size in zip(bodies, sizes, strict=True):
        results = sorted(body["results"], key=lambda r: r["index"])
        if len(results) != size:
            raise CodeScalerError(f"sent {size} items, got {len(results)} results", code="protocol_error")
        start = len(merged)
        merged.extend(ScoreResult.from_json(r, start + i) for i, r in enumerate(results))
    return merged


def merge_rewards(bodies: Sequence[Mapping[str, Any]]) -> RewardResult:
    """OpenRLHF answers of all chunks, concatenated in order."""
    merged = RewardResult([], [], {})
    for body in bodies:
        merged.rewards.extend(body["rewards"])
        merged.scores.extend(body["scores"])
        for name, values in body.get("extra_logs", {}).items():
            merged.extra_logs.setdefault(name, []).extend(values)
    return merged


def plan_score(items: Iterable[ItemLike], options: dict[str, Any], chunk_size: int) -> Plan[list[ScoreResult]]:
    """POST /v1/score in chunks of ``chunk_size`` items."""
    encoded = [item_json(i) for i in items]
    payloads = [{"items": encoded[s : s + chunk_size], **options} for s in range(0, len(encoded), chunk_size)]
    return Plan("/v1/score", payloads, lambda bodies: merge_results(bodies, [len(p["items"]) for p in payloads]))


def plan_rank(problem: str, responses: Sequence[str], language: str | None,
              options: dict[str, Any]) -> Plan[RankResult]:
    """POST /v1/rank, one request whatever N: best-of-N lists are far below the server's item limit."""
    def finish(bodies: list[dict[str, Any]]) -> RankResult:
        body = bodies[0]
        return RankResult(body["model"], body["best"], body["ranking"], merge_results(bodies, [len(responses)]))

    payload = {"problem": problem, "responses": list(responses), **given(language=language), **options}
    return Plan("/v1/rank", [payload], finish)


def plan_reward(queries: Sequence[str], prompts: Sequence[str] | None, chunk_size: int) -> Plan[RewardResult]:
    """POST /get_reward (OpenRLHF's protocol) in chunks of ``chunk_size`` queries."""
    if prompts is not None and len(prompts) != len(queries):
        raise ValueError(f"{len(prompts)} prompts for {len(queries)} queries")
    payloads = []
    for s in range(0, len(queries), chunk_size):
        payload: dict[str, Any] = {"query": list(queries[s : s + chunk_size])}
        if prompts is not None:
            payload["prompts"] = list(prompts[s : s + chunk_size])
        payloads.append(payload)
    return Plan("/get_reward", payloads, merge_rewards)
