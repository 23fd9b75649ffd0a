"""The dynamic batcher: the one owner of the queue, feeding the one model thread.

Algorithm, per batch:
1. Wait for the first queued item.
2. Keep collecting until the queue holds a full batch (``max_batch_tokens`` of cost as
   the scorer counts it, or ``max_batch_items``) or ``max_wait`` has passed since the
   oldest item came.
3. Drop what must not run, here and nowhere else: items whose caller went away
   (cancelled future) and items past their deadline (DeadlineExceeded).
4. Take the oldest item (nobody starves), then the queued items of the same problem,
   then those nearest to it in length, while the batch's cost stays within the token
   budget. The cost is the scorer's (``Scorer.batch_cost``): a packed runner counts a
   shared problem prefix once (and not at all when cached), a padded one items x longest.
5. On the model thread: items identical to another of the batch, or found in the
   result cache, are answered without running them; the rest are scored. Out of
   memory -> the scorer has freed the failed forward; split in halves and retry
   (outside the exception handler); a single item that still fails gets a per-item
   ``out_of_memory``. Any other exception fails every item of this batch (never hangs
   one) and the loop goes on.

A full queue refuses new items at once (Overloaded -> 503 + Retry-After): waiting
is bounded, memory is bounded.

No silent death: however the loop ends (a bug, cancellation by ``stop``), its
done-callback logs why and answers every queued item and the batch in a forward with
NotReady (503 + Retry-After) at once; ``healthy`` turns False, so /ready says 503.
A forward still running then is abandoned on its thread (its answers are discarded).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from models.base import BatchStats, EncodedItem, OutOfMemory, Scorer
from service.errors import DeadlineExceeded, ItemFailed, NotReady, Overloaded, ScoringFailed
from service.metrics import Metrics
from service.results import ResultCache, digest

log = logging.getLogger("codescaler.batcher")


@dataclass(frozen=True, slots=True)
class ItemScore:
    """The model's answer for one item, with where its time went."""

    score: float
    queue_s: float
    inference_s: float


@dataclass(eq=False, slots=True)
class _Pending:
    item: EncodedItem
    future: asyncio.Future[ItemScore]
    enqueued: float
    deadline: float
    problem: tuple[int, ...] = field(default=())  # the item's problem key (models/prefix.py)


class Batcher:
    """Turns concurrently submitted items into batches for ``scorer.score``."""

    def __init__(
        self,
        scorer: Scorer,
        metrics: Metrics,
        *,
        max_batch_tokens: int,
        max_batch_items: int,
        max_wait_ms: float,
        max_queue_items: int,
        forward_timeout: float = math.inf,
        result_cache_items: int = 0,
    ) -> None:
        self.scorer = scorer
        self.metrics = metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_items = max_queue_items
        self.forward_timeout = forward_timeout
        self.results = ResultCache(result_cache_items)  # touched by the model thread only
        self.forwards = 0  # batches run so far (tests prove coalescing with it)
        self._queue: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="codescaler-model")
        self._task: asyncio.Task[None] | None = None
        self._forward_since: float | None = None
        self._in_flight: list[_Pending] = []  # the batch in a forward (answered if the loop ends)
        self.stopped_because: str | None = None  # why the loop ended (None while it runs)

    # ------------------------------------------------------------------ state
    @property
    def queued(self) -> int:
        """Items waiting for a forward pass."""
        return len(self._queue)

    @property
    def healthy(self) -> bool:
        """The loop runs and no forward has been stuck past ``forward_timeout``."""
        if self._task is None or self._task.done():
            return False
        since = self._forward_since
        return since is None or time.monotonic() - since <= self.forward_timeout

    def start(self) -> None:
        """Start the batch loop on the running event loop."""
        self.stopped_because = None
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="codescaler-batcher")
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """Done-callback of the loop task: say why, and answer everything it held (503 + Retry-After)."""
        if task.cancelled():
            self.stopped_because = "stopped"
            log.info("batch loop stopped; answering %d queued and %d in-flight items with 503",
                     len(self._queue), len(self._in_flight))
        else:
            exc = task.exception()
            self.stopped_because = f"died: {type(exc).__name__}" if exc else "ended"
            log.critical("batch loop %s; answering %d queued and %d in-flight items with 503; /ready is 503",
                         self.stopped_because, len(self._queue), len(self._in_flight), exc_info=exc)
        gone = NotReady("the scoring loop is not running; retry (another replica)",
                        headers={"Retry-After": str(max(1, math.ceil(self.max_wait + 1)))})
        for pending in [*self._in_flight, *self._queue]:
            if not pending.future.done():
                pending.future.set_exception(gone)
        self._in_flight = []
        self._queue = []
        self.metrics.queue_items.set(0)

    async def stop(self) -> None:
        """Stop the loop; every queued and in-flight item is answered with NotReady (not lost).

        The model thread is not waited for: a forward stuck in it must not hold up shutdown.
        """
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - already logged and answered by _loop_ended
                pass
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------- submit
    def submit(self, items: Sequence[EncodedItem], timeout: float) -> list[asyncio.Future[ItemScore]]:
        """Queue ``items`` (all or none) and return one future per item, in order."""
        if self._task is None or self._task.done():
            raise NotReady("the batch loop is not running", headers={"Retry-After": "1"})
        if len(self._queue) + len(items) > self.max_queue_items:
            retry = max(1, math.ceil(self.max_wait + 1))
            raise Overloaded("the queue is full; retry later", headers={"Retry-After": str(retry)})
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures = []
        for item in items:
            future: asyncio.Future[ItemScore] = loop.create_future()
            self._queue.append(_Pending(item, future, now, now + timeout, item.input_ids[: item.prefix_len]))
            futures.append(future)
        self.metrics.queue_items.set(len(self._queue))
        self._arrived.set()
        return futures

    # ------------------------------------------------------------------- loop
    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._fill()
            batch = self._take()
            if batch:
                self._in_flight = batch
                await self._run(batch)
                self._in_flight = []

    async def _fill(self) -> None:
        """Wait until a batch is full or the oldest item has waited ``max_wait``."""
        while True:
            remaining = self._queue[0].enqueued + self.max_wait - time.monotonic()
            if remaining <= 0 or self._queue_holds_a_batch():
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _queue_holds_a_batch(self) -> bool:
        """Whether the queued items already fill the item count or the token budget."""
        if len(self._queue) >= self.max_batch_items:
            return True
        cost = self.scorer.batch_cost()
        for pending in self._queue:
            if cost.cost_with(pending.item) >= self.max_batch_tokens:
                return True
            cost.add(pending.item)
        return False

    def _take(self) -> list[_Pending]:
        """Drop cancelled and expired items, then choose the next batch (steps 3-4)."""
        now = time.monotonic()
        live: list[_Pending] = []
        for pending in self._queue:
            if pending.future.done():
                continue
            if now > pending.deadline:
                pending.future.set_exception(DeadlineExceeded("the request timed out waiting in the queue"))
                continue
            live.append(pending)
        if not live:
            self._queue = []
            self.metrics.queue_items.set(0)
            return []
        first, rest = live[0], live[1:]
        rest.sort(key=lambda p: (p.problem != first.problem, abs(p.item.length - first.item.length), p.enqueued))
        chosen, cost = [first], self.scorer.batch_cost()
        cost.add(first.item)
        for pending in rest:
            if len(chosen) >= self.max_batch_items:
                break
            if cost.cost_with(pending.item) <= self.max_batch_tokens:
                cost.add(pending.item)
                chosen.append(pending)
        taken = set(map(id, chosen))
        self._queue = [p for p in live if id(p) not in taken]
        self.metrics.queue_items.set(len(self._queue))
        return chosen

    async def _run(self, batch: list[_Pending]) -> None:
        """Score ``batch`` on the model thread and answer every item exactly once."""
        start = time.monotonic()
        self._forward_since = start
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._model_thread, self._score_all, [p.item for p in batch]
            )
        except Exception as exc:  # noqa: BLE001 - any model failure fails this batch only
            log.exception("forward of %d items failed", len(batch))
            failure = ScoringFailed("scoring failed")
            failure.__cause__ = exc
            outcomes = [failure] * len(batch)
        finally:
            self._forward_since = None
        self.forwards += 1
        elapsed = time.monotonic() - start
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(ItemScore(outcome, start - pending.enqueued, elapsed))

    def _score_all(self, items: list[EncodedItem]) -> list[float | ItemFailed]:
        """Runs on the model thread: each distinct input scored once, known ones from the result cache."""
        outcomes: list[float | ItemFailed | None] = [None] * len(items)
        todo: dict[bytes, list[int]] = {}
        from_cache = 0
        for i, item in enumerate(items):
            key = digest(item.input_ids)
            known = self.results.get(key) if key not in todo else None
            if known is not None:
                outcomes[i] = known
                from_cache += 1
            else:
                todo.setdefault(key, []).append(i)
        duplicates = len(items) - from_cache - len(todo)
        if from_cache:
            self.metrics.results_reused.labels("cache").inc(from_cache)
        if duplicates:
            self.metrics.results_reused.labels("batch").inc(duplicates)
        scores = self._score_halving([items[where[0]] for where in todo.values()]) if todo else []
        for (key, where), score in zip(todo.items(), scores, strict=True):
            for i in where:
                outcomes[i] = score
            if isinstance(score, float) and math.isfinite(score):
                self.results.put(key, score)
        return outcomes  # type: ignore[return-value]

    def _score_halving(self, items: list[EncodedItem]) -> list[float | ItemFailed]:
        """Score ``items``; on out of memory retry in halves, down to a per-item failure (step 5).

        The retry runs after the handler has ended, so nothing of the failed attempt
        (its traceback and the tensors it references) is alive while the halves run.
        """
        started = time.perf_counter()
        try:
            scores, stats = self.scorer.score_with_stats(items)
        except OutOfMemory:
            pass
        else:
            self._observe(items, stats, time.perf_counter() - started)
            return [float(s) for s in scores]
        if len(items) == 1:
            log.warning("one item of %d tokens ran out of memory", items[0].length)
            return [ItemFailed("out_of_memory")]
        log.warning("out of memory on %d items; retrying in halves", len(items))
        half = len(items) // 2
        return self._score_halving(items[:half]) + self._score_halving(items[half:])

    def _observe(self, items: list[EncodedItem], stats: BatchStats | None, seconds: float) -> None:
        """Batch metrics: what the scorer reports it computed, else the plain padded layout."""
        m = self.metrics
        tokens = stats.tokens if stats else sum(i.length for i in items)
        ratio = stats.padding_ratio if stats else 1.0 - tokens / (len(items) * max(i.length for i in items))
        m.batch_items.observe(len(items))
        m.batch_tokens.observe(tokens)
        m.batch_padding_ratio.observe(ratio)
        m.forward_duration.observe(seconds)
        m.tokens.inc(tokens)
