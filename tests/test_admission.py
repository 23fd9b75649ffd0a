"""Admission (unit tier, no torch): reservations, the token estimate, and the fairness rule."""

from __future__ import annotations

import asyncio

import pytest

from service.admission import CHARS_PER_TOKEN, Admission, estimate_tokens
from service.errors import Overloaded, PayloadTooLarge


async def settle() -> None:
    """Let every task that can run, run."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_estimate_is_characters_over_three_capped_at_max_length() -> None:
    assert estimate_tokens(3000, 4096) == 3000 // CHARS_PER_TOKEN + 16
    assert estimate_tokens(10**6, 4096) == 4096


async def test_reservations_add_up_and_release_gives_back() -> None:
    admission = Admission(max_items=10, max_tokens=100)
    a = await admission.admit(4, 40, timeout=1)
    b = await admission.admit(6, 60, timeout=1)
    assert (admission.items, admission.tokens) == (10, 100)
    a.settle(2, 15)  # tokenized: two valid items of 15 tokens in all
    assert (admission.items, admission.tokens) == (8, 75)
    a.release()
    a.release()  # idempotent
    b.release()
    assert (admission.items, admission.tokens) == (0, 0)


async def test_more_items_than_the_server_ever_holds_is_413_not_503() -> None:
    with pytest.raises(PayloadTooLarge):
        await Admission(max_items=10, max_tokens=100).admit(11, 1, timeout=1)


async def test_more_tokens_than_the_bound_are_admitted_alone_once_the_server_is_idle() -> None:
    admission = Admission(max_items=10, max_tokens=100)
    small = await admission.admit(1, 10, timeout=1)
    oversize = asyncio.create_task(admission.admit(2, 500, timeout=30))
    await settle()
    assert not oversize.done()
    with pytest.raises(Overloaded):
        await admission.admit(1, 1, timeout=0.01)  # nobody joins it
    small.release()
    assert (await oversize).tokens == 500 and admission.tokens == 500


async def test_a_full_server_refuses_at_once_when_the_seat_is_taken() -> None:
    admission = Admission(max_items=10, max_tokens=1000)
    held = await admission.admit(10, 100, timeout=1)
    seated = asyncio.create_task(admission.admit(5, 50, timeout=30))
    await settle()
    with pytest.raises(Overloaded) as refused:
        await admission.admit(1, 1, timeout=30)  # smaller than the seated one: no wait at all
    assert refused.value.headers["Retry-After"] == "1"
    held.release()
    ticket = await seated
    assert ticket.items == 5 and admission.items == 5


async def test_small_requests_cannot_starve_a_large_one() -> None:
    """Without the seat, each small request would fit into what the last one freed, for ever."""
    admission = Admission(max_items=10, max_tokens=1000)
    smalls = [await admission.admit(1, 10, timeout=1) for _ in range(8)]  # 8 of 10 items in use
    large = asyncio.create_task(admission.admit(6, 60, timeout=30))
    await settle()
    assert not large.done()
    refused = 0
    for small in smalls:  # a stream: one finishes, a new small one arrives that would fit
        small.release()
        try:
            smalls.append(await admission.admit(1, 10, timeout=0.01))
        except Overloaded:
            refused += 1
        if large.done():
            break
    assert large.done() and (await large).items == 6
    assert refused >= 4  # the small ones that arrived while the large one was seated


async def test_a_larger_request_takes_the_seat_and_the_smaller_one_gets_503() -> None:
    admission = Admission(max_items=10, max_tokens=1000)
    held = await admission.admit(10, 100, timeout=1)
    first = asyncio.create_task(admission.admit(3, 30, timeout=30))
    await settle()
    equal = asyncio.create_task(admission.admit(3, 30, timeout=30))
    await settle()
    assert equal.done() and isinstance(equal.exception(), Overloaded)  # ties keep arrival order
    larger = asyncio.create_task(admission.admit(4, 40, timeout=30))
    await settle()
    assert first.done() and isinstance(first.exception(), Overloaded)
    held.release()
    assert (await larger).items == 4 and admission.items == 4


async def test_a_seated_request_gets_503_at_its_deadline_and_frees_the_seat() -> None:
    admission = Admission(max_items=10, max_tokens=1000)
    held = await admission.admit(10, 100, timeout=1)
    with pytest.raises(Overloaded):
        await admission.admit(5, 50, timeout=0.01)
    held.release()
    assert (await admission.admit(1, 1, timeout=1)).items == 1  # the seat is free again
    assert admission.items == 1


async def test_a_seated_request_that_goes_away_frees_the_seat_and_reserves_nothing() -> None:
    admission = Admission(max_items=10, max_tokens=1000)
    held = await admission.admit(10, 100, timeout=1)
    seated = asyncio.create_task(admission.admit(5, 50, timeout=30))
    await settle()
    seated.cancel()
    await settle()
    held.release()
    assert (admission.items, admission.tokens) == (0, 0)
    assert (await admission.admit(10, 100, timeout=1)).items == 10


async def test_tokens_bound_like_items() -> None:
    admission = Admission(max_items=100, max_tokens=100)
    await admission.admit(1, 90, timeout=1)
    seated = asyncio.create_task(admission.admit(1, 20, timeout=0.05))
    with pytest.raises(Overloaded):
        await seated
