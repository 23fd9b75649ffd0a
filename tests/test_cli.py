"""The command line's shared pieces (service/cli.py): no module imports ``service.__main__``,
each entry point loads one copy of each module, and one logging setup serves them all.

Fast tier: subprocesses of the real interpreter, no model.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SOURCE_DIRS = ("service", "models", "loadtests", "tests", "clients")
# Runs an entry point as ``python -m`` does (its module is ``__main__``), then reports whether
# the module was also imported under its own name: a second copy of every definition in it.
TWICE = """
import runpy, sys
module, entry, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [module, *argv]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print(entry in sys.modules)
"""


def imported_modules(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_no_module_imports_service_main() -> None:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    sources = [p for p in tracked if p.startswith(SOURCE_DIRS)]
    assert "service/offline.py" in sources and "service/ray_app.py" in sources
    offenders = [p for p in sources if "service.__main__" in imported_modules(p)]
    assert offenders == []


@pytest.mark.parametrize(("module", "entry", "argv"), [
    ("service", "service.__main__", ["score", "--help"]),
    ("service", "service.__main__", ["rank", "--help"]),
    ("service", "service.__main__", ["--help"]),
    ("service.ray_app", "service.ray_app", ["--help"]),
])
def test_an_entry_point_loads_one_copy_of_itself(module: str, entry: str, argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", TWICE, module, entry, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout  # the entry point really ran
    assert done.stdout.strip().splitlines()[-1] == "False"


LOGS = ("import logging, sys; from service.cli import setup_logging; from service.settings import Settings; "
        "sys.argv[1] == 'taken' and logging.basicConfig(level=logging.WARNING, format='%(name)s|%(message)s'); "
        "setup_logging(Settings(model='fake', log_level='debug')); "
        "[logging.getLogger(name).debug('hi') for name in ('codescaler.test', 'models.test', 'other')]")


@pytest.mark.parametrize(("root", "expected"), [
    # A process of ours: the one format, at the setting's level.
    ("fresh", ["DEBUG codescaler.test: hi", "DEBUG models.test: hi", "DEBUG other: hi"]),
    # A Ray replica, whose root logger Ray has set up: our loggers still get the level.
    ("taken", ["codescaler.test|hi", "models.test|hi"]),
])
def test_one_logging_setup_for_every_entry_point(root: str, expected: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", LOGS, root], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert [line if root == "taken" else line.split(" ", 2)[2] for line in lines] == expected
