"""The app factory: create_app(settings, scorer=None) wires routes, middleware and lifespan.

The lifespan loads (unless a scorer is given), warms up and starts the engine in
the background, so /health answers at once (status ``loading``) and /ready turns
200 only when the model can really score. No globals: every app has its own state and registry.
``drain`` is the app's side of a graceful shutdown (the CLI calls it on SIGTERM).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry

from models.base import ModelLoadError, Scorer
from service import api, compat, protocols
from service.auth import KeyCheck, key_digests, load_keys, require_key, require_metrics_key
from service.engine import Engine
from service.errors import install_handlers
from service.metrics import Metrics
from service.middleware import ActiveLimitMiddleware, BodyLimitMiddleware, ObserveMiddleware
from service.settings import Settings

log = logging.getLogger("codescaler.app")
#: After the drain, how long requests still in transit keep getting 503 before the server stops.
LINGER_SECONDS = 1.0
#: Every router of the app: their paths label the metrics, their key guards feed KeyCheck.
ROUTERS = (api.router, compat.router, protocols.router)


def load_scorer(settings: Settings) -> Scorer:
    """The transformers runner configured by ``settings`` (imports torch only here)."""
    from models.hf import HFScorer

    return HFScorer(
        settings.model, revision=settings.revision, dtype=settings.dtype, device=settings.device,
        attn_implementation=settings.attn_implementation, max_length=settings.max_length,
        cache_dir=settings.model_cache_dir, prefix_reuse=settings.prefix_reuse,
        max_batch_tokens=settings.max_batch_tokens, max_batch_items=settings.max_batch_items,
        max_padding=settings.max_padding, prefix_cache_bytes=settings.prefix_cache_bytes,
        chunk_tokens=settings.chunk_tokens, kernel=settings.attention_kernel,
    )


async def _bring_up(app: FastAPI, settings: Settings, scorer: Scorer | None, metrics: Metrics) -> None:
    """Load, warm up and start; the engine appears on app.state only when it can score."""
    try:
        if scorer is None:
            log.info("loading %s (the port is bound: /health says loading, /ready 503)", settings.model)
            scorer = await _in_daemon_thread(load_scorer, settings)
        engine = Engine(scorer, settings, metrics)
        await engine.start()
        app.state.engine = engine
        log.info("ready: %s", scorer.name)
    except ModelLoadError as exc:  # a known reason, in one line
        app.state.load_error = exc
        log.error("the model could not be loaded: %s", exc)
    except Exception as exc:  # noqa: BLE001 - reported by /ready and the log, never to clients
        app.state.load_error = exc
        log.exception("the model could not be brought up")


async def _in_daemon_thread(load: Callable[[Settings], Scorer], settings: Settings) -> Scorer:
    """``load(settings)`` on a daemon thread: a SIGTERM during a long download must not wait for it
    (asyncio.to_thread's threads are joined when the event loop closes)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Scorer] = loop.create_future()

    def deliver(result: Scorer | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = load(settings), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:  # the loop has closed: the server is gone
            pass

    threading.Thread(target=work, name="codescaler-load", daemon=True).start()
    return await done


def create_app(
    settings: Settings, scorer: Scorer | None = None, registry: CollectorRegistry | None = None,
    behind_proxy: bool = False,
) -> FastAPI:
    """A fresh app serving ``scorer`` (or the model named in ``settings``).

    ``behind_proxy``: requests come from a proxy that has read their bodies (a Ray Serve
    replica); a body lost on the way is answered 503 (retryable), not 408.
    """
    metrics = Metrics(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bring_up = asyncio.create_task(_bring_up(app, settings, scorer, metrics))
        app.state.bring_up = bring_up
        try:
            yield
        finally:
            bring_up.cancel()
            engine: Engine | None = app.state.engine
            if engine is not None:
                await engine.stop()

    app = FastAPI(title="CodeScaler Serve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = None
    app.state.key_digests = key_digests(load_keys(settings))
    app.state.draining = False  # /ready answers 503 (load balancers stop sending)
    app.state.refusing = False  # scoring routes answer 503 + Retry-After
    app.state.in_flight = 0  # scoring requests admitted and not yet answered
    app.state.load_error = None
    install_handlers(app)
    app.include_router(api.router)
    app.include_router(compat.router)
    app.include_router(protocols.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    # Added innermost first: Observe -> KeyCheck -> ActiveLimit -> BodyLimit -> (CORS) -> routes.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, read_timeout=settings.body_read_timeout,
                       behind_proxy=behind_proxy)
    app.add_middleware(ActiveLimitMiddleware, limit=settings.max_active_requests,
                       exempt=frozenset({"/health", "/ready"}))
    app.add_middleware(KeyCheck, digests=app.state.key_digests, protected=_keyed_paths(settings))
    endpoints = {path for router in ROUTERS for route in router.routes
                 if isinstance(path := getattr(route, "path", None), str)}
    app.add_middleware(ObserveMiddleware, metrics=metrics, endpoints=endpoints)
    return app


def _keyed_paths(settings: Settings) -> frozenset[str]:
    """Paths whose routes require a key: the middleware checks them before reading a body."""
    guards = {require_key} if settings.metrics_public else {require_key, require_metrics_key}
    return frozenset(route.path for router in ROUTERS for route in router.routes
                     if any(dep.dependency in guards for dep in getattr(route, "dependencies", [])))


async def wait_until_ready(app: FastAPI) -> None:
    """For tests and the offline CLI: wait for bring-up; raise what made it fail."""
    await app.state.bring_up
    if app.state.load_error is not None:
        raise app.state.load_error


async def drain(app: FastAPI, accept_seconds: float, patience: float) -> None:
    """Graceful drain: /ready 503 now, scoring accepted ``accept_seconds`` more, then refused (503).

    Returns once every admitted scoring request is answered, or after ``patience``
    seconds of waiting for them (the engine answers each within request_timeout +
    forward_timeout, so only a model thread stuck for good runs into this), and then
    another ``min(accept_seconds, LINGER_SECONDS)`` of refusing: a request already on its
    way over a keep-alive connection gets its 503 (which closes that connection) instead
    of a reset when the server stops.
    """
    app.state.draining = True
    log.info("draining: /ready is 503; scoring requests accepted for %.1f s more", accept_seconds)
    await asyncio.sleep(accept_seconds)
    app.state.refusing = True
    log.info("draining: new scoring requests get 503; waiting for %d admitted", app.state.in_flight)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + patience
    while app.state.in_flight and loop.time() < give_up:
        await asyncio.sleep(0.05)
    if app.state.in_flight:
        log.error("draining: %d requests still unanswered after %.0f s; exiting anyway",
                  app.state.in_flight, patience)
    else:
        log.info("draining: every admitted request was answered")
    await asyncio.sleep(min(accept_seconds, LINGER_SECONDS))
