"""Native routes: /v1/score, /v1/rank, /v1/models, /health, /ready, /metrics.

Routes check the key and the configurable limits before any work, hand items to
the Engine (unless a drain has closed the door, or the client has gone away), and
turn outcomes into the documented response shapes with timing headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.auth import require_key, require_metrics_key
from service.engine import Engine, ItemInput, ItemOutcome
from service.errors import ClientDisconnected, NotReady, PayloadTooLarge, error_body
from service.schemas import (
    ErrorResponse,
    ExtractionInfo,
    ItemResult,
    RankRequest,
    RankResponse,
    ScoreRequest,
    ScoreResponse,
    Usage,
)
from service.settings import Settings
from service.shaping import ranking

router = APIRouter()
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 500, 503, 504)
}
#: Every route that scores or describes the model needs a key (when keys are configured).
KEYED = [Depends(require_key)]


def engine_of(request: Request) -> Engine:
    """The app's engine; 503 while the model is still loading."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise NotReady("the model is still loading", headers={"Retry-After": "5"})
    return engine


async def score_items(
    request: Request, response: Response, inputs: Sequence[ItemInput], **options: str | None
) -> list[ItemOutcome]:
    """Admit the request (503 once a drain refuses work), score it, and withdraw it if the client leaves.

    uvicorn does not cancel a handler whose client disconnected, so the engine call is
    raced against the connection: on a disconnect it is cancelled, the engine cancels
    its futures and the batcher drops those items before they reach a forward. While
    draining, answers close their connection, so that a client's next request opens a
    new one (which the load balancer sends elsewhere) instead of racing the shutdown.
    """
    state = request.app.state
    if state.refusing:
        raise NotReady("the server is shutting down; retry (another replica)",
                       headers={"Retry-After": "1", "Connection": "close"})
    engine = engine_of(request)
    state.in_flight += 1  # no await since the check above: a drain cannot miss this request
    try:
        work = asyncio.ensure_future(engine.score(inputs, **options))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler itself is cancelled
            gone.cancel()
            if not work.done():
                work.cancel()
                await asyncio.wait((work,))  # let the engine withdraw its items before we answer
        if work.cancelled():
            raise ClientDisconnected("the client disconnected")
        if state.draining:
            response.headers["Connection"] = "close"
        return work.result()
    finally:
        state.in_flight -= 1


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read; only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_item_limits(settings: Settings, count: int, fields: Sequence[tuple[str, str]]) -> None:
    """Items per request and characters per field, before any extraction or tokenization (413)."""
    if count > settings.max_items_per_request:
        raise PayloadTooLarge(
            f"{count} items in one request; the limit is {settings.max_items_per_request}"
        )
    limit = settings.max_chars_per_field
    for where, text in fields:
        if len(text) > limit:
            raise PayloadTooLarge(f"{where} has {len(text)} characters; the limit is {limit}")


def results_of(outcomes: Sequence[ItemOutcome], return_code: bool) -> list[ItemResult]:
    """The public shape of outcomes, in input order."""
    return [
        ItemResult(
            index=i, reward=o.reward, score=o.score, valid=o.valid,
            extraction=ExtractionInfo(
                status=o.extraction.status.value, language=o.extraction.language,
                code=o.extraction.code if return_code else None,
            ),
            truncated=o.truncated, tokens=o.tokens, error=o.error, forged=o.forged,
        )
        for i, o in enumerate(outcomes)
    ]


def usage_of(outcomes: Sequence[ItemOutcome]) -> Usage:
    """Items, items the model ran on, and their tokens."""
    scored = [o for o in outcomes if o.score is not None]
    return Usage(items=len(outcomes), scored=len(scored), tokens=sum(o.tokens for o in scored))


def set_timing_headers(response: Response, outcomes: Sequence[ItemOutcome]) -> None:
    """x-queue-time and x-inference-time in milliseconds (the slowest item of the request)."""
    response.headers["x-queue-time"] = f"{max((o.queue_s for o in outcomes), default=0.0) * 1000:.1f}"
    response.headers["x-inference-time"] = f"{max((o.inference_s for o in outcomes), default=0.0) * 1000:.1f}"


@router.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, dependencies=KEYED)
async def score(body: ScoreRequest, request: Request, response: Response) -> ScoreResponse:
    """Score (problem, response) pairs; results in input order."""
    settings: Settings = request.app.state.settings
    check_item_limits(settings, len(body.items), [
        (f"items[{i}].{name}", getattr(item, name))
        for i, item in enumerate(body.items) for name in ("problem", "response")
    ])
    engine = engine_of(request)
    inputs = [ItemInput(item.problem, item.response, item.language) for item in body.items]
    outcomes = await score_items(request, response, inputs, extraction=body.extraction, shaping=body.shaping)
    set_timing_headers(response, outcomes)
    return ScoreResponse(model=engine.scorer.name, results=results_of(outcomes, body.return_code),
                         usage=usage_of(outcomes))


@router.post("/v1/rank", response_model=RankResponse, responses=ERRORS, dependencies=KEYED)
async def rank(body: RankRequest, request: Request, response: Response) -> RankResponse:
    """Rank N responses to one problem by reward, highest first, ties by index."""
    settings: Settings = request.app.state.settings
    check_item_limits(settings, len(body.responses), [("problem", body.problem)] + [
        (f"responses[{i}]", text) for i, text in enumerate(body.responses)
    ])
    engine = engine_of(request)
    inputs = [ItemInput(body.problem, text, body.language) for text in body.responses]
    outcomes = await score_items(request, response, inputs, extraction=body.extraction, shaping=body.shaping)
    order = ranking([o.reward for o in outcomes])
    if body.top_k is not None:
        order = order[: body.top_k]
    set_timing_headers(response, outcomes)
    return RankResponse(model=engine.scorer.name, best=order[0], ranking=order,
                        results=results_of(outcomes, body.return_code), usage=usage_of(outcomes))


@router.get("/v1/models", responses={code: {"model": ErrorResponse} for code in (401, 503)},
            dependencies=KEYED)
async def models(request: Request) -> dict[str, object]:
    """The served model: id, revision, dtype, device, max_length, chat-template hash."""
    engine = engine_of(request)
    return {"object": "list", "data": [engine.scorer.info()]}


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """The process is alive: 200 while the model loads (``loading``) and after (``ok``); see /ready."""
    state = request.app.state
    if getattr(state, "engine", None) is None and getattr(state, "load_error", None) is None:
        return {"status": "loading"}
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse}})
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and warm and the batch loop is healthy; 503 otherwise."""
    state = request.app.state
    engine: Engine | None = getattr(state, "engine", None)
    if getattr(state, "draining", False):
        return JSONResponse(error_body("not_ready", "draining"), 503)
    if engine is None:
        return JSONResponse(error_body("not_ready", "loading"), 503)
    if not engine.healthy:
        return JSONResponse(error_body("not_ready", "the model thread is not healthy"), 503)
    return JSONResponse({"status": "ready", "queue_items": engine.batcher.queued})


@router.get("/metrics", response_class=Response, dependencies=[Depends(require_metrics_key)], responses={
    200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
    401: {"model": ErrorResponse}})
async def metrics(request: Request) -> Response:
    """Prometheus text format of this app's registry."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
