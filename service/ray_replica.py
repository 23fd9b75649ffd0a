"""One Ray Serve replica: the deployment class, its ASGI wrapper and its own metrics exporter.

Each replica runs ``create_app(settings)`` unchanged (same routes, engine, batcher,
metrics registry). ``service.ray_app`` decides how many replicas run and with what
resources; this module is what runs inside each of them.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from prometheus_client import Gauge, start_http_server
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from service.app import create_app, wait_until_ready
from service.cli import setup_logging
from service.middleware import ASGIApp, Message, Receive, Scope, Send
from service.settings import Settings

log = logging.getLogger("codescaler.ray")

DEPLOYMENT_NAME = "CodeScaler"
#: Names the replica that answered; its value is the replica's Ray actor name
#: (``SERVE_REPLICA::<app>#<deployment>#<id>``, namespace "serve"), so ``ray.get_actor`` finds it.
REPLICA_HEADER = "x-codescaler-replica"


class RayOptions(BaseModel):
    """The Ray-only knobs that Settings does not hold (builder args, ``--flags`` of the CLI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics_port: int = Field(
        0, ge=0, le=65535,
        description="First port of the per-replica Prometheus exporters: a replica serves its own "
        "registry on metrics_port + its rank on the node. 0 = no exporters. The exporters check no key, "
        "so with API keys they start only under metrics_public.",
    )
    replica_cpus: float = Field(
        1.0, gt=0, description="CPUs Ray reserves per replica (also its torch threads on a CPU replica)."
    )


class ReplicaApp:
    """ASGI wrapper of one replica's app: startup completes only when the model can score; headers name the replica.

    Serve runs the app's lifespan when the replica starts and routes to the replica as soon
    as that startup completes. create_app's lifespan loads the model in the background (so a
    single process answers /health at once); here the startup is held until bring-up is
    done, so no request ever meets a loading replica, and a model that cannot load fails
    the replica (Serve retries it) instead of serving 503s forever.
    """

    def __init__(self, app: FastAPI, replica: str) -> None:
        self.app = app
        self.replica = replica.encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Hold the lifespan startup; add the replica header to HTTP responses."""
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._held_startup(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Serve's proxy adds x-request-id to the request (the app echoes it) and again to the
        # response: drop the app's copy so the client sees the header once.
        proxy_id = dict(scope.get("headers") or []).get(b"x-request-id")

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if not (k.lower() == b"x-request-id" and v == proxy_id)]
                message["headers"] = [*headers, (REPLICA_HEADER.encode(), self.replica)]
            await send(message)

        await self.app(scope, receive, send_named)

    def _held_startup(self, send: Send) -> Send:
        """Forward lifespan messages; hold startup.complete until the engine is up, or fail it."""

        async def held(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    await wait_until_ready(self.app)
                except Exception:  # noqa: BLE001 - the bring-up already logged the traceback
                    message = {"type": "lifespan.startup.failed",
                               "message": "the model could not be brought up; see the replica log"}
            await send(message)

        return held


class _Exporter:
    """This replica's registry on its own port, so Prometheus scrapes each replica (not a random one)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.port = port
        self._server, self._thread = start_http_server(port, addr=host, registry=app.state.metrics.registry)

    def close(self) -> None:
        """Stop serving (the replica is going away)."""
        self._server.shutdown()
        self._server.server_close()


def start_exporter(app: FastAPI, settings: Settings, options: RayOptions, local_rank: int) -> _Exporter | None:
    """The replica's exporter on metrics_port + local_rank, or None (off, private metrics, port taken).

    The exporter checks no key, so with API keys it starts only when metrics_public is on
    (the same rule as /metrics). A port in use must not keep the replica from serving.
    """
    if not options.metrics_port:
        return None
    if settings.api_keys() and not settings.metrics_public:
        log.warning("no per-replica metrics exporter: API keys are set and metrics_public is off")
        return None
    port = options.metrics_port + local_rank
    try:
        return _Exporter(app, settings.host, port)
    except OSError as exc:
        log.warning("no per-replica metrics exporter on port %d (%s)", port, exc)
        return None


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class CodeScalerReplica:
    """One replica: its own app, engine, model and metrics registry."""

    # Attribute names carry a prefix: Serve mixes this class with its own ASGI wrapper,
    # which already owns names such as ``app``.
    def __init__(self, settings: Settings, options: RayOptions) -> None:
        setup_logging(settings)  # Ray owns the root handler here: only our loggers' level changes
        context = serve.get_replica_context()
        self.codescaler_replica = context.replica_id.to_full_id_str()
        self.codescaler_app = create_app(settings, behind_proxy=True)
        # Names the replica inside its own registry, so a scrape of an exporter says whose numbers they are.
        Gauge("codescaler_replica_info", "The Ray Serve replica this registry belongs to (always 1).", ["replica"],
              registry=self.codescaler_app.state.metrics.registry).labels(self.codescaler_replica).set(1)
        self.codescaler_exporter = start_exporter(self.codescaler_app, settings, options, context.rank.local_rank)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """The app Serve runs for this replica (lifespan included)."""
        return ReplicaApp(self.codescaler_app, self.codescaler_replica)

    def check_health(self) -> None:
        """Serve's periodic health check: what /ready says about the batch loop and model thread.

        A replica whose model thread died or stuck past forward_timeout fails it and Serve
        replaces the replica (after three failures in a row).
        """
        engine = self.codescaler_app.state.engine
        if engine is None or not engine.healthy:
            raise RuntimeError("the batch loop or the model thread is not healthy")

    def __del__(self) -> None:
        exporter = getattr(self, "codescaler_exporter", None)  # absent when __init__ failed
        if exporter is not None:
            exporter.close()
