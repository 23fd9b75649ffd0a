"""The blocking and the asyncio client of CodeScaler Serve: score, rank and OpenRLHF's get_reward.

Both clients share their options and request plans (``wire``) and their retry policy
(``retry``); they differ only in how a request is sent and how chunks run concurrently
(a thread pool, or tasks on the event loop), at most ``max_concurrency`` at once. The
URL and key default to ``CODESCALER_URL`` and ``CODESCALER_API_KEY``, read when a client
is built, never at import.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, TypeVar

import httpx
from tenacity import AsyncRetrying, Retrying

from codescaler_client import wire
from codescaler_client.results import ItemLike, RankResult, RewardResult, ScoreResult
from codescaler_client.retry import RetryPolicy, unreachable_as_error

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "CODESCALER_URL"
KEY_ENV = "CODESCALER_API_KEY"

T = TypeVar("T")


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

    def _score_plan(self, items: Iterable[ItemLike], extraction: str | None, shaping: str | None,
                    return_code: bool) -> wire.Plan[list[ScoreResult]]:
        options = wire.given(extraction=extraction, shaping=shaping, return_code=return_code or None)
        return wire.plan_score(items, options, self.chunk_size)

    def _rank_plan(self, problem: str, responses: Sequence[str], language: str | None, extraction: str | None,
                   shaping: str | None, top_k: int | None) -> wire.Plan[RankResult]:
        options = wire.given(extraction=extraction, shaping=shaping, top_k=top_k)
        return wire.plan_rank(problem, responses, language, options)

    def _reward_plan(self, queries: Sequence[str], prompts: Sequence[str] | None) -> wire.Plan[RewardResult]:
        return wire.plan_reward(queries, prompts, self.chunk_size)


class CodeScalerClient(_Base):
    """Blocking client; safe to share between threads (one connection pool)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, **options: Any) -> None:
        super().__init__(url, api_key, **options)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout)

    def score(self, items: Iterable[ItemLike], *, extraction: str | None = None, shaping: str | None = None,
              return_code: bool = False) -> list[ScoreResult]:
        """Score (problem, response) pairs; one result per item, in input order."""
        return self._run(self._score_plan(items, extraction, shaping, return_code))

    def rank(self, problem: str, responses: Sequence[str], *, language: str | None = None,
             extraction: str | None = None, shaping: str | None = None, top_k: int | None = None) -> RankResult:
        """Rank N responses to one problem, highest reward first (best-of-N)."""
        return self._run(self._rank_plan(problem, responses, language, extraction, shaping, top_k))

    def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None) -> RewardResult:
        """OpenRLHF's protocol: full prompt-plus-response texts; the server splits them."""
        return self._run(self._reward_plan(queries, prompts))

    def _run(self, plan: wire.Plan[T]) -> T:
        if len(plan.payloads) <= 1:
            return plan.finish([self._post(plan.path, p) for p in plan.payloads])
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(plan.payloads)), thread_name_prefix="codescaler")
        try:
            return plan.finish(list(pool.map(lambda p: self._post(plan.path, p), plan.payloads)))
        finally:  # after a failure, chunks not yet sent are dropped rather than waited for
            pool.shutdown(wait=False, cancel_futures=True)

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        with unreachable_as_error():
            for attempt in Retrying(**self.retry.tenacity_options()):
                with attempt:
                    return wire.body_or_error(self._http.post(path, json=payload))
        raise AssertionError("tenacity ends with a result or an exception")

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
        return await self._run(self._score_plan(items, extraction, shaping, return_code))

    async def rank(self, problem: str, responses: Sequence[str], *, language: str | None = None,
                   extraction: str | None = None, shaping: str | None = None, top_k: int | None = None) -> RankResult:
        """Rank N responses to one problem, highest reward first (best-of-N)."""
        return await self._run(self._rank_plan(problem, responses, language, extraction, shaping, top_k))

    async def get_reward(self, queries: Sequence[str], prompts: Sequence[str] | None = None) -> RewardResult:
        """OpenRLHF's protocol: full prompt-plus-response texts; the server splits them."""
        return await self._run(self._reward_plan(queries, prompts))

    async def _run(self, plan: wire.Plan[T]) -> T:
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(payload: dict[str, Any]) -> dict[str, Any]:
            async with gate:
                return await self._post(plan.path, payload)

        return plan.finish(await _gather_or_cancel([one(p) for p in plan.payloads]))

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        with unreachable_as_error():
            async for attempt in AsyncRetrying(**self.retry.tenacity_options()):
                with attempt:
                    return wire.body_or_error(await self._http.post(path, json=payload))
        raise AssertionError("tenacity ends with a result or an exception")

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
