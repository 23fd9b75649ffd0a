"""Admission: a request reserves its items and tokens before any work is done for it.

A reservation covers a request from admission (before extraction and tokenization)
until its answer, so the preparation pool, the batch queue and the forward together
never hold more than ``max_items`` items and ``max_tokens`` tokens. Tokens are
estimated from characters at admission (no tokenizer has run yet) and replaced by the
exact count once the items are tokenized (``Ticket.settle``).

Fairness rule (one waiting seat, for the largest):
- A request that fits is admitted at once, unless the seat is taken.
- A request that does not fit takes the seat if it is free, or if it is larger (in
  estimated tokens, then items) than the request holding it, which then gets 503.
  Anyone else gets 503 + Retry-After at once.
- While the seat is taken nobody is admitted: work finishing frees capacity for the
  seated request only, which is admitted as soon as it fits, or gets 503 at its deadline.
So a stream of small requests cannot starve a large one: the large one's first try takes
the seat, and from then on it waits at most for the work admitted before it.

A request estimated at more tokens than ``max_tokens`` (the estimate over-counts code) is
admitted alone: it fits only an idle server, through the seat like any large request.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from service.errors import Overloaded, PayloadTooLarge

#: Characters per token assumed before tokenization. Code and English run at 3-4 on the
#: Qwen tokenizer; 3 over-reserves a little, which refuses early rather than overcommits.
CHARS_PER_TOKEN = 3


def estimate_tokens(chars: int, max_length: int) -> int:
    """Tokens one item may take, from its characters (the model reads at most ``max_length``)."""
    return min(max_length, math.ceil(chars / CHARS_PER_TOKEN) + 16)  # 16: the template's own tokens


@dataclass(eq=False, slots=True)
class Ticket:
    """One admitted request's reservation; ``release`` gives it back (a second call does nothing)."""

    admission: Admission
    items: int
    tokens: int
    released: bool = field(default=False)

    def settle(self, items: int, tokens: int) -> None:
        """Replace the estimate by the exact need (items the model will run, their tokens)."""
        if not self.released:
            self.admission._adjust(items - self.items, tokens - self.tokens)
            self.items, self.tokens = items, tokens

    def release(self) -> None:
        """Give the reservation back (idempotent)."""
        if not self.released:
            self.released = True
            self.admission._adjust(-self.items, -self.tokens)


@dataclass(eq=False, slots=True)
class _Seat:
    items: int
    tokens: int
    granted: asyncio.Future[None]


class Admission:
    """Item and token reservations on the event loop (single-threaded: no locks)."""

    def __init__(self, max_items: int, max_tokens: int, retry_after: int = 1) -> None:
        self.max_items = max_items
        self.max_tokens = max_tokens
        self.retry_after = retry_after
        self.items = 0
        self.tokens = 0
        self._seat: _Seat | None = None

    def _fits(self, items: int, tokens: int) -> bool:
        if self.items + items > self.max_items:
            return False
        return self.tokens + tokens <= self.max_tokens or self.items == 0  # an oversize one alone

    def _overloaded(self) -> Overloaded:
        return Overloaded("the server is at capacity; retry later", headers={"Retry-After": str(self.retry_after)})

    async def admit(self, items: int, tokens: int, timeout: float) -> Ticket:
        """A reservation for ``items`` items of ``tokens`` estimated tokens, or Overloaded (503).

        PayloadTooLarge (413) for more items than the server ever holds.
        """
        if items > self.max_items:
            raise PayloadTooLarge(f"the request has {items} items; this server holds at most {self.max_items}")
        if self._seat is None and self._fits(items, tokens):
            return self._grant(items, tokens)
        seat = self._seat
        if seat is not None and (tokens, items) <= (seat.tokens, seat.items):
            raise self._overloaded()
        if seat is not None:
            seat.granted.set_exception(self._overloaded())  # a larger request takes the seat
        self._seat = mine = _Seat(items, tokens, asyncio.get_running_loop().create_future())
        try:
            await asyncio.wait_for(asyncio.shield(mine.granted), timeout)
        except BaseException as exc:  # timed out, displaced, or the client went away
            if self._seat is mine:
                self._seat = None
            granted = mine.granted
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self._adjust(-items, -tokens)  # granted in the same instant: give it back
            elif not granted.done():
                granted.cancel()
            if isinstance(exc, TimeoutError):
                raise self._overloaded() from None
            raise
        return Ticket(self, items, tokens)

    def _grant(self, items: int, tokens: int) -> Ticket:
        self.items += items
        self.tokens += tokens
        return Ticket(self, items, tokens)

    def _adjust(self, items: int, tokens: int) -> None:
        """Change the reserved totals; on a decrease, seat the waiting request if it now fits."""
        self.items += items
        self.tokens += tokens
        seat = self._seat
        if seat is not None and not seat.granted.done() and self._fits(seat.items, seat.tokens):
            self.items += seat.items
            self.tokens += seat.tokens
            self._seat = None
            seat.granted.set_result(None)

