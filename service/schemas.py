"""Request and response models of the HTTP API, with the limits that need no settings.

Configurable limits (items per request, characters per field, body bytes) are checked
by the routes against the Settings, before any extraction or tokenization. Integer and
boolean fields take what JSON Schema calls integer and boolean (``2`` and ``2.0``; ``true``),
never a coercion: a caller that sends ``0.0`` for a boolean or ``"1"`` for an integer has a
bug that deserves a 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool


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


def _integer(value: object) -> object:
    """JSON Schema's integer: an int, or a float without a fraction (``2.0``); never a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integer)]


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
    return_code: StrictBool = False


class RankRequest(BaseModel):
    """POST /v1/rank: N candidate responses to one problem."""

    model_config = ConfigDict(extra="forbid")
    problem: Text
    responses: list[Text] = Field(min_length=1)
    language: str | None = Field(None, max_length=32)
    extraction: ExtractionName | None = None
    shaping: ShapingName | None = None
    # Field(ge=1) goes on the int itself: on ``Integer`` it would reach the schema as "ge", not "minimum".
    top_k: Annotated[int, Field(ge=1), BeforeValidator(_integer)] | None = None
    return_code: StrictBool = False


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


# --- other callers' protocols (service/protocols.py) ---------------------------------
#: A rendered chat: the route refuses (400) a string without a user turn, since it holds no
#: problem to score against. The pattern documents that rule in the schema (and steers
#: generated test data); the route, not the schema, enforces it, so the answer is a 400
#: that says what is missing rather than a pattern mismatch.
ChatText = Annotated[Text, Field(json_schema_extra={"pattern": r"<\|im_start\|>user\n"})]


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are read."""

    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: Text | None = None


class ChatMessage(BaseModel):
    """One chat message as OpenAI-style clients send it."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: Text | list[ContentPart] | None = None


class ClassifyOptions(BaseModel):
    """Optional fields vLLM's /classify accepts; unknown fields are accepted and ignored, as vLLM does."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    model: str | None = Field(None, description="Accepted, not checked: the served model answers.")
    use_activation: StrictBool | None = Field(None, description="false: the shaped reward; true (default): sigmoid.")
    activation: StrictBool | None = Field(None, description="Older name of use_activation (used when it is unset).")
    truncate_prompt_tokens: Integer | None = Field(None, description="Accepted, not honoured (see README).")
    priority: Integer = Field(0, description="Accepted, not honoured: one queue, first come first served.")
    request_id: Text | None = Field(None, max_length=256, description="Becomes the response id.")


class ClassifyRequest(ClassifyOptions):
    """vLLM POST /classify, completion form: one rendered chat or a list of them."""

    input: ChatText | list[ChatText]


class ChatClassifyRequest(ClassifyOptions):
    """vLLM POST /classify, chat form: the messages of one chat."""

    messages: list[ChatMessage] = Field(min_length=1)


class NativeClassifyRequest(BaseModel):
    """SGLang's native POST /classify: one rendered chat or a list of them."""

    model_config = ConfigDict(extra="allow")
    text: ChatText | list[ChatText]


class EmbeddingRequest(BaseModel):
    """SGLang POST /v1/embeddings (a reward model answers a one-element embedding)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    model: str | None = Field(None, description="Accepted, not checked: the served model answers.")
    input: ChatText | list[ChatText]


class TokenUsage(BaseModel):
    """OpenAI-style usage: tokens the model ran on."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ClassifyData(BaseModel):
    """One result of vLLM's /classify."""

    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(BaseModel):
    """vLLM's /classify answer."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: TokenUsage


class NativeClassifyResult(BaseModel):
    """SGLang's native /classify answer for one text."""

    embedding: list[float]
    meta_info: dict[str, Any]


class EmbeddingData(BaseModel):
    """One result of /v1/embeddings."""

    object: Literal["embedding"] = "embedding"
    embedding: list[float]
    index: int


class EmbeddingResponse(BaseModel):
    """SGLang's /v1/embeddings answer."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: TokenUsage


class RemoteRewardRequest(BaseModel):
    """slime's remote reward model body (``--rm-type remote_rm``), one sample."""

    model_config = ConfigDict(extra="allow")
    prompt: Text | list[ChatMessage] = Field(
        description="The policy-templated prompt, the raw prompt, or its messages.")
    response: Text
    label: Any = None


class RemoteRewardResponse(BaseModel):
    """The answer slime reads with ``--reward-key reward``."""

    reward: float
    score: float | None
    valid: bool
    extraction_status: str
    error: str | None
