"""The dashboards are real: every Grafana query names only metrics and labels a live server
exports, a real Prometheus scrapes the service and each query has data, and promtool accepts the
shipped Prometheus config."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, stop_server

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "codescaler.json"
PROM_CONFIG = DOCKER / "prometheus" / "prometheus.yml"

# Grafana's interval variables, and what a test query uses instead (several 1 s scrapes).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                   "unless", "offset", "inf", "nan"}
SCORING_ENDPOINTS = {"/v1/score", "/v1/rank", "/get_reward"}

PROBLEM = "Read two integers from one line and print their sum."
VALID = "Read both and add them.\n\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
MALFORMED = [
    "Just add the two numbers and print the result.",                       # no_code
    "```python\na, b = map(int, input().split())\n```\n```python\nprint(a + b)\n```",  # multiple_blocks
    "```python\ndef solve(:\n    print(1)\n```",                              # syntax_error
]
PROMPT = f"<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n"


# --- PromQL names -------------------------------------------------------------------------

@dataclass(frozen=True)
class Names:
    """What one PromQL expression refers to: metric name -> matcher labels, and grouping labels."""

    selectors: dict[str, set[str]]
    grouping: set[str]


def promql_names(expr: str) -> Names:
    """Metric names, their matcher label names and the by/without/on/ignoring labels of ``expr``.

    Enough PromQL for dashboard expressions: string literals are blanked first so label values
    cannot look like names; identifiers followed by "(" are functions; numbers and durations
    are not names.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    selectors: dict[str, set[str]] = {}
    grouping: set[str] = set()
    for match in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        grouping.update(label.strip() for label in match.group(2).split(",") if label.strip())
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}", text):
        name = match.group(1)
        assert name is not None, f"selector without a metric name in {expr!r}"
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", match.group(2)))
        selectors.setdefault(name, set()).update(labels)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()", text):
        name = match.group(1)
        if name not in PROMQL_KEYWORDS:
            selectors.setdefault(name, set())
    return Names(selectors, grouping)


def exported_series(metrics_text: str) -> dict[str, set[str]]:
    """Sample name -> label names, as Prometheus would ingest them (``_bucket``, ``_total``, ...)."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def problems_of(expr: str, series: dict[str, set[str]]) -> list[str]:
    """Every name or label in ``expr`` that the exported ``series`` lack."""
    names = promql_names(expr)
    problems = [f"no series {name}" for name in names.selectors if name not in series]
    known: set[str] = set()
    for name, labels in names.selectors.items():
        have = series.get(name, set())
        known |= have
        problems += [f"{name} has no label {label}" for label in sorted(labels - have) if name in series]
    problems += [f"no metric of the expression has label {label}" for label in sorted(names.grouping - known)]
    return problems


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard, panels nested in rows included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, object]]) -> None:
        for panel in panels:
            found.extend((str(panel.get("title")), target["expr"]) for target in panel.get("targets", []))  # type: ignore[union-attr,index]
            walk(panel.get("panels", []))  # type: ignore[arg-type]

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's interval variables replaced by fixed windows."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unhandled Grafana variable in {expr!r}"
    return expr


@pytest.mark.parametrize(("expr", "selectors", "grouping"), [
    ('histogram_quantile(0.95, sum by (le, endpoint) (rate(a_seconds_bucket{endpoint=~"/v1/x|by (y)"}[1m])))',
     {"a_seconds_bucket": {"endpoint"}}, {"le", "endpoint"}),
    ("sum(rate(a_total[5m])) / sum(rate(b_count[5m])) or vector(0) * 1e3", {"a_total": set(), "b_count": set()}, set()),
    ('(sum(rate(c_total{status="503"}[1m])) or sum(rate(c_total[1m])) * 0)', {"c_total": {"status"}}, set()),
    ("sum without (instance) (d) + on (job) group_left (x) e offset 5m", {"d": set(), "e": set()},
     {"instance", "job", "x"}),
])
def test_promql_names_finds_metrics_and_labels(expr: str, selectors: dict[str, set[str]], grouping: set[str]) -> None:
    names = promql_names(expr)
    assert names.selectors == selectors
    assert names.grouping == grouping


def test_problems_of_flags_names_the_server_does_not_export() -> None:
    series = {"g": set(), "h_bucket": {"le"}, "h_sum": set(), "c_total": {"status"}}
    assert problems_of('sum by (le) (rate(h_bucket[1m])) + sum(rate(c_total{status="503"}[1m]))', series) == []
    assert problems_of("rate(g_bucket[1m])", series) == ["no series g_bucket"]  # a gauge has no buckets
    assert problems_of("rate(h[1m])", series) == ["no series h"]  # a histogram has no bare series
    assert problems_of('rate(c_total{endpoint="x"}[1m])', series) == ["c_total has no label endpoint"]
    assert problems_of("sum by (endpoint) (g)", series) == ["no metric of the expression has label endpoint"]


def send_traffic(url: str, round_: int = 0) -> None:
    """Valid and malformed items through all three scoring endpoints; every request must succeed.

    Each round's code differs (as training traffic does): repeated inputs are answered from
    the result cache without a forward, and the forward metrics would not move.
    """
    valid = VALID.replace("```python\n", f"```python\n# round {round_}\n", 1)
    with httpx.Client(base_url=url, timeout=60) as client:
        items = [{"problem": PROBLEM, "response": text} for text in [valid, *MALFORMED]]
        replies = [
            client.post("/v1/score", json={"items": items}),
            client.post("/v1/rank", json={"problem": PROBLEM, "responses": [valid, MALFORMED[2], valid + "\n"]}),
            client.post("/get_reward", json={"query": [f"{PROMPT}{valid}<|im_end|>"], "prompts": [PROMPT]}),
        ]
    for reply in replies:
        assert reply.status_code == 200, reply.text


@pytest.mark.slow
def test_dashboard_queries_name_only_exported_metrics(live_server: str) -> None:
    send_traffic(live_server)
    series = exported_series(httpx.get(f"{live_server}/metrics", timeout=10).text)
    assert "codescaler_tokens_total" in series and not [name for name in series if name.endswith("_created")]
    targets = list(dashboard_targets())
    assert len(targets) >= 12
    problems = {f"{title}: {expr}": problems_of(as_promql(expr), series) for title, expr in targets}
    assert {query: found for query, found in problems.items() if found} == {}
    used = {name for _, expr in targets for name in promql_names(as_promql(expr)).selectors}
    for metric in ("codescaler_requests_total", "codescaler_items_total", "codescaler_request_duration_seconds_bucket",
                   "codescaler_queue_items", "codescaler_batch_items_bucket", "codescaler_batch_tokens_bucket",
                   "codescaler_batch_padding_ratio_sum", "codescaler_forward_duration_seconds_bucket",
                   "codescaler_reward_bucket", "codescaler_tokens_total"):
        assert metric in used, f"the dashboard shows nothing of {metric}"


# --- a real Prometheus ------------------------------------------------------------------------

def prometheus_query(base: str, query: str) -> dict[str, object]:
    """The ``data`` of an instant query; the query must parse and evaluate."""
    reply = httpx.get(f"{base}/api/v1/query", params={"query": query}, timeout=10)
    body = reply.json()
    assert reply.status_code == 200 and body["status"] == "success", f"{query}: {body}"
    return body["data"]


def finite_values(data: dict[str, object]) -> list[float]:
    """The finite sample values of an instant query result (vector or scalar)."""
    if data["resultType"] == "scalar":
        values = [float(data["result"][1])]  # type: ignore[index]
    else:
        values = [float(item["value"][1]) for item in data["result"]]  # type: ignore[union-attr,index]
    return [v for v in values if math.isfinite(v)]


@pytest.fixture
def prometheus(live_server: str, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus running the project's scrape configuration, pointed at ``live_server``."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus; .ci/run installs it)")
    config = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = config["scrape_configs"]
    assert [job["job_name"] for job in jobs] == ["codescaler"]
    assert jobs[0]["static_configs"] == [{"targets": ["codescaler:8000"]}]
    jobs[0]["static_configs"] = [{"targets": [urlparse(live_server).netloc]}]
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address={urlparse(base).netloc}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if httpx.get(f"{base}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield base
    finally:
        stop_server(proc)
        log.close()


def wait_for(condition, what: str, seconds: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Poll ``condition`` until it is true; fail with ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


@pytest.mark.slow
def test_prometheus_scrapes_service_and_every_dashboard_query_has_data(live_server: str, prometheus: str) -> None:
    up = 'up{job="codescaler"}'
    wait_for(lambda: finite_values(prometheus_query(prometheus, up)) == [1.0], "the service was never scraped")
    # Traffic spread over several scrapes, so that every rate sees the counters move.
    for round_ in range(3):
        send_traffic(live_server, round_ + 1)
        time.sleep(1.2)
    queries = {expr: as_promql(expr) for _, expr in dashboard_targets()}

    def missing() -> list[str]:
        return [expr for expr, query in queries.items() if not finite_values(prometheus_query(prometheus, query))]

    last: list[str] = []

    def all_have_data() -> bool:
        last[:] = missing()
        return not last

    deadline = time.monotonic() + 30
    while not all_have_data() and time.monotonic() < deadline:
        time.sleep(1)
    assert last == [], "dashboard queries without data"
    # The scoring endpoints themselves were scraped, not only the scrapes of /metrics.
    endpoints = prometheus_query(prometheus, "sum by (endpoint) (codescaler_requests_total)")
    assert SCORING_ENDPOINTS <= {item["metric"]["endpoint"] for item in endpoints["result"]}  # type: ignore[index,union-attr]


@pytest.mark.slow
def test_promtool_accepts_the_shipped_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    result = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
