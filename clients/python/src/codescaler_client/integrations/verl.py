"""veRL custom reward functions: per sample, per sample with asyncio, and per batch.

veRL loads this file from ``custom_reward_function.path`` (``reward.custom_reward_function.path``
in newer releases) and calls the function named by ``.name``:

``compute_score``
    ``(data_source, solution_str, ground_truth, extra_info=None, **kwargs)``, the naive
    reward manager's call (one sample at a time, sometimes from a thread pool).
``compute_score_async``
    the same signature as a coroutine; veRL's reward loop awaits it per sample, so many
    samples are in flight at once and the server batches them.
``compute_score_batch``
    ``(data_sources, solution_strs, ground_truths, extra_infos, **kwargs)``, for
    ``reward_manager=batch``: a whole step in one call, sent as chunked requests.

Where the problem comes from: veRL hands a reward function the decoded response, the
ground truth and the dataset's ``extra_info`` column, never the prompt. So the problem
is read from ``extra_info``: the key named by ``problem_key`` (a ``reward_kwargs`` entry)
when given, else the first of ``prompt``, ``question`` and ``problem`` that is present.
A string is used as it is; a chat (a list of messages, as parquet stores the ``prompt``
column) gives its last user message. Store the exact user message the policy saw (with
its formatting instructions): veRL's own preprocessing scripts put the *bare* question
under ``question``, which differs from what the model was trained on. A sample without
a problem raises, since a silent reward of 0 would train on nothing.

Each result is ``{"score": reward, "valid": 1.0 or 0.0}``: veRL uses ``score`` and logs
the other keys. ``ground_truth`` is unused (no tests are run). ``url`` and ``api_key``
may come from ``reward_kwargs``; otherwise ``CODESCALER_URL`` and ``CODESCALER_API_KEY``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from codescaler_client import ScoreItem, ScoreResult
from codescaler_client.integrations import last_message, shared_async_client, shared_client

PROBLEM_KEYS = ("prompt", "question", "problem")


def problem_of(extra_info: Mapping[str, Any] | None, problem_key: str | None = None) -> str:
    """The problem a sample answers, from its ``extra_info`` (see the module docstring)."""
    info = extra_info if isinstance(extra_info, Mapping) else {}
    for key in (problem_key,) if problem_key else PROBLEM_KEYS:
        value = info.get(key)
        if isinstance(value, str) and value:
            return value
        if value is not None and not isinstance(value, (str, bytes, Mapping)) and isinstance(value, Iterable):
            text = last_message(value, "user")
            if text:
                return text
    wanted = f"extra_info[{problem_key!r}]" if problem_key else " or ".join(f"extra_info[{k!r}]" for k in PROBLEM_KEYS)
    raise ValueError(f"CodeScaler needs the problem of each sample: put the exact user message in {wanted}")


def _item(solution_str: str, extra_info: Mapping[str, Any] | None, problem_key: str | None) -> ScoreItem:
    language = extra_info.get("language") if isinstance(extra_info, Mapping) else None
    return ScoreItem(problem_of(extra_info, problem_key), solution_str, language if isinstance(language, str) else None)


def _result(result: ScoreResult) -> dict[str, float]:
    return {"score": result.reward, "valid": 1.0 if result.valid else 0.0}


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None,
                  *, problem_key: str | None = None, url: str | None = None, api_key: str | None = None,
                  **kwargs: Any) -> dict[str, float]:
    """The reward of one sample (blocking); ``kwargs`` takes what veRL adds (router address, ...)."""
    item = _item(solution_str, extra_info, problem_key)
    return _result(shared_client(url, api_key).score([item])[0])


async def compute_score_async(data_source: str, solution_str: str, ground_truth: Any,
                              extra_info: Mapping[str, Any] | None = None, *, problem_key: str | None = None,
                              url: str | None = None, api_key: str | None = None, **kwargs: Any) -> dict[str, float]:
    """The reward of one sample, awaited; concurrent calls meet in the server's batches."""
    item = _item(solution_str, extra_info, problem_key)
    return _result((await shared_async_client(url, api_key).score([item]))[0])


def compute_score_batch(data_sources: Sequence[str], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[Mapping[str, Any] | None] | None = None, *,
                        problem_key: str | None = None, url: str | None = None, api_key: str | None = None,
                        **kwargs: Any) -> list[dict[str, float]]:
    """Rewards of a whole batch in input order (``reward_manager=batch``)."""
    infos = [None] * len(solution_strs) if extra_infos is None else list(extra_infos)
    items = [_item(text, info, problem_key) for text, info in zip(solution_strs, infos, strict=True)]
    return [_result(r) for r in shared_client(url, api_key).score(items)]
