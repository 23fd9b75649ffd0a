"""What every command line shares: settings flags, exit-on-bad-config, logging setup, the draining server.

The entry points (``python -m service``, ``codescaler-serve score|rank``, ``python -m
service.ray_app`` and the tests' fake server) import these from here, so no module
imports ``service.__main__`` and ``python -m service`` loads one copy of each module.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys
import threading
import time
import typing
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

import uvicorn
from pydantic import BaseModel, ValidationError

from service.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from models.base import Scorer

EXIT_BAD_CONFIG = 2
#: The drain ended but a model thread is still stuck in a forward: the process ends anyway.
EXIT_STUCK_MODEL = 3
#: Seconds the worker threads get to finish after the server has shut down.
THREAD_GRACE_S = 5.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The loggers of this project; their level is set even where the root logger is someone else's (Ray).
OWN_LOGGERS = ("codescaler", "models")
log = logging.getLogger("codescaler.main")

ModelT = TypeVar("ModelT", bound=BaseModel)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; only flags given on the command line override env and defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif typing.get_origin(field.annotation) is list:
            parser.add_argument(flag, action="append", default=argparse.SUPPRESS, help=help_text + " (repeatable)")
        else:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=help_text)


def validated_or_exit(model: type[ModelT], values: dict[str, object]) -> ModelT:
    """``model(**values)``; a bad value exits 2 with one line per problem."""
    try:
        return model(**values)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"codescaler-serve: invalid setting {where}: {err['msg']}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)


def parse_settings(values: dict[str, object]) -> Settings:
    """Settings from CLI values over the environment; a bad value exits 2 with one line per problem."""
    return validated_or_exit(Settings, values)


def setup_logging(settings: Settings) -> None:
    """The one log format and level: root handler where none is set yet, and our loggers' level always."""
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)


def load_or_exit(settings: Settings) -> Scorer:
    """Load the model or end the process with exit code 2 and one line saying why."""
    from models.base import ModelLoadError
    from service.app import load_scorer

    try:
        return load_scorer(settings)
    except ModelLoadError as exc:
        print(load_failure(exc), file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)


def load_failure(exc: BaseException) -> str:
    """The one line that says why the model could not be loaded."""
    return f"codescaler-serve: cannot load {exc}; to try the service without it, use --model tiny-random"


def check_keys_or_exit(settings: Settings) -> None:
    """Refuse an unreadable or empty key file (exit 2); warn when serving beyond loopback without keys."""
    from service.auth import load_keys

    try:
        keys = load_keys(settings)
    except (OSError, ValueError) as exc:
        print(f"codescaler-serve: cannot use the API keys: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    if not keys and not _is_loopback(settings.host):
        log.warning("no API key configured and bound to %s: anyone who can reach this port can score; "
                    "give --api-key or --api-key-file", settings.host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it reaches beyond this machine
        return False


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its own graceful shutdown, ending in exit code 0.

    uvicorn on SIGTERM stops accepting connections at once (load balancers still
    send traffic there) and afterwards re-raises the signal (the process dies with
    -15). Here the first SIGTERM or SIGINT starts ``app.drain``; when it returns,
    uvicorn shuts down as usual (finishing responses in progress) and the process
    exits normally. A second signal skips the rest of the drain; a third forces exit.
    The model loads after the port is bound (``create_app`` without a scorer): a load
    that fails ends the server with ``exit_code`` 2 and one line on stderr.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, settings: Settings) -> None:
        super().__init__(config)
        self.app = app
        self.settings = settings
        self.signals = 0
        self.drain_task: asyncio.Task[None] | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Runs in the signal handler: flip readiness now, start the drain on the next tick.

        The signal is deliberately not recorded for uvicorn to re-raise after shutdown.
        """
        self.signals += 1
        self.app.state.draining = True
        if self.signals == 2:
            self.should_exit = True
        elif self.signals > 2:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's 0.1 s tick: exit when the load failed; start the drain after a signal; exit once done."""
        error = getattr(self.app.state, "load_error", None)
        if error is not None and not self.exit_code:
            print(load_failure(error), file=sys.stderr)
            self.exit_code = EXIT_BAD_CONFIG
            self.should_exit = True
        if self.signals and self.drain_task is None:
            from service.app import drain

            patience = self.settings.request_timeout + self.settings.forward_timeout
            self.drain_task = asyncio.create_task(drain(self.app, self.settings.drain_seconds, patience))
        if self.drain_task is not None and self.drain_task.done():
            self.should_exit = True
        return await super().on_tick(counter)


def run_server(app: FastAPI, settings: Settings) -> None:
    """Serve ``app`` until a signal has drained it (shared by the CLI and the test servers).

    Exit codes: 0 after a drain; 2 when the model could not be loaded; 3
    (EXIT_STUCK_MODEL) when, after the drain, a worker thread (a forward stuck on the
    device) is still running ``THREAD_GRACE_S`` later: its threads cannot be interrupted
    and would otherwise keep the process alive for ever.
    """
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_keep_alive=75)
    server = DrainingServer(config, app, settings)
    server.run()
    stuck = _threads_still_running(THREAD_GRACE_S)
    if stuck:
        log.error("exiting with code %d: %s still running after the drain (a forward stuck on the device?)",
                  EXIT_STUCK_MODEL, ", ".join(stuck))
        logging.shutdown()
        os._exit(EXIT_STUCK_MODEL)  # sys.exit would wait for those threads at interpreter exit
    if server.exit_code:
        sys.exit(server.exit_code)


def _threads_still_running(grace: float) -> list[str]:
    """Names of non-daemon threads other than this one still alive after ``grace`` seconds."""
    give_up = time.monotonic() + grace
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    for thread in others:
        thread.join(max(0.0, give_up - time.monotonic()))
    return [t.name for t in others if t.is_alive()]
