"""When the client tries a request again, and how long it waits: one policy for both clients.

Retried: 502 (a proxy while the server restarts), 503 (overload, model still loading),
504 (queue timeout) and transport errors (refused or dropped connections, timeouts).
Never retried: 4xx and 500, since the same request would fail the same way. Scoring is
idempotent, so a retry is always safe. The loop itself is tenacity's; this module only
configures it, once, for the blocking and the asyncio client alike.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import RetryCallState, retry_if_exception, stop_after_attempt

from codescaler_client.results import CodeScalerError


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

    def retryable(self, exc: BaseException) -> bool:
        """A transport error or a status in ``statuses``; everything else is final."""
        if isinstance(exc, httpx.TransportError):
            return True
        return isinstance(exc, CodeScalerError) and exc.status in self.statuses

    def wait(self, state: RetryCallState) -> float:
        """tenacity's wait hook: back-off for the attempt just failed, honouring its Retry-After."""
        failure = state.outcome.exception() if state.outcome is not None else None
        retry_after = failure.retry_after if isinstance(failure, CodeScalerError) else None
        return self.delay(state.attempt_number - 1, retry_after)

    def tenacity_options(self) -> dict[str, Any]:
        """Arguments of ``tenacity.Retrying`` and ``tenacity.AsyncRetrying`` for this policy."""
        return {"stop": stop_after_attempt(self.max_retries + 1), "wait": self.wait,
                "retry": retry_if_exception(self.retryable), "reraise": True}


def retry_after_seconds(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds; None when absent or an HTTP date (then plain back-off applies)."""
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


@contextlib.contextmanager
def unreachable_as_error() -> Iterator[None]:
    """A transport error that outlived its retries becomes a CodeScalerError (code "unreachable")."""
    try:
        yield
    except httpx.TransportError as exc:
        raise CodeScalerError(f"{type(exc).__name__}: {exc}", code="unreachable") from exc
