"""Chat parsing: the (problem, response) pair inside a rendered chat string or a list of messages.

Callers send the chat in three forms: ChatML rendered by the policy (OpenRLHF, vLLM
scripts, slime with ``--apply-chat-template``), the same rendered by the reward model's
own Qwen3 template (veRL's reward loop, which adds a ``<think>`` block to the last
assistant turn), or the messages themselves. In each the problem is the last user turn
before the last assistant turn, and the response is that assistant turn without
trailing end-of-turn tokens and without a leading think block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

USER_TURN = "<|im_start|>user\n"
ASSISTANT_TURN = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end_of_text|>")
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def problem_of(prompt: str) -> str:
    """The last user turn of a ChatML prompt; a prompt without markers is the problem as it is."""
    start = prompt.rfind(USER_TURN)
    if start < 0:
        return prompt
    body = prompt[start + len(USER_TURN):]
    end = body.find(END_OF_TURN)
    return body if end < 0 else body[:end]


def strip_end_tokens(text: str) -> str:
    """``text`` without trailing end-of-turn tokens (and the whitespace between them).

    Works on an end index and copies once, so a tail of k tokens costs O(k + len), not
    O(k * len) (a policy that repeats ``<|im_end|>`` until max_tokens sends such tails).
    """
    end = len(text)
    while True:
        stop = end
        while stop > 0 and text[stop - 1].isspace():
            stop -= 1
        token = next((t for t in END_TOKENS if text.endswith(t, 0, stop)), None)
        if token is None:
            return text[:end]
        end = stop - len(token)


def split_query(query: str, prompt: str | None) -> tuple[str, str]:
    """(prompt, response) of one query; without a usable prompt, split at the last assistant turn."""
    if prompt is not None and query.startswith(prompt):
        head, rest = prompt, query[len(prompt):]
    else:
        at = query.rfind(ASSISTANT_TURN)
        head, rest = (query[:at], query[at + len(ASSISTANT_TURN):]) if at >= 0 else (prompt or "", query)
    return head, strip_end_tokens(rest)


def without_think(response: str) -> str:
    """The response after a leading ``<think>...</think>`` block (Qwen3's template writes one).

    The template renders ``<think>\\n{reasoning}\\n</think>\\n\\n{content}`` with the
    newlines at the start of ``content`` removed, so the same is removed here; a think
    block that is never closed is left in place (there is no answer after it to find).
    """
    if not response.lstrip().startswith(THINK_OPEN):
        return response
    close = response.find(THINK_CLOSE)
    return response if close < 0 else response[close + len(THINK_CLOSE):].lstrip("\n")


def split_chat(text: str) -> tuple[str, str] | None:
    """(problem, response) of a rendered ChatML chat; None when it has no user turn."""
    at = text.rfind(ASSISTANT_TURN)
    head, rest = (text[:at], text[at + len(ASSISTANT_TURN):]) if at >= 0 else (text, "")
    if USER_TURN not in head:
        return None
    return problem_of(head), without_think(strip_end_tokens(rest))


def text_of(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of parts (others skipped)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text") or "" for part in content
                       if isinstance(part, Mapping) and part.get("type", "text") == "text")
    return ""


def split_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """(problem, response) of a message list, read like split_chat reads a rendered chat."""
    roles = [message.get("role") for message in messages]
    answer = max((i for i, role in enumerate(roles) if role == "assistant"), default=len(roles))
    user = max((i for i, role in enumerate(roles[:answer]) if role == "user"), default=None)
    if user is None:
        return None
    response = text_of(messages[answer].get("content")) if answer < len(messages) else ""
    return text_of(messages[user].get("content")), without_think(response)
