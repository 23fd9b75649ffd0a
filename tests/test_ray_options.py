"""Ray Serve scale-out without a cluster: options derived from Settings, the replica
exporter and the replica's ASGI wrapper (Ray installed, fake scorer)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from pydantic import ValidationError

from service.app import create_app
from service.ray_app import deployment_options, replica_settings, split_args
from service.ray_replica import REPLICA_HEADER, RayOptions, ReplicaApp, start_exporter
from service.settings import Settings
from tests.helpers import FakeScorer, free_port

# --- options derived from Settings (no cluster) ------------------------------------------


@pytest.mark.parametrize(
    ("min_replicas", "max_replicas", "fixed", "autoscaling"),
    [
        (2, 2, 2, None),
        (1, 8, None, {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 64.0}),
        (0, 4, None, {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 64.0}),
    ],
)
def test_replica_count_is_fixed_or_autoscaled(
    min_replicas: int, max_replicas: int, fixed: int | None, autoscaling: dict[str, float] | None
) -> None:
    settings = Settings(model="fake", ray_min_replicas=min_replicas, ray_max_replicas=max_replicas)
    options = deployment_options(settings, num_gpus=1, replica_cpus=1)
    assert options.get("num_replicas") == fixed
    assert options.get("autoscaling_config") == autoscaling


def test_deployment_options_follow_the_settings() -> None:
    settings = Settings(model="fake", ray_target_ongoing_requests=20, max_queue_items=300,
                        max_items_per_request=300, request_timeout=90, forward_timeout=30)
    options = deployment_options(settings, num_gpus=1, replica_cpus=4)
    assert options["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 4}
    assert options["max_ongoing_requests"] == 40
    assert options["max_queued_requests"] == 300
    assert options["backpressure_config"]["status_code"] == 503
    assert options["graceful_shutdown_timeout_s"] == 120


@pytest.mark.parametrize(
    ("device", "num_gpus", "expected"),
    [("auto", 0, "cpu"), ("auto", 1, "auto"), ("auto", 0.5, "auto"), ("cuda:1", 0, "cuda:1")],
)
def test_a_cpu_replica_does_not_take_a_gpu(device: str, num_gpus: float, expected: str) -> None:
    assert replica_settings(Settings(model="fake", device=device), num_gpus).device == expected


def test_builder_args_split_into_settings_and_ray_options() -> None:
    settings, options = split_args({"model": "tiny-random", "max_batch_items": "8", "metrics_port": "9400"})
    assert (settings.model, settings.max_batch_items) == ("tiny-random", 8)
    assert options == RayOptions(metrics_port=9400)
    with pytest.raises(ValidationError):
        split_args({"model": "tiny-random", "no_such_setting": "1"})


@pytest.mark.parametrize(("keys", "public", "serves"), [([], False, True), (["k"], False, False), (["k"], True, True)])
def test_the_replica_exporter_keeps_private_metrics_private(keys: list[str], public: bool, serves: bool) -> None:
    settings = Settings(model="fake", api_key=keys, metrics_public=public)
    app = create_app(settings, FakeScorer())
    port = free_port()
    exporter = start_exporter(app, settings, RayOptions(metrics_port=port - 1), local_rank=1)
    try:
        assert (exporter is not None) == serves
        if exporter is not None:
            assert "codescaler_requests_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        if exporter is not None:
            exporter.close()


# --- the replica wrapper (fake scorer, no cluster) ----------------------------------------


class GatedWarmup(FakeScorer):
    """A fake whose warm-up waits for ``release`` (or raises ``fail``), to watch a replica start."""

    def __init__(self, fail: BaseException | None = None) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail = fail

    def warmup(self) -> None:
        self.started.set()
        if self.fail is not None:
            raise self.fail
        self.release.wait(30)


async def start_lifespan(app: ReplicaApp) -> tuple[asyncio.Task[None], list[dict[str, object]], asyncio.Queue]:
    """Run the ASGI lifespan of ``app`` the way Serve's replica does; returns the task, sent messages, inbox."""
    sent: list[dict[str, object]] = []
    inbox: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send))
    return task, sent, inbox


async def first_message(sent: list[dict[str, object]]) -> None:
    """Return once the lifespan has sent something."""
    while not sent:
        await asyncio.sleep(0.01)


async def test_startup_completes_only_when_the_engine_can_score() -> None:
    scorer = GatedWarmup()
    inner = create_app(Settings(model="fake"), scorer)
    task, sent, inbox = await start_lifespan(ReplicaApp(inner, "SERVE_REPLICA::a#b#c"))
    await asyncio.to_thread(scorer.started.wait, 30)
    for _ in range(10):  # let the inner lifespan run up to its startup.complete
        await asyncio.sleep(0)
    assert sent == []  # held while the model warms up
    assert inner.state.engine is None
    scorer.release.set()
    await asyncio.wait_for(first_message(sent), 30)
    assert sent == [{"type": "lifespan.startup.complete"}]
    assert inner.state.engine is not None
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 30)


async def test_a_model_that_cannot_come_up_fails_the_replica_startup() -> None:
    inner = create_app(Settings(model="fake"), GatedWarmup(fail=RuntimeError("no weights")))
    task, sent, inbox = await start_lifespan(ReplicaApp(inner, "SERVE_REPLICA::a#b#c"))
    await asyncio.wait_for(first_message(sent), 30)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "no weights" not in str(sent[0])
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 30)


async def test_every_response_names_the_replica() -> None:
    app = ReplicaApp(create_app(Settings(model="fake"), FakeScorer()), "SERVE_REPLICA::app#dep#r1")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://replica") as client:
        ok = await client.get("/health")
        missing = await client.get("/no-such-route")
    for response in (ok, missing):
        assert response.headers[REPLICA_HEADER] == "SERVE_REPLICA::app#dep#r1"
        assert response.headers["x-request-id"]  # the app's own id stays when no proxy supplied one
