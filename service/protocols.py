"""Drop-in routes for the protocols trainers already send: vLLM /classify, SGLang, slime.

Each route turns its body into (problem, response) pairs (service/chat.py), scores them
through the same path as /v1/score (limits, admission, engine, timing headers, per-item
outcomes) and answers in the caller's shape. The value a caller reads:

- ``use_activation: false`` (vLLM; what veRL's reward loop sends), SGLang's routes and
  slime: the shaped reward of the server's ``--shaping`` (softplus of the score for valid
  code and 0.0 for invalid by default; the raw score and ``--invalid-reward`` with ``none``).
- vLLM with activation on (its default): sigmoid(score) for valid code, and the same
  invalid reward as above for invalid code.

An item over ``--max-chars-per-field`` is answered per item (``too_long``, the invalid
reward) rather than with a 413: veRL fails the whole training step on any 4xx.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Body, Request, Response
from pydantic import Field

from service.api import ERRORS, KEYED, check_item_limits, engine_of, score_items, set_timing_headers
from service.chat import problem_of, split_chat, split_messages, strip_end_tokens, without_think
from service.engine import ItemInput, ItemOutcome
from service.errors import NoProblem
from service.extraction import Extraction, ExtractionStatus
from service.schemas import (
    ChatClassifyRequest,
    ChatMessage,
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    NativeClassifyRequest,
    NativeClassifyResult,
    RemoteRewardRequest,
    RemoteRewardResponse,
    TokenUsage,
)
from service.settings import Settings
from service.shaping import shape, sigmoid

router = APIRouter()

#: /classify bodies, told apart by their fields: vLLM's chat form (messages), vLLM's completion
#: form (input), SGLang's native form (text). The first that validates wins, so a body with
#: both ``input`` and ``text`` is vLLM's.
AnyClassifyRequest = Annotated[
    ChatClassifyRequest | ClassifyRequest | NativeClassifyRequest, Field(union_mode="left_to_right"), Body()
]
AnyClassifyResponse = ClassifyResponse | NativeClassifyResult | list[NativeClassifyResult]


def texts_of(value: str | list[str]) -> list[str]:
    """A string-or-list input as a list."""
    return [value] if isinstance(value, str) else list(value)


def chat_pair(where: str, text: str) -> ItemInput:
    """The pair inside one rendered chat; 400 when there is no user turn to take the problem from."""
    pair = split_chat(text)
    if pair is None:
        raise NoProblem(f"{where} has no user turn (<|im_start|>user): send the chat rendered with its "
                        "template, or the messages, so that the problem is known")
    return ItemInput(*pair)


def messages_pair(where: str, messages: Sequence[ChatMessage]) -> ItemInput:
    """The pair inside a list of messages; 400 without a user message."""
    pair = split_messages([message.model_dump() for message in messages])
    if pair is None:
        raise NoProblem(f"{where} has no user message: the problem is the last user message")
    return ItemInput(*pair)


def too_long(settings: Settings) -> ItemOutcome:
    """The per-item answer for an item over the character limit: never extracted, never tokenized."""
    return ItemOutcome(shape(None, False, settings.shaping, settings.invalid_reward), None, False,
                       Extraction(ExtractionStatus.NO_CODE, settings.language, None), False, 0, "too_long")


async def score_pairs(request: Request, response: Response, inputs: Sequence[ItemInput]) -> list[ItemOutcome]:
    """/v1/score's path for ``inputs``, with over-long items answered per item instead of 413."""
    settings: Settings = request.app.state.settings
    check_item_limits(settings, len(inputs), ())
    limit = settings.max_chars_per_field
    fits = [len(item.problem) <= limit and len(item.response) <= limit for item in inputs]
    scored = iter(await score_items(request, response, [item for item, ok in zip(inputs, fits, strict=True) if ok])
                  if any(fits) else ())
    outcomes = [next(scored) if ok else too_long(settings) for ok in fits]
    set_timing_headers(response, outcomes)
    return outcomes


def activated(outcome: ItemOutcome) -> float:
    """vLLM's activation on one label: sigmoid of the score; invalid items keep the invalid reward."""
    return sigmoid(outcome.score) if outcome.valid and outcome.score is not None else outcome.reward


def usage_of(outcomes: Sequence[ItemOutcome]) -> TokenUsage:
    """Tokens the model ran on (items it did not run on count 0)."""
    tokens = sum(o.tokens for o in outcomes if o.score is not None)
    return TokenUsage(prompt_tokens=tokens, total_tokens=tokens)


def request_id_of(request: Request) -> str:
    """The id the middleware gave this request (also in the x-request-id header)."""
    return str(getattr(request.state, "request_id", ""))


async def vllm_classify(body: ClassifyRequest | ChatClassifyRequest, request: Request,
                        response: Response) -> ClassifyResponse:
    """vLLM's /classify: one data entry per input, in order."""
    name = engine_of(request).scorer.name
    if isinstance(body, ChatClassifyRequest):
        inputs = [messages_pair("messages", body.messages)]
    else:
        inputs = [chat_pair(f"input[{i}]", text) for i, text in enumerate(texts_of(body.input))]
    outcomes = await score_pairs(request, response, inputs)
    use_activation = body.use_activation if body.use_activation is not None else body.activation
    values = [activated(o) if use_activation is not False else o.reward for o in outcomes]
    return ClassifyResponse(
        id=f"classify-{body.request_id or request_id_of(request)}", created=int(time.time()), model=name,
        data=[ClassifyData(index=i, label="LABEL_0", probs=[x], num_classes=1) for i, x in enumerate(values)],
        usage=usage_of(outcomes),
    )


async def native_classify(body: NativeClassifyRequest, request: Request,
                          response: Response) -> NativeClassifyResult | list[NativeClassifyResult]:
    """SGLang's native /classify: one result for a string, a list of results for a list."""
    engine_of(request)
    inputs = [chat_pair(f"text[{i}]", text) for i, text in enumerate(texts_of(body.text))]
    outcomes = await score_pairs(request, response, inputs)
    rid = request_id_of(request)
    results = [NativeClassifyResult(embedding=[o.reward], meta_info={
        "id": f"{rid}-{i}", "prompt_tokens": o.tokens, "valid": o.valid,
        "extraction_status": o.extraction.status.value, "error": o.error,
    }) for i, o in enumerate(outcomes)]
    return results[0] if isinstance(body.text, str) else results


@router.post("/classify", response_model=AnyClassifyResponse, responses=ERRORS, dependencies=KEYED,
             operation_id="classify")
async def classify(body: AnyClassifyRequest, request: Request, response: Response) -> AnyClassifyResponse:
    """vLLM's /classify (``input`` or ``messages``) or SGLang's native /classify (``text``)."""
    if isinstance(body, NativeClassifyRequest):
        return await native_classify(body, request, response)
    return await vllm_classify(body, request, response)


@router.post("/v1/classify", response_model=AnyClassifyResponse, responses=ERRORS, dependencies=KEYED,
             operation_id="classify_v1")
async def classify_v1(body: AnyClassifyRequest, request: Request, response: Response) -> AnyClassifyResponse:
    """The same as /classify, under the /v1 prefix some vLLM clients use."""
    return await classify(body, request, response)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS, dependencies=KEYED)
async def embeddings(body: EmbeddingRequest, request: Request, response: Response) -> EmbeddingResponse:
    """SGLang's /v1/embeddings for a reward model: a one-element embedding, the shaped reward."""
    name = engine_of(request).scorer.name
    inputs = [chat_pair(f"input[{i}]", text) for i, text in enumerate(texts_of(body.input))]
    outcomes = await score_pairs(request, response, inputs)
    return EmbeddingResponse(data=[EmbeddingData(embedding=[o.reward], index=i) for i, o in enumerate(outcomes)],
                             model=name, usage=usage_of(outcomes))


@router.post("/v1/reward", response_model=RemoteRewardResponse, responses=ERRORS, dependencies=KEYED)
async def reward(body: RemoteRewardRequest, request: Request, response: Response) -> RemoteRewardResponse:
    """slime's remote reward model: one sample; the prompt templated, raw, or as messages."""
    engine_of(request)
    if isinstance(body.prompt, str):
        problem = problem_of(body.prompt)  # a raw prompt (no markers) is the problem as it is
    else:
        problem = messages_pair("prompt", body.prompt).problem
    item = ItemInput(problem, without_think(strip_end_tokens(body.response)))
    (outcome,) = await score_pairs(request, response, [item])
    return RemoteRewardResponse(reward=outcome.reward, score=outcome.score, valid=outcome.valid,
                                extraction_status=outcome.extraction.status.value, error=outcome.error)
