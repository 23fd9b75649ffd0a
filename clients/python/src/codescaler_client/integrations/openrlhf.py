"""OpenRLHF reward-function file: pass this file's path where OpenRLHF takes a reward URL.

``--remote_rm_url /path/to/codescaler_client/integrations/openrlhf.py`` (``--reward.remote_url`` in
newer releases). OpenRLHF loads the file and calls ``reward_func(queries, prompts,
labels)``: one sample per call from a worker thread in recent releases, a micro-batch
in older ones. Each query is the decoded prompt plus response with special tokens kept
(padding too, in older releases); the service's /get_reward splits it exactly as in
OpenRLHF's plain-URL mode, so the two modes give the same rewards. Labels are unused:
the reward model judges the code against the problem alone.

Returns OpenRLHF's dict of float tensors aligned with ``queries``: ``rewards`` (shaped,
for advantages), ``scores`` (sigmoid of the raw score, 0 when invalid; OpenRLHF's
dynamic filtering expects 0..1) and ``extra_logs`` (``valid``, ``raw_score``).
Releases that wanted a bare tensor back (before the dict form) should use the URL mode,
``--remote_rm_url http://HOST:8000/get_reward``, which every release speaks. The service
is ``CODESCALER_URL`` with ``CODESCALER_API_KEY``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from codescaler_client.integrations import shared_client


def reward_func(queries: Sequence[str], prompts: Sequence[str] | None = None,
                labels: Sequence[Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Rewards for OpenRLHF's samples; raises when the service cannot answer after its retries."""
    import torch  # OpenRLHF always has it; importing it here keeps this module light elsewhere

    answer = shared_client().get_reward(list(queries), None if prompts is None else list(prompts))

    def tensor(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32)

    return {"rewards": tensor(answer.rewards), "scores": tensor(answer.scores),
            "extra_logs": {name: tensor(values) for name, values in answer.extra_logs.items()}}
