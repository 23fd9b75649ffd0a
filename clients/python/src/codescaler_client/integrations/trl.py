"""TRL reward function: ``GRPOTrainer(reward_funcs=[CodeScalerReward(url)])``.

GRPOTrainer calls each reward function with keywords: ``prompts``, ``completions``,
``completion_ids``, the other dataset columns, and (in newer releases) ``trainer_state``,
and expects one float per completion. Both dataset formats are handled:

* plain: ``prompts`` and ``completions`` are strings; the prompt is the problem;
* conversational: each prompt is a list of messages and the problem is its last user
  message; each completion is ``[{"role": "assistant", "content": ...}]`` and its
  assistant text is the response.

A ``language`` dataset column, when present, sets each sample's language. TRL logs a
reward function under its ``__name__``, which a plain instance lacks; this class sets
it (``name``, default ``codescaler``). The URL and key default to ``CODESCALER_URL`` and
``CODESCALER_API_KEY``; other keywords go to :class:`codescaler_client.CodeScalerClient`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from codescaler_client import CodeScalerClient, ScoreItem
from codescaler_client.integrations import last_message, message_text


def _problem(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    text = last_message(prompt, "user")
    if text is None:
        raise ValueError("a conversational prompt without a user message has no problem to score against")
    return text


def _response(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    text = last_message(completion, "assistant")
    return text if text is not None else "".join(message_text(m.get("content", "")) for m in completion)


class CodeScalerReward:
    """A GRPOTrainer reward function backed by CodeScaler Serve; one instance per trainer."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, name: str = "codescaler",
                 extraction: str | None = None, shaping: str | None = None, **client_options: Any) -> None:
        self.__name__ = name
        self.extraction = extraction  # None = the server's default ("paper")
        self.shaping = shaping  # None = the server's default ("softplus")
        self.client = CodeScalerClient(url, api_key, **client_options)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        """One reward per completion, in order (TRL's reward-function contract)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        languages = kwargs.get("language")
        if not isinstance(languages, Sequence) or isinstance(languages, str) or len(languages) != len(completions):
            languages = [None] * len(completions)
        items = [ScoreItem(_problem(p), _response(c), lang if isinstance(lang, str) else None)
                 for p, c, lang in zip(prompts, completions, languages, strict=True)]
        results = self.client.score(items, extraction=self.extraction, shaping=self.shaping)
        return [r.reward for r in results]

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()
