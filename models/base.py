"""The Scorer contract: what the service needs from a reward model, and nothing more.

The service never imports torch; it talks to a Scorer through ``encode`` (text to
token ids, on a worker thread), ``batch_cost`` (what a candidate batch costs, so the
batcher fills the token budget as the runner counts it) and ``score_with_stats`` (a
batch of encoded items to raw logits and the work done, on the one model thread).
Batch in, list out, same length and order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.cost import BatchCost


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters ('' when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message names the model and the reason."""


class TooLong(ValueError):
    """The solution alone does not fit the model's max_length; the item is not scored."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory in a forward; the caller may retry with fewer items."""


@dataclass(frozen=True, slots=True)
class EncodedItem:
    """One (problem, code) pair as the model reads it.

    ``prefix_len`` counts the leading tokens that depend on the problem only (the
    user turn and the opening of the assistant turn): items with equal leading
    ``prefix_len`` ids can share one forward of that prefix.
    """

    input_ids: tuple[int, ...]
    prefix_len: int
    truncated: bool = False
    #: The content spelled a control token or a think tag (tokenized as text; models/template.py).
    forged: bool = False

    @property
    def length(self) -> int:
        """Number of tokens the model reads for this item."""
        return len(self.input_ids)


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What the last ``score`` call computed: real tokens and padded token positions."""

    tokens: int
    padded_tokens: int

    @property
    def padding_ratio(self) -> float:
        """Share of computed positions that were padding (0.0 = none)."""
        return 0.0 if self.padded_tokens == 0 else 1.0 - self.tokens / self.padded_tokens


class Scorer(ABC):
    """A reward model behind the service: tokenizes on any thread, scores on one."""

    #: Name reported to clients (the model id or directory as configured).
    name: str
    #: Token limit of one item; ``encode`` never returns more tokens than this.
    max_length: int

    @abstractmethod
    def encode(self, problem: str, code: str) -> EncodedItem:
        """Build the model's exact input for (problem, code); raise TooLong if the code cannot fit."""

    @abstractmethod
    def score(self, items: Sequence[EncodedItem]) -> list[float]:
        """Raw reward-model logits for ``items``, same length and order; OutOfMemory on OOM."""

    def score_with_stats(self, items: Sequence[EncodedItem]) -> tuple[list[float], BatchStats | None]:
        """``score`` and what it computed (None: the batcher assumes one padded forward)."""
        return self.score(items), None

    def batch_cost(self) -> BatchCost:
        """A fresh running cost for assembling a batch (default: right-padded, items x longest)."""
        from models.cost import PaddedCost  # models.cost builds on this module's EncodedItem

        return PaddedCost()

    def info(self) -> dict[str, Any]:
        """Descriptive facts for /v1/models (dtype, device, template hash ...)."""
        return {"id": self.name, "max_length": self.max_length}

    def warmup(self) -> None:
        """Run one small forward so the first request does not pay for lazy initialisation."""
