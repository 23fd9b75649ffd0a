"""Ray Serve scale-out for real: a local Ray instance (2 CPUs, no dashboard) with two CPU
replicas of the tiny model, compared with the single-process app on the same pairs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app, wait_until_ready
from service.ray_app import APP_NAME
from service.ray_replica import REPLICA_HEADER, RayOptions
from service.settings import Settings
from tests.helpers import free_port

# --- two real replicas on a local Ray instance ---------------------------------------------

PROBLEMS = [f"Write a function f{p} that returns the sum of the first {p + 2} squares." for p in range(8)]


def body_of(i: int) -> dict[str, object]:
    """Request i of 64: 8 problems x 8 responses, every eighth response without a code block."""
    problem = PROBLEMS[i % 8]
    if i % 8 == 7:
        response = f"I would loop over range({i}) and add the squares."
    else:
        response = f"Here:\n```python\ndef f(n):\n    return sum(k * k for k in range({i} + n))\n```\n"
    return {"items": [{"problem": problem, "response": response}]}


BODIES = [body_of(i) for i in range(64)]


def assert_same_result(got: dict[str, object], expected: dict[str, object]) -> None:
    """Equal validity and reward; raw scores within 1e-5 (batch composition differs)."""
    assert got["valid"] == expected["valid"]
    if expected["score"] is None:
        assert got["score"] is None and got["reward"] == expected["reward"]
    else:
        assert abs(got["score"] - expected["score"]) <= 1e-5
        assert abs(got["reward"] - expected["reward"]) <= 1e-5


@pytest.fixture(scope="module")
def reference(model_cache: Path) -> list[dict[str, object]]:
    """The single-process app's result for each of BODIES (same settings, in this process)."""
    settings = Settings(model="tiny-random", model_cache_dir=model_cache, device="cpu")

    async def run() -> list[dict[str, object]]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            await wait_until_ready(app)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://one") as client:
                responses = [await client.post("/v1/score", json=body) for body in BODIES]
        assert all(r.status_code == 200 for r in responses)
        return [r.json()["results"][0] for r in responses]

    return asyncio.run(run())


def free_port_pair() -> int:
    """A port p such that p and p + 1 were both free a moment ago (the two replicas' exporters)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two adjacent free ports")


def descendants(pid: int) -> set[int]:
    """Live processes below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@dataclass(frozen=True)
class Cluster:
    """The running Serve application: its HTTP address and the first exporter port."""

    url: str
    metrics_port: int


@pytest.fixture(scope="module")
def cluster(model_cache: Path) -> Iterator[Cluster]:
    """A local Ray instance (2 CPUs) with two CPU replicas of the tiny model; stopped, processes gone, after."""
    import ray
    from ray import serve

    from service.ray_app import application

    before = descendants(os.getpid())
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=80 * 2**20,
             logging_level="warning")
    try:
        port, metrics_port = free_port(), free_port_pair()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(model="tiny-random", model_cache_dir=model_cache, ray_min_replicas=2, ray_max_replicas=2)
        serve.run(application(settings, RayOptions(metrics_port=metrics_port)), name=APP_NAME, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}", metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()
    deadline = time.monotonic() + 60
    while (left := descendants(os.getpid()) - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind after ray.shutdown(): {sorted(left)}"


def scrape(port: int) -> tuple[str, float]:
    """(replica named in the registry, its count of successful /v1/score requests) from one exporter."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    replica, scored = "", 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "codescaler_replica_info":
                replica = sample.labels["replica"]
            if (sample.name == "codescaler_requests_total" and sample.labels["endpoint"] == "/v1/score"
                    and sample.labels["status"] == "200"):
                scored = sample.value
    return replica, scored


@pytest.mark.slow
async def test_two_replicas_answer_like_the_single_process(
    cluster: Cluster, reference: list[dict[str, object]]
) -> None:
    before = dict(scrape(cluster.metrics_port + i) for i in range(2))
    async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
        # No retries here: Serve routes only to replicas whose model is up, so none may 503.
        responses = await asyncio.gather(*(client.post("/v1/score", json=body) for body in BODIES))
        assert [r.status_code for r in responses] == [200] * len(BODIES)
        for response, expected in zip(responses, reference, strict=True):
            assert_same_result(response.json()["results"][0], expected)
            assert len(response.headers.get_list("x-request-id")) == 1
        served = Counter(r.headers[REPLICA_HEADER] for r in responses)
        assert len(served) == 2, f"one replica served everything: {served}"

        # The other routes run in the replicas too, each response naming its replica.
        ready = await client.get("/ready")
        models = await client.get("/v1/models")
        query = "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n```python\nprint(1)\n```"
        reward = await client.post("/get_reward", json={"query": [query]})
        proxied_metrics = await client.get("/metrics")
    assert ready.status_code == 200
    assert models.json()["data"][0]["device"] == "cpu"
    assert reward.status_code == 200
    assert len(reward.json()["rewards"]) == 1
    for response in (ready, models, reward, proxied_metrics):
        assert response.headers[REPLICA_HEADER] in served
    assert f'replica="{proxied_metrics.headers[REPLICA_HEADER]}"' in proxied_metrics.text

    # Each replica's exporter serves its own registry: it counted exactly what it answered.
    after = dict(scrape(cluster.metrics_port + i) for i in range(2))
    assert set(after) == set(served)
    assert {replica: after[replica] - before.get(replica, 0.0) for replica in after} == dict(served)


@pytest.mark.slow
async def test_requests_succeed_while_a_replica_is_killed(
    cluster: Cluster, reference: list[dict[str, object]]
) -> None:
    """A replica dies mid-run; the client retries 5xx and connection errors (up to 6 tries, like trainers do)."""
    import ray

    @dataclass
    class Outcome:
        index: int
        sent_at: float
        replica: str
        tries: int
        result: dict[str, object]

    outcomes: list[Outcome] = []
    victim: list[str] = []
    dead_at: list[float] = []
    killing: list[asyncio.Future[None]] = []
    sent_after_death = 0

    def kill(name: str) -> None:
        """Kill the replica's actor; note the time once Ray reports it dead."""
        actor = ray.get_actor(name, namespace="serve")
        ray.kill(actor, no_restart=True)
        while True:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead_at.append(time.monotonic())
                return
            time.sleep(0.1)

    async def post_with_retry(client: httpx.AsyncClient, body: dict[str, object]) -> tuple[httpx.Response, int]:
        last = ""
        for tries in range(1, 7):
            try:
                response = await client.post("/v1/score", json=body)
                if response.status_code < 500:
                    return response, tries
                last = f"status {response.status_code}"
            except httpx.TransportError as exc:
                last = repr(exc)
            await asyncio.sleep(min(0.25 * 2 ** (tries - 1), 2.0))
        raise AssertionError(f"request failed 6 times; last: {last}")

    async def worker(client: httpx.AsyncClient, counter: Iterator[int]) -> None:
        nonlocal sent_after_death
        for n in counter:
            if sent_after_death >= 32:
                return
            sent_at = time.monotonic()
            if dead_at:
                sent_after_death += 1
            response, tries = await post_with_retry(client, BODIES[n % len(BODIES)])
            assert response.status_code == 200
            outcomes.append(Outcome(n, sent_at, response.headers[REPLICA_HEADER], tries,
                                    response.json()["results"][0]))
            if len(outcomes) == 16:  # mid-run: kill the replica that just answered, off the event loop
                victim.append(response.headers[REPLICA_HEADER])
                killing.append(asyncio.get_running_loop().run_in_executor(None, kill, victim[0]))

    counter = iter(range(600))  # a bound, in case the replica never dies; asserted below
    async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
        await asyncio.gather(*(worker(client, counter) for _ in range(8)))
    await asyncio.gather(*killing)  # surfaces an error of the kill itself

    assert dead_at, "the replica was not reported dead while requests ran"
    assert sent_after_death >= 32
    for outcome in outcomes:
        assert_same_result(outcome.result, reference[outcome.index % len(BODIES)])
    late = [o for o in outcomes if o.sent_at > dead_at[0]]
    assert late
    assert all(o.replica != victim[0] for o in late)
    retried = sum(o.tries > 1 for o in outcomes)
    print(f"{len(outcomes)} requests, {retried} retried, served by {Counter(o.replica for o in outcomes)}")
