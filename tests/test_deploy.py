"""The deployment parts are real: the compose files and Dockerfile, the image's health check
command, and a locust run with its corpus."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "codescaler.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "codescaler.yaml"
PROM_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"
DOCKERFILE = ROOT / "Dockerfile"
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"

SCORING_ENDPOINTS = {"/v1/score", "/v1/rank", "/get_reward"}


# --- compose, provisioning, Dockerfile ----------------------------------------------------------

@dataclass(frozen=True)
class Tagged:
    """A compose merge tag (``!reset``, ``!override``) and the value it carries."""

    tag: str
    value: object


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that knows compose's merge tags."""


def _construct_tagged(loader: ComposeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.SequenceNode):
        return Tagged(node.tag, loader.construct_sequence(node))
    if isinstance(node, yaml.MappingNode):
        return Tagged(node.tag, loader.construct_mapping(node))
    return Tagged(node.tag, loader.construct_scalar(node))  # type: ignore[arg-type]


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _construct_tagged)


def load_compose(path: Path) -> dict[str, object]:
    """A compose file as plain data (merge tags as Tagged)."""
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def bind_mounts(service: dict[str, object]) -> list[tuple[str, str]]:
    """(host path, container path) of the service's bind mounts (short syntax, relative sources)."""
    mounts = []
    for volume in service.get("volumes", []):  # type: ignore[union-attr]
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def test_compose_references_files_that_exist() -> None:
    for path in (COMPOSE, COMPOSE_CPU):
        for name, service in load_compose(path)["services"].items():  # type: ignore[union-attr]
            for source, _ in bind_mounts(service):
                assert (path.parent / source).exists(), f"{path.name}: {name} mounts missing {source}"
            build = service.get("build")
            if isinstance(build, dict) and "context" in build:
                context = path.parent / build["context"]
                assert (context / build.get("dockerfile", "Dockerfile")).is_file()
    compose = load_compose(COMPOSE)
    services = compose["services"]
    assert set(services) == {"codescaler", "prometheus", "grafana"}  # type: ignore[arg-type]
    scorer = services["codescaler"]  # type: ignore[index]
    assert (COMPOSE.parent / scorer["build"]["context"]).resolve() == ROOT
    assert [entry["path"] for entry in scorer["env_file"]] == [".env"]
    assert (DOCKER / ".env.example").is_file()
    devices = scorer["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["capabilities"] == ["gpu"]
    assert any(str(v).split(":")[1] == "/cache" for v in scorer["volumes"])
    assert any(str(p).endswith(":8000") for p in scorer["ports"])


def test_compose_cpu_override_serves_tiny_model_without_gpu() -> None:
    scorer = load_compose(COMPOSE_CPU)["services"]["codescaler"]  # type: ignore[index]
    assert scorer["environment"]["CODESCALER_MODEL"] == "tiny-random"
    assert scorer["deploy"]["resources"]["reservations"]["devices"] == Tagged("!reset", [])
    assert "whl/cpu" in scorer["build"]["args"]["TORCH_INDEX_URL"]


def test_prometheus_scrapes_the_compose_service_every_5_s() -> None:
    config = yaml.safe_load(PROM_CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    prometheus = load_compose(COMPOSE)["services"]["prometheus"]  # type: ignore[index]
    assert ("./prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml") in bind_mounts(prometheus)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    host, port = config["scrape_configs"][0]["static_configs"][0]["targets"][0].split(":")
    assert host in load_compose(COMPOSE)["services"] and port == "8000"  # type: ignore[operator]


def test_grafana_is_provisioned_from_files_with_anonymous_viewers() -> None:
    grafana = load_compose(COMPOSE)["services"]["grafana"]  # type: ignore[index]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = dict((target, source) for source, target in bind_mounts(grafana))
    assert (DOCKER / mounts["/etc/grafana/provisioning"]).resolve() == DATASOURCES.parent.parent
    provider = yaml.safe_load(PROVIDERS.read_text())["providers"][0]
    dashboards_dir = DOCKER / mounts[provider["options"]["path"]]
    assert (dashboards_dir / DASHBOARD.name).resolve() == DASHBOARD
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards_dir / Path(home).relative_to(provider["options"]["path"])).is_file()
    # Every panel and query uses the provisioned datasource, by uid.
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    used = {m.group(1) for m in re.finditer(r'"uid":\s*"([^"]+)"', json.dumps(dashboard["panels"]))}
    assert used == {uid}


def test_dockerfile_has_the_required_elements() -> None:
    text = DOCKERFILE.read_text()
    instructions = re.sub(r"\\\n", " ", text)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_REQUIREMENT=", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"^VOLUME /cache$", text, re.M)
    assert "HF_HOME=/cache" in instructions and "CODESCALER_HOST=0.0.0.0" in instructions
    assert re.search(r"^HEALTHCHECK .*/ready", instructions, re.M)
    assert re.search(r'^ENTRYPOINT \["codescaler-serve"\]$', text, re.M)
    assert re.search(r'^codescaler-serve = ', (ROOT / "pyproject.toml").read_text(), re.M)  # the installed script
    # The CA bundle is a build secret of the pip steps, never copied or set as an image variable.
    assert "--mount=type=secret,id=pip_ca" in text
    assert not re.search(r"^(COPY|ADD|ENV)\b.*(PIP_CERT|\.crt|\.pem)", instructions, re.M)
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (ROOT / source).exists(), f"COPY of missing {source}"


@pytest.mark.slow
def test_healthcheck_command_follows_ready(live_server: str) -> None:
    """The image's HEALTHCHECK command, run here: healthy against a ready server, not against none."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    command = re.search(r'^HEALTHCHECK .*? CMD python -c "([^"]+)"', text, re.M)
    assert command
    check = command.group(1)

    def run(port: int) -> int:
        env = {**os.environ, "CODESCALER_PORT": str(port)}
        return subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, timeout=30).returncode

    assert run(urlparse(live_server).port) == 0  # type: ignore[arg-type]
    assert run(free_port()) != 0


# --- load tests ---------------------------------------------------------------------------------

CORPUS_REPORT = """
import json, sys
sys.path.insert(0, "loadtests")
import locustfile
from service.extraction import extract
report = []
for p in range(32):
    for v in range(locustfile.BEST_OF_N):
        kind, text = locustfile.response(p, v)
        code = text.split("```python\\n", 1)[1].split("\\n```", 1)[0] if kind == "ok" else ""
        report.append([kind, extract(text).status.value, len(code.splitlines())])
print(json.dumps(report))
"""


@pytest.mark.slow
def test_locust_corpus_mixes_valid_and_malformed_responses_as_declared() -> None:
    # A subprocess: importing locust monkey-patches the standard library (gevent).
    result = subprocess.run([sys.executable, "-c", CORPUS_REPORT], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = {"ok": "ok", "no_fence": "no_code", "two_blocks": "multiple_blocks", "syntax_error": "syntax_error"}
    assert [status for _, status, _ in report] == [expected[kind] for kind, _, _ in report]
    assert {kind for kind, _, _ in report} == set(expected)
    malformed = sum(kind != "ok" for kind, _, _ in report) / len(report)
    assert 0.05 <= malformed <= 0.15
    lines = [n for kind, _, n in report if kind == "ok"]
    assert min(lines) >= 20 and max(lines) <= 300 and max(lines) >= 150


@pytest.mark.slow
def test_locust_smoke_run_has_no_failures(live_server: str, tmp_path: Path) -> None:
    prefix = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", live_server,
           "-u", "4", "-r", "4", "--run-time", "10s", "--stop-timeout", "30", "--csv", str(prefix), "--only-summary"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    with open(f"{prefix}_stats.csv", newline="") as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert SCORING_ENDPOINTS <= rows.keys(), rows.keys()
    for name in SCORING_ENDPOINTS:
        assert int(rows[name]["Request Count"]) > 0
        assert int(rows[name]["Failure Count"]) == 0, (tmp_path / "smoke_failures.csv").read_text()
    assert int(rows["Aggregated"]["Failure Count"]) == 0
