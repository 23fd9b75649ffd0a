"""Thin adapter for OpenRLHF's remote reward model protocol (/get_reward).

(The other trainers' protocols are in service/protocols.py; chat parsing in service/chat.py.)

OpenRLHF sends each query as prompt plus response in decoded text with the chat
markers kept; the problem is the last user turn of the prompt and the response is
what follows the prompt, without trailing end-of-turn tokens.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api import ERRORS, KEYED, check_item_limits, score_items, set_timing_headers
from service.chat import problem_of, split_query
from service.engine import ItemInput
from service.errors import InvalidRequest
from service.schemas import RewardRequest, RewardResponse
from service.settings import Settings
from service.shaping import sigmoid

router = APIRouter()


@router.post("/get_reward", response_model=RewardResponse, responses=ERRORS, dependencies=KEYED)
async def get_reward(body: RewardRequest, request: Request, response: Response) -> RewardResponse:
    """OpenRLHF: rewards (shaped), scores (sigmoid of the raw score, 0 when invalid), extra_logs."""
    if body.prompts is not None and len(body.prompts) != len(body.query):
        raise InvalidRequest(f"prompts has {len(body.prompts)} entries but query has {len(body.query)}")
    if not body.query:
        return RewardResponse(rewards=[], scores=[], extra_logs={"valid": [], "raw_score": []})
    settings: Settings = request.app.state.settings
    check_item_limits(settings, len(body.query), [(f"query[{i}]", q) for i, q in enumerate(body.query)]
                      + [(f"prompts[{i}]", p) for i, p in enumerate(body.prompts or ())])
    inputs = []
    for i, query in enumerate(body.query):
        prompt, answer = split_query(query, body.prompts[i] if body.prompts is not None else None)
        inputs.append(ItemInput(problem_of(prompt), answer))
    outcomes = await score_items(request, response, inputs)
    set_timing_headers(response, outcomes)
    return RewardResponse(
        rewards=[o.reward for o in outcomes],
        scores=[sigmoid(o.score) if o.valid and o.score is not None else 0.0 for o in outcomes],
        extra_logs={
            "valid": [1.0 if o.valid else 0.0 for o in outcomes],
            "raw_score": [o.score if o.score is not None else 0.0 for o in outcomes],
        },
    )
