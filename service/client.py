"""Python client of CodeScaler Serve: score and rank over HTTP, with retries; no torch.

Long lists for ``score`` (and OpenRLHF's ``get_reward``) are split into requests of
``chunk_size`` items, at most ``max_concurrency`` in flight, and the results come back in
input order; ``rank`` sends its N candidates in one request so that the server ranks them.
Overload (503), queue timeouts (504), a proxy's 502 while the server restarts, and
connection errors are retried with exponential back-off that honours ``Retry-After``:
scoring is idempotent, so a retry is always safe. Other errors (4xx, 500) raise at once,
since the same request would fail the same way. The URL and key default to
``CODESCALER_URL`` and ``CODESCALER_API_KEY``, read when a client is built, never at import.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "CODESCALER_URL"
KEY_ENV = "CODESCALER_API_KEY"

T = TypeVar("T")


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
    """The service refused or failed a request; ``code`` and ``message`` are the server's."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "error",
                 request_id: str | None = None) -> None:
        suffix = f" (request {request_id})" if request_id else ""
        super().__init__(f"{status or 'no answer'} {code}: {message}{suffix}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to wait before trying a request again.

    Attempt n (0-based) waits ``backoff * 2**n`` seconds with jitter (so that many
    trainers do not retry in lockstep), at least what ``Retry-After`` asks, and never
    more than ``max_backoff``.
    """

    max_retries: int = 6
    backoff: float = 0.5
    max_backoff: float = 30.0
    statuses: frozenset[int] = frozenset({502, 503, 504})

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before attempt ``attempt + 1``."""
        exponential = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
        return min(self.max_backoff, max(exponential, retry_after or 0.0))


def retry_after_seconds(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds; None when absent or an HTTP date (then plain back-off applies)."""
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _next_delay(policy: RetryPolicy, attempt: int, response: httpx.Response | None) -> float | None:
    """Seconds to wait before trying again, or None when this outcome is final.

    ``response`` is None after a connection error or a timeout.
    """
    if attempt >= policy.max_retries:
        return None
    if response is None:
        return policy.delay(attempt, None)
    if response.status_code in policy.statuses:
        return policy.delay(attempt, retry_after_seconds(response))
    return None


def _body(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a success; a CodeScalerError with the server's code otherwise."""
    if response.is_success:
        return response.json()
    code, message, request_id = "http_error", response.reason_phrase or "error", None
    try:
        error = response.json()["error"]
        code, message, request_id = error["code"], error["message"], error.get("request_id")
    except (ValueError, KeyError, TypeError):
        pass
    raise CodeScalerError(message, status=response.status_code, code=code, request_id=request_id)


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _item_json(item: ItemLike) -> dict[str, str]:
    """One item as the API takes it, from a ScoreItem, a mapping or a (problem, response) tuple."""
    if isinstance(item, ScoreItem):
        item = {"problem": item.problem, "response": item.response, "language": item.language}
    elif not isinstance(item, Mapping):
        item = dict(zip(("problem", "response"), item, strict=True))
    return {"problem": item["problem"], "response": item["response"], **_given(language=item.get("language"))}


def _chunks(values: Sequence[T], size: int) -> list[Sequence[T]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def _merge_results(bodies: Sequence[Mapping[str, Any]], sizes: Sequence[int]) -> list[ScoreResult]:
    """Results of all chunks in input order; a chunk answered with the wrong length is an error."""
    merged: list[ScoreResult] = []
    for body, size in zip(bodies, sizes, strict=True):
        results = sorted(body["results"], key=lambda r: r["index"])
        if len(results) != size:
            raise CodeScalerError(f"sent {size} items, got {len(results)} results", code="protocol_error")
        start = len(merged)
        merged.extend(ScoreResult.from_json(r, start + i) for i, r in enumerate(results))
    return merged


def _merge_rewards(bodies: Sequence[Mapping[str, Any]]) -> RewardResult:
    merged = RewardResult([], [], {})
    for body in bodies:
        merged.rewards.extend(body["rewards"])
        merged.scores.extend(body["scores"])
        for name, values in body.get("extra_logs", {}).items():
            merged.extra_logs.setdefault(name, []).extend(values)
    return merged


@dataclass(frozen=True, slots=True)
class _Plan(Generic[T]):
    """The requests one call needs and how their answers become its result."""

    path: str
    payloads: list[dict[str, Any]]
    finish: Callable[[list[dict[str, Any]]], T]


class _Base:
    """Options and request plans shared by the blocking and the asyncio client."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 180.0,
                 chunk_size: int = 256, max_concurrency: int = 8, retry: RetryPolicy | None = None) -> None:
        if chunk_size < 1 or max_concurrency < 1:
            raise ValueError("chunk_size and max_concurrency must be at least 1")
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        key = os.environ.get(KEY_ENV) if api_key is None else api_key
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = httpx.Timeout(timeout)
        self.chunk_size = chunk_size  # items per request; the server accepts 4096 by default
        self.max_concurrency = max_concurrency  # requests in flight for one call
        self.retry = retry or RetryPolicy()

    def _plan_score(self, items: Iterable[ItemLike], options: dict[str, Any]) -> _Plan[list[ScoreResult]]:
        payloads = [{"items": list(chunk), **options}
                    for chunk in _chunks([_item_json(i) for i in items], self.chunk_size)]
        return _Plan("/v1/score", payloads, lambda bodies: _merge_results(bodies, [len(p["items"]) for p in payloads]))

    def _plan_rank(self, problem: str, responses: Sequence[str], language: str | None,
                   options: dict[str, Any]) -> _Plan[RankResult]:
        # One request whatever N: the server ranks; best-of-N lists are far below its item limit.
        def finish(bodies: list[dict[str, Any]]) -> RankResult:
            body = bodies[0]
            return RankResult(body["model"], body["best"], body["ranking"], _merge_results(bodies, [len(responses)]))

        payload = {"problem": problem, "responses": list(responses), **_given(language=language), **options}
        return _Plan("/v1/rank", [payload], finish)

    def _plan_reward(self, queries: Sequence[str], prompts: Sequence[str] | None) -> _Plan[RewardResult]:
        if prompts is not None and len(prompts) != len(queries):
            raise ValueError(f"{len(prompts)} prompts for {len(queries)} queries")
        size = self.chunk_size
        payloads = [{"query": list(queries[s : s + size]), **({} if prompts is None else
                     {"prompts": list(prompts[s : s + size])})} for s in range(0, len(queries), size)]
        return _Plan("/get_reward", payloads, _merge_rewards)


class CodeScalerClient(_Base):
    """Blocking client; safe to share between threads (one connection pool)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, **options: Any) -> None:
        super().__init__(url, api_key, **options)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout)

    def score(self, items: Iterable[ItemLike], *, extraction: str | None = None, shaping: str | None = None,
              return_code: bool = False) -> list[ScoreResult]:
        """Score (problem, response) pairs; one result per item, in input order."""
        options = _given(extraction=extraction, shaping=shaping, return_code=return_code or None)
        return self._run(self._plan_score(items, options))

    def rank(self, problem: str, responses: Sequence[str], *, language: str | None = None,
             extraction: str | None = None, shaping: str | None = None, top_k: int | None = None) -> RankResult:
        """Rank N responses to one problem, highest reward first (best-of-N)."""
        options = _given(extraction=extraction, shaping=shaping, top_k=top_k)
        return self._run(self._plan_rank(problem, responses, language, options))

    def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None) -> RewardResult:
        """OpenRLHF's protocol: full prompt-plus-response texts; the server splits them."""
        return self._run(self._plan_reward(queries, prompts))

    def _run(self, plan: _Plan[T]) -> T:
        if len(plan.payloads) <= 1:
            return plan.finish([self._post(plan.path, p) for p in plan.payloads])
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(plan.payloads)), thread_name_prefix="codescaler")
        try:
            return plan.finish(list(pool.map(lambda p: self._post(plan.path, p), plan.payloads)))
        finally:  # after a failure, chunks not yet sent are dropped rather than waited for
            pool.shutdown(wait=False, cancel_futures=True)

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        for attempt in itertools.count():
            try:
                response = self._http.post(path, json=payload)
            except httpx.TransportError as exc:
                delay = _next_delay(self.retry, attempt, None)
                if delay is None:
                    raise CodeScalerError(f"{type(exc).__name__}: {exc}", code="unreachable") from exc
            else:
                delay = _next_delay(self.retry, attempt, response)
                if delay is None:
                    return _body(response)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCodeScalerClient(_Base):
    """asyncio client; use it from one event loop (httpx's rule for its connection pool)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, **options: Any) -> None:
        super().__init__(url, api_key, **options)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout)

    async def score(self, items: Iterable[ItemLike], *, extraction: str | None = None, shaping: str | None = None,
                    return_code: bool = False) -> list[ScoreResult]:
        """Score (problem, response) pairs; one result per item, in input order."""
        options = _given(extraction=extraction, shaping=shaping, return_code=return_code or None)
        return await self._run(self._plan_score(items, options))

    async def rank(self, problem: str, responses: Sequence[str], *, language: str | None = None,
                   extraction: str | None = None, shaping: str | None = None, top_k: int | None = None) -> RankResult:
        """Rank N responses to one problem, highest reward first (best-of-N)."""
        options = _given(extraction=extraction, shaping=shaping, top_k=top_k)
        return await self._run(self._plan_rank(problem, responses, language, options))

    async def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None) -> RewardResult:
        """OpenRLHF's protocol: full prompt-plus-response texts; the server splits them."""
        return await self._run(self._plan_reward(queries, prompts))

    async def _run(self, plan: _Plan[T]) -> T:
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(payload: dict[str, Any]) -> dict[str, Any]:
            async with gate:
                return await self._post(plan.path, payload)

        return plan.finish(await _gather_or_cancel([one(p) for p in plan.payloads]))

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        for attempt in itertools.count():
            try:
                response = await self._http.post(path, json=payload)
            except httpx.TransportError as exc:
                delay = _next_delay(self.retry, attempt, None)
                if delay is None:
                    raise CodeScalerError(f"{type(exc).__name__}: {exc}", code="unreachable") from exc
            else:
                delay = _next_delay(self.retry, attempt, response)
                if delay is None:
                    return _body(response)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _gather_or_cancel(coroutines: list[Awaitable[T]]) -> list[T]:
    """All results in order; the first failure cancels the requests still running."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


__all__ = ["AsyncCodeScalerClient", "CodeScalerClient", "CodeScalerError", "RankResult", "RetryPolicy",
           "RewardResult", "ScoreItem", "ScoreResult", "retry_after_seconds"]
