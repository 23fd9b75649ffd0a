"""CLI entry point ``codescaler-serve``: parse settings once, load the model, build the app, serve.

Every Settings field is a ``--kebab-case`` flag and a ``CODESCALER_<FIELD>`` variable
(CLI > env > default). ``codescaler-serve score|rank ...`` scores files offline.
A model that cannot be loaded ends the process at once with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError

from service.settings import Settings

EXIT_BAD_CONFIG = 2


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


def parse_settings(values: dict[str, object]) -> Settings:
    """Settings from CLI values over the environment; a bad value exits 2 with one line per problem."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"codescaler-serve: invalid setting {where}: {err['msg']}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)


def load_or_exit(settings: Settings):  # type: ignore[no-untyped-def]
    """Load the model or end the process with exit code 2 and one line saying why."""
    from models.base import ModelLoadError
    from service.app import load_scorer

    try:
        return load_scorer(settings)
    except ModelLoadError as exc:
        print(f"codescaler-serve: cannot load {exc}; to try the service without it, use --model tiny-random",
              file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)


def serve(argv: Sequence[str]) -> None:
    """Run the HTTP server."""
    import uvicorn

    from service.app import create_app

    parser = argparse.ArgumentParser(prog="codescaler-serve", description="CodeScaler reward-model server")
    add_settings_flags(parser)
    settings = parse_settings(vars(parser.parse_args(argv)))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scorer = load_or_exit(settings)
    app = create_app(settings, scorer)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_keep_alive=75)
    uvicorn.Server(config).run()


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
