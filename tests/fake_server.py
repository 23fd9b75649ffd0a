"""Real HTTP servers around a FaultScorer: in a thread, or as a process that takes signals.

In a thread, a test can reach into the scorer (gates, recorded batches) while talking
to a real uvicorn over loopback. As a process (``python -m tests.fake_server [flags]``,
started by ``start_process``) it runs exactly the CLI's server loop,
``service.cli.run_server``, so signal and drain tests cover the shipped code
without loading a model. ``--fake-delay S`` makes every forward take S seconds; every
other flag is a Settings flag.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from tests.fault_scorers import FaultScorer
from tests.helpers import ROOT, free_port


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None,
               timeout: float = 60.0) -> None:
    """Poll /ready until 200; fail early (with its log) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            output = log.read_text(errors="replace") if log else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{output}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError("server did not become ready in time")


@contextlib.contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free loopback port in a thread; yield its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def start_process(module: str, args: Sequence[str], log: Path,
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m module --host 127.0.0.1 --port P args`` on a free port, output to ``log``.

    Output goes to a file, not a pipe: nobody reads a pipe during a load test, and a
    full pipe would block the server's logging and so the server.
    """
    port = free_port()
    cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log, timeout=300)
    except Exception:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def main(argv: Sequence[str] | None = None) -> None:
    """The CLI's server loop around a FaultScorer (no model, no torch)."""
    from service.cli import add_settings_flags, parse_settings, run_server, setup_logging
    from service.app import create_app

    parser = argparse.ArgumentParser(prog="fake_server")
    parser.add_argument("--fake-delay", type=float, default=0.0)
    parser.add_argument("--fake-load-until", type=Path, default=None,
                        help="load the scorer through the app's lifespan, done once this file exists")
    add_settings_flags(parser)
    values = vars(parser.parse_args(argv))
    delay = values.pop("fake_delay")
    load_until: Path | None = values.pop("fake_load_until")
    settings = parse_settings({"model": "fake", **values})
    setup_logging(settings)
    scorer = FaultScorer()
    scorer.delay = delay
    if load_until is None:
        run_server(create_app(settings, scorer), settings)
        return
    from service import app as app_module

    def slow_load(_settings: object) -> FaultScorer:
        while not load_until.exists():  # a model download that ends when the test says so
            time.sleep(0.02)
        return scorer

    app_module.load_scorer = slow_load  # type: ignore[assignment]
    run_server(create_app(settings), settings)  # as the CLI does: bind first, load in the lifespan


if __name__ == "__main__":
    main()
