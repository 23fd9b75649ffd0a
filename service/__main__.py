"""CLI entry point ``codescaler-serve``: parse settings once, build the app, bind, then load the model.

Every Settings field is a ``--kebab-case`` flag and a ``CODESCALER_<FIELD>`` variable
(CLI > env > default). ``codescaler-serve score|rank ...`` scores files offline.
The port is bound before the model loads, so /health answers 200 (status ``loading``)
and /ready 503 during a long download. A bad setting or key file ends the process at
once with exit code 2, a model that cannot be loaded as soon as that is known (also 2).
SIGTERM (or Ctrl-C) drains gracefully and exits 0, or 3 when a forward stuck on the
device outlives the drain (service/cli.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from service.cli import add_settings_flags, check_keys_or_exit, parse_settings, run_server, setup_logging


def serve(argv: Sequence[str]) -> None:
    """Run the HTTP server."""
    from service.app import create_app

    parser = argparse.ArgumentParser(prog="codescaler-serve", description="CodeScaler reward-model server")
    add_settings_flags(parser)
    settings = parse_settings(vars(parser.parse_args(argv)))
    setup_logging(settings)
    check_keys_or_exit(settings)
    run_server(create_app(settings), settings)  # the lifespan loads the model after the bind


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch: ``score``/``rank`` run offline; anything else starts the server."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("score", "rank"):
        from service.offline import main as offline_main

        offline_main(args)
        return
    if args and args[0] == "serve":
        args = args[1:]
    serve(args)


if __name__ == "__main__":
    main()
