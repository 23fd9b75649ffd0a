"""Recent scores by input digest, so an input the model has just scored is not run again.

RL rollouts repeat themselves (a policy that has converged on a problem writes the
same program again and again; retried requests resend the same items). The model is
deterministic for a given token sequence, so its score can be answered from memory.
Keys are 128-bit BLAKE2b digests of the token ids (16 bytes an entry instead of the
ids themselves); a least-recently-used bound in entries keeps it small.
Used by the model thread only.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def digest(input_ids: Sequence[int]) -> bytes:
    """A 16-byte fingerprint of a token sequence."""
    return hashlib.blake2b(array("q", input_ids).tobytes(), digest_size=16).digest()


class ResultCache:
    """At most ``max_items`` scores by digest (0 disables it)."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._scores: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._scores)

    def get(self, key: bytes) -> float | None:
        """The score kept for ``key`` (now the most recently used), or None."""
        score = self._scores.get(key)
        if score is not None:
            self._scores.move_to_end(key)
        return score

    def put(self, key: bytes, score: float) -> None:
        """Keep ``score``, forgetting the least recently used beyond the bound."""
        if self.max_items == 0:
            return
        self._scores[key] = score
        self._scores.move_to_end(key)
        while len(self._scores) > self.max_items:
            self._scores.popitem(last=False)
