"""Request and response models of the HTTP API, with the limits that need no settings.

Configurable limits (items per request, characters per field, body bytes) are checked
by the routes against the Settings, before any extraction or tokenization.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def check_unicode(value: str) -> str:
    """``value`` if it is valid Unicode; a lone surrogate passes JSON parsing but crashes tokenizers.

    The one check for every way text comes in: the API's models (a 422) and offline input lines.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (invalid Unicode)") from None
    return value


Text = Annotated[str, AfterValidator(check_unicode)]
ExtractionName = Literal["paper", "lenient", "none"]
ShapingName = Literal["softplus", "none"]


class ScoreItem(BaseModel):
    """One (problem, response) pair."""

    model_config = ConfigDict(extra="forbid")
    problem: Text = Field(description="The exact user message the policy saw.")
    response: Text = Field(description="The policy's full response; code is extracted from it.")
    language: str | None = Field(None, max_length=32, description="Language of the code (default python).")


class ScoreRequest(BaseModel):
    """POST /v1/score."""

    model_config = ConfigDict(extra="forbid")
    items: list[ScoreItem] = Field(min_length=1)
    extraction: ExtractionName | None = None
    shaping: ShapingName | None = None
    return_code: bool = False


class RankRequest(BaseModel):
    """POST /v1/rank: N candidate responses to one problem."""

    model_config = ConfigDict(extra="forbid")
    problem: Text
    responses: list[Text] = Field(min_length=1)
    language: str | None = Field(None, max_length=32)
    extraction: ExtractionName | None = None
    shaping: ShapingName | None = None
    top_k: int | None = Field(None, ge=1)
    return_code: bool = False


class ExtractionInfo(BaseModel):
    """What extraction found."""

    status: str
    language: str
    code: str | None = None


class ItemResult(BaseModel):
    """The answer for one item."""

    index: int
    reward: float
    score: float | None = Field(description="Raw reward-model logit; null when the model did not run.")
    valid: bool
    extraction: ExtractionInfo
    truncated: bool
    tokens: int
    error: str | None
    forged: bool = Field(False, description="The problem or code spelled a control token or a think tag; "
                         "it was read as plain text (counted in codescaler_forged_items_total).")


class Usage(BaseModel):
    """Work done for a request."""

    items: int
    scored: int
    tokens: int


class ScoreResponse(BaseModel):
    """Response of POST /v1/score."""

    model: str
    results: list[ItemResult]
    usage: Usage


class RankResponse(BaseModel):
    """Response of POST /v1/rank."""

    model: str
    best: int
    ranking: list[int]
    results: list[ItemResult]
    usage: Usage


class RewardRequest(BaseModel):
    """POST /get_reward: OpenRLHF's remote reward model protocol."""

    model_config = ConfigDict(extra="allow")
    query: list[Text]
    prompts: list[Text] | None = None
    labels: list[Any] | None = None


class RewardResponse(BaseModel):
    """OpenRLHF's expected answer, aligned with ``query``."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class ErrorDetail(BaseModel):
    """The body of every error response."""

    code: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``."""

    error: ErrorDetail
