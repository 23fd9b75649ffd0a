"""Settings: limits that could never be met are refused when the service starts (no torch)."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from service.settings import Settings


@pytest.mark.parametrize("overrides, message", [
    ({"max_length": 4096, "max_batch_tokens": 1024}, "max_batch_tokens (1024) must be at least max_length"),
    ({"max_queue_items": 10, "max_items_per_request": 20}, "max_queue_items (10) must be at least"),
    ({"ray_min_replicas": 3, "ray_max_replicas": 2}, "ray_min_replicas"),
])
def test_impossible_limits_are_refused(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(model="m", **overrides)  # type: ignore[arg-type]


def test_the_defaults_are_consistent() -> None:
    settings = Settings(model="m")
    assert settings.max_batch_tokens >= settings.max_length
    assert settings.max_queue_items >= settings.max_items_per_request
