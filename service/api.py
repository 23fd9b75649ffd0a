"""Native routes: /v1/score, /v1/rank, /v1/models, /health, /ready, /metrics.

Routes check the configurable limits before any work, hand items to the Engine,
and turn outcomes into the documented response shapes with timing headers.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.engine import Engine, ItemInput, ItemOutcome
from service.errors import NotReady, PayloadTooLarge, error_body
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

router = APIRouter()
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (401, 413, 422, 500, 503, 504)
}


def engine_of(request: Request) -> Engine:
    """The app's engine; 503 while the model is still loading."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise NotReady("the model is still loading")
    return engine


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
            truncated=o.truncated, tokens=o.tokens, error=o.error,
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


@router.post("/v1/score", response_model=ScoreResponse, responses=ERRORS)
async def score(body: ScoreRequest, request: Request, response: Response) -> ScoreResponse:
    """Score (problem, response) pairs; results in input order."""
    settings: Settings = request.app.state.settings
    check_item_limits(settings, len(body.items), [
        (f"items[{i}].{name}", getattr(item, name))
        for i, item in enumerate(body.items) for name in ("problem", "response")
    ])
    engine = engine_of(request)
    inputs = [ItemInput(item.problem, item.response, item.language) for item in body.items]
    outcomes = await engine.score(inputs, extraction=body.extraction, shaping=body.shaping)
    set_timing_headers(response, outcomes)
    return ScoreResponse(model=engine.scorer.name, results=results_of(outcomes, body.return_code),
                         usage=usage_of(outcomes))


@router.post("/v1/rank", response_model=RankResponse, responses=ERRORS)
async def rank(body: RankRequest, request: Request, response: Response) -> RankResponse:
    """Rank N responses to one problem by reward, highest first, ties by index."""
    settings: Settings = request.app.state.settings
    check_item_limits(settings, len(body.responses), [("problem", body.problem)] + [
        (f"responses[{i}]", text) for i, text in enumerate(body.responses)
    ])
    engine = engine_of(request)
    inputs = [ItemInput(body.problem, text, body.language) for text in body.responses]
    outcomes = await engine.score(inputs, extraction=body.extraction, shaping=body.shaping)
    ranking = sorted(range(len(outcomes)), key=lambda i: (-outcomes[i].reward, i))
    if body.top_k is not None:
        ranking = ranking[: body.top_k]
    set_timing_headers(response, outcomes)
    return RankResponse(model=engine.scorer.name, best=ranking[0], ranking=ranking,
                        results=results_of(outcomes, body.return_code), usage=usage_of(outcomes))


@router.get("/v1/models")
async def models(request: Request) -> dict[str, object]:
    """The served model: id, revision, dtype, device, max_length, chat-template hash."""
    engine = engine_of(request)
    return {"object": "list", "data": [engine.scorer.info()]}


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive (says nothing about the model)."""
    return {"status": "ok"}


@router.get("/ready")
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


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format of this app's registry."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
