"""Schemathesis against /openapi.json of a real server (fake scorer, keys on): every endpoint,
positive and negative cases, at least 500 in all; no 5xx, every response valid against the
schema (status, content type, headers, body), and no keyed route answers without the key."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.transport import Response

from service.app import create_app
from service.settings import Settings
from tests.fake_server import serve_in_thread
from tests.helpers import FakeScorer

pytestmark = pytest.mark.slow

KEY = "fuzz-key"
MIN_CASES = 500


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    # max_wait_ms=0: no batching wait per request, so 500+ cases stay well under a minute.
    app = create_app(Settings(model="fake", api_key=[KEY], max_wait_ms=0), FakeScorer())
    with serve_in_thread(app) as base:
        yield base


def excluded_checks(case: schemathesis.Case, response: Response) -> list[schemathesis.CheckFunction]:
    """The rules the schema cannot state, under which schema-valid data is rightly refused.

    /get_reward's prompts must match query in length (422); a chat given to /classify,
    /v1/embeddings or /v1/reward must hold a user turn to take the problem from (400
    ``no_problem``: a message list without a user message, say). "Positive data is
    accepted" does not apply to such requests; every other check still does.
    """
    body = case.body if isinstance(case.body, dict) else {}
    prompts, query = body.get("prompts"), body.get("query")
    if case.operation.path == "/get_reward" and isinstance(prompts, list) and isinstance(query, list) \
            and len(prompts) != len(query):
        return [schemathesis.checks.positive_data_acceptance]
    if response.status_code == 400 and response.json().get("error", {}).get("code") == "no_problem":
        return [schemathesis.checks.positive_data_acceptance]
    return []


def test_generated_requests_get_no_5xx_and_schema_valid_responses(url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = {result.ok().label for result in schema.get_all_operations()}
    calls: Counter[tuple[str, int]] = Counter()
    strategy = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))

    @given(case=strategy)
    @settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        response = case.call(headers=headers)
        case.validate_response(response, headers=headers, excluded_checks=excluded_checks(case, response))
        calls[(case.operation.label, response.status_code)] += 1

    logging.disable(logging.WARNING)  # thousands of expected "wrong API key" warnings
    try:
        check()
    finally:
        logging.disable(logging.NOTSET)
    assert all(status < 500 for _, status in calls)
    assert sum(calls.values()) >= MIN_CASES, calls
    assert {label for label, _ in calls} == operations  # every endpoint was exercised
    assert {label for label, status in calls if status == 200} == operations  # and reached for real
