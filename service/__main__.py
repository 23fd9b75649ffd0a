"""CLI entry point ``codescaler-serve``: parse settings once, load the model, build the app, serve.

Every Settings field is a ``--kebab-case`` flag and a ``CODESCALER_<FIELD>`` variable
(CLI > env > default). ``codescaler-serve score|rank ...`` scores files offline.
A model that cannot be loaded, or a bad setting or key file, ends the process at
once with exit code 2. SIGTERM (or Ctrl-C) drains gracefully and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from service.cli import (add_settings_flags, check_keys_or_exit, load_or_exit, parse_settings, run_server,
                         setup_logging)


def serve(argv: Sequence[str]) -> None:
    """Run the HTTP server."""
    from service.app import create_app

    parser = argparse.ArgumentParser(prog="codescaler-serve", description="CodeScaler reward-model server")
    add_settings_flags(parser)
    settings = parse_settings(vars(parser.parse_args(argv)))
    setup_logging(settings)
    check_keys_or_exit(settings)
    scorer = load_or_exit(settings)
    run_server(create_app(settings, scorer), settings)


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
