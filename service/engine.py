"""The scoring pipeline shared by the HTTP routes, the offline CLI and Ray replicas.

Per request: admission first (items and estimated tokens reserved, service/admission.py;
a refusal costs no extraction or tokenization), then extraction and tokenization on a
thread pool (so the event loop never blocks and the next batch is prepared while the
model runs) under the request's deadline, valid items to the batcher, shaping of the
answers. Invalid, too-long and failed items are answered per item; nothing here raises
for one bad item.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from models.base import EncodedItem, Scorer, TooLong
from service.admission import Admission, Ticket, estimate_tokens
from service.batcher import Batcher, ItemScore
from service.errors import DeadlineExceeded, ItemFailed, ServiceError
from service.extraction import Extraction, extract
from service.metrics import Metrics
from service.settings import Settings
from service.shaping import shape

PREPARE_CHUNK = 32  # items per thread-pool task: small enough to spread, big enough to amortise


@dataclass(frozen=True, slots=True)
class ItemInput:
    """One (problem, response) pair as a caller sent it."""

    problem: str
    response: str
    language: str | None = None


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """Everything the service knows about one scored (or refused) item."""

    reward: float
    score: float | None
    valid: bool
    extraction: Extraction
    truncated: bool
    tokens: int
    error: str | None
    queue_s: float = 0.0
    inference_s: float = 0.0
    forged: bool = False


@dataclass(frozen=True, slots=True)
class _Prepared:
    extraction: Extraction
    encoded: EncodedItem | None
    error: str | None


class _Abandoned(Exception):
    """The request's deadline passed, or it went away, while its items waited for a worker."""


class Engine:
    """Scores lists of items against one Scorer through one Batcher."""

    def __init__(self, scorer: Scorer, settings: Settings, metrics: Metrics) -> None:
        self.scorer = scorer
        self.settings = settings
        self.metrics = metrics
        self.batcher = Batcher(
            scorer, metrics,
            max_batch_tokens=settings.max_batch_tokens, max_batch_items=settings.max_batch_items,
            max_wait_ms=settings.max_wait_ms, max_queue_items=settings.max_queue_items,
            forward_timeout=settings.forward_timeout, result_cache_items=settings.result_cache_items,
        )
        self._pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="codescaler-prep")
        # Bounds the preparation pool's queue too: only admitted items are ever submitted to it.
        self.admission = Admission(settings.max_queue_items, settings.max_queue_tokens,
                                   retry_after=max(1, math.ceil(settings.max_wait_ms / 1000 + 1)))

    @property
    def healthy(self) -> bool:
        """The batch loop is alive and the model thread is not stuck."""
        return self.batcher.healthy

    async def start(self) -> None:
        """Warm the model up (first forwards are slow) and start the batch loop."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.scorer.warmup)
        self.batcher.start()

    async def stop(self) -> None:
        """Stop the batch loop and the worker threads."""
        await self.batcher.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def score(
        self,
        inputs: Sequence[ItemInput],
        *,
        extraction: str | None = None,
        shaping: str | None = None,
        timeout: float | None = None,
    ) -> list[ItemOutcome]:
        """Outcomes for ``inputs`` in order; raises only for whole-request failures (overload, ...)."""
        wait = timeout if timeout is not None else self.settings.request_timeout
        estimate = sum(estimate_tokens(len(i.problem) + len(i.response), self.settings.max_length) for i in inputs)
        try:
            ticket = await self.admission.admit(len(inputs), estimate, wait)
        except ServiceError as exc:
            self.metrics.refused.labels(exc.code).inc()
            raise
        self._observe_admission()
        try:
            return await self._score_admitted(inputs, ticket, extraction or self.settings.extraction,
                                              shaping or self.settings.shaping, wait)
        finally:
            ticket.release()
            self._observe_admission()

    def _observe_admission(self) -> None:
        self.metrics.admitted_items.set(self.admission.items)
        self.metrics.admitted_tokens.set(self.admission.tokens)

    async def _score_admitted(
        self, inputs: Sequence[ItemInput], ticket: Ticket, policy: str, shaping: str, wait: float
    ) -> list[ItemOutcome]:
        """Prepare (under the deadline), settle the reservation to the exact tokens, queue, shape."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + wait
        abandoned = threading.Event()  # tells queued preparation tasks to skip their items
        chunks = [inputs[i : i + PREPARE_CHUNK] for i in range(0, len(inputs), PREPARE_CHUNK)]
        chars_before = self._tokenized_chars()
        try:
            prepared_chunks = await asyncio.gather(*(
                loop.run_in_executor(self._pool, self._prepare, chunk, policy, deadline, abandoned)
                for chunk in chunks
            ))
        except _Abandoned:
            raise DeadlineExceeded("the request timed out waiting for preparation") from None
        finally:
            abandoned.set()
            self.metrics.tokenizer_chars.inc(max(0, self._tokenized_chars() - chars_before))
        prepared = [p for chunk in prepared_chunks for p in chunk]
        to_run = [i for i, p in enumerate(prepared) if p.encoded is not None]
        ticket.settle(len(to_run), sum(prepared[i].encoded.length for i in to_run))  # type: ignore[union-attr]
        self._observe_admission()
        futures = self.batcher.submit(
            [prepared[i].encoded for i in to_run],  # type: ignore[misc]
            max(0.0, deadline - time.monotonic()),
        )
        answers: dict[int, ItemScore | BaseException] = {}
        if futures:
            # The batcher expires queued items only when its loop reaches them; a model
            # thread stuck in a forward would keep this request waiting for ever. Past
            # queueing time plus one full forward, answer 504 ourselves.
            patience = max(0.0, deadline - time.monotonic()) + self.settings.forward_timeout
            # asyncio.wait rather than wait_for(gather(...)): a gather cancelled by wait_for
            # ends with an exception nobody retrieves, logged as an error on every disconnect.
            try:
                _, late = await asyncio.wait(futures, timeout=patience)
            except asyncio.CancelledError:
                for future in futures:  # the caller went away: the batcher drops these
                    future.cancel()
                raise
            if late:
                for future in futures:
                    future.cancel()
                raise DeadlineExceeded("no answer within the request and forward timeouts")
            answers = {i: f.exception() or f.result() for i, f in zip(to_run, futures, strict=True)}
        for answer in answers.values():
            if isinstance(answer, BaseException) and not isinstance(answer, ItemFailed):
                raise answer
        outcomes = [self._outcome(p, answers.get(i), shaping) for i, p in enumerate(prepared)]
        for outcome in outcomes:
            self.metrics.items.labels(outcome.extraction.status.value).inc()
            if outcome.valid:
                self.metrics.reward.observe(outcome.reward)
            if outcome.forged:
                self.metrics.forged_items.inc()
        return outcomes

    def _tokenized_chars(self) -> int:
        """Characters the scorer's tokenizer has seen (HFScorer counts them; other scorers 0)."""
        layout = getattr(self.scorer, "layout", None)
        return int(getattr(layout, "tokenized_chars", 0))

    def _prepare(
        self, chunk: Sequence[ItemInput], policy: str, deadline: float, abandoned: threading.Event
    ) -> list[_Prepared]:
        """Runs on a worker thread: extraction, then the model's exact tokenization.

        Checked before each item: past the request's deadline, or once the request has
        been given up, nothing more is done for it (the pool never works for nobody).
        """
        prepared = []
        for item in chunk:
            if abandoned.is_set() or time.monotonic() > deadline:
                raise _Abandoned
            found = extract(item.response, policy, item.language or self.settings.language)
            if not found.valid or found.code is None:
                prepared.append(_Prepared(found, None, found.status.value))
                continue
            try:
                prepared.append(_Prepared(found, self.scorer.encode(item.problem, found.code), None))
            except TooLong:
                prepared.append(_Prepared(found, None, "too_long"))
        return prepared

    def _outcome(self, prepared: _Prepared, answer: ItemScore | BaseException | None, shaping: str) -> ItemOutcome:
        """Shape one answer into an outcome; per-item failures keep the invalid reward."""
        encoded = prepared.encoded
        tokens = encoded.length if encoded else 0
        truncated = encoded.truncated if encoded else False
        forged = encoded.forged if encoded else False
        invalid = shape(None, False, shaping, self.settings.invalid_reward)
        error = prepared.error
        if isinstance(answer, ItemFailed):
            error = answer.reason
        elif isinstance(answer, ItemScore):
            if math.isfinite(answer.score):
                reward = shape(answer.score, True, shaping, self.settings.invalid_reward)
                return ItemOutcome(reward, answer.score, True, prepared.extraction, truncated, tokens, None,
                                   answer.queue_s, answer.inference_s, forged)
            error = "non_finite_score"
        return ItemOutcome(invalid, None, False, prepared.extraction, truncated, tokens, error, forged=forged)
