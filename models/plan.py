"""The packed plan of a batch: which tokens run in which forward, and what attends to what.

Pure Python, made once per batch on the model thread before any tensor exists, the
same on every device. Items are grouped by problem; a group shares a *prefix* (the
leading tokens all its items have, at least the problem's chat turn) that runs once,
or is read from stored key/value states (the prefix cache, or an earlier forward of
the same batch). Every item keeps at least one token of its own, its *suffix*.

One forward holds, side by side in one row and in this order:
  A. prefixes computed here (their states are captured), then items run whole: those
     without a prefix, and the only item of a new problem (which runs as one causal
     sequence: the states of its first tokens are those of its prefix, captured from
     inside it, so it needs no split and no prefix attention);
  B. suffixes of the groups whose prefix is in A, in the same group order;
  C. suffixes of the groups whose prefix is stored.
Attention is then exactly three varlen calls per layer (models/varlen.py): every
segment causally against itself; B's queries against A's prefix keys (a plain slice
of the row: no copy); C's queries against the stored prefixes. The partial results
are merged by their log-sum-exps (cascade attention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from models.base import EncodedItem
from models.prefix import ProblemKey, common_prefix_len, group_by_problem, shared_len


@dataclass(slots=True)
class Segment:
    """Tokens run as one causal sequence of the row."""

    tokens: Sequence[int]
    position: int  # position id of its first token: 0, or the length of its prefix
    item: int | None = None  # the item whose score is read at its last token


@dataclass(slots=True)
class PrefixCall:
    """Queries of consecutive groups (rows ``q_start:q_end``) against one prefix each."""

    q_start: int
    q_end: int
    q_lens: list[int]  # per group: its suffix tokens in this forward
    k_lens: list[int]  # per group: its prefix length
    keys: list[ProblemKey]  # per group: whose prefix (looked up in the stored states for C)


@dataclass(slots=True)
class ForwardPlan:
    """One packed forward."""

    segments: list[Segment]
    row_prefixes: PrefixCall | None  # B against A
    stored_prefixes: PrefixCall | None  # C against stored states
    captures: list[tuple[ProblemKey, int, int]]  # prefix states to keep: (key, row start, row end)

    @property
    def tokens(self) -> int:
        """Tokens run through the model by this forward."""
        return sum(len(s.tokens) for s in self.segments)


@dataclass(slots=True)
class _Group:
    key: ProblemKey
    shared: int
    members: list[int]
    stored: bool  # prefix already kept before this batch


@dataclass(slots=True)
class _Chunk:
    """A forward being filled; laid out in row order by ``build``."""

    prefixes: dict[ProblemKey, Sequence[int]] = field(default_factory=dict)  # computed in this row
    lone: list[Segment] = field(default_factory=list)
    lone_captures: list[tuple[ProblemKey, int, int]] = field(default_factory=list)  # (key, lone index, tokens)
    row_suffixes: dict[ProblemKey, list[Segment]] = field(default_factory=dict)
    stored_suffixes: dict[ProblemKey, list[Segment]] = field(default_factory=dict)
    tokens: int = 0

    def build(self) -> ForwardPlan:
        segments = [Segment(tokens, 0) for tokens in self.prefixes.values()] + self.lone
        starts = list(accumulate((len(s.tokens) for s in segments), initial=0))
        captures = [(key, starts[n], starts[n] + len(tokens)) for n, (key, tokens) in enumerate(self.prefixes.items())]
        first = len(self.prefixes)
        captures += [(key, starts[first + n], starts[first + n] + length) for key, n, length in self.lone_captures]
        row = self._call(self.row_suffixes, segments)
        stored = self._call(self.stored_suffixes, segments)
        return ForwardPlan(segments, row, stored, captures)

    @staticmethod
    def _call(groups: dict[ProblemKey, list[Segment]], segments: list[Segment]) -> PrefixCall | None:
        """Append the groups' suffixes to ``segments`` and describe their prefix attention."""
        if not groups:
            return None
        q_start = sum(len(s.tokens) for s in segments)
        q_lens, k_lens = [], []
        for suffixes in groups.values():
            segments.extend(suffixes)
            q_lens.append(sum(len(s.tokens) for s in suffixes))
            k_lens.append(suffixes[0].position)
        return PrefixCall(q_start, q_start + sum(q_lens), q_lens, k_lens, list(groups))


def plan_batch(items: Sequence[EncodedItem], *, reuse: bool, chunk_tokens: int, keep_single: bool,
               stored: Callable[[ProblemKey], Sequence[int] | None]) -> list[ForwardPlan]:
    """Forwards of at most ``chunk_tokens`` tokens each that score every item once.

    ``stored(key)`` gives the tokens of a kept prefix of that problem, or None.
    ``keep_single``: keep the prefix states of the only item of a new problem for later
    batches (true when a prefix cache exists); the item runs whole, its prefix's states
    captured from its own first tokens.
    A segment longer than ``chunk_tokens`` gets a forward of its own.
    """
    groups: list[_Group | int] = []  # in order of first appearance; ints are items run whole
    captured_whole: dict[int, tuple[ProblemKey, int]] = {}  # item run whole -> (key, prefix tokens to keep)
    for key, members in (group_by_problem(items) if reuse else [(None, [i]) for i in range(len(items))]):
        shared = shared_len(items, members) if key is not None else 0
        if key is None or shared == 0 or (len(members) == 1 and not keep_single):
            groups.extend(members)
            continue
        kept = stored(key)
        if kept is None and len(members) == 1:  # the only item of a new problem: its own first tokens
            captured_whole[members[0]] = (key, shared)
            groups.append(members[0])
            continue
        if kept is not None:
            shared = common_prefix_len([kept, items[members[0]].input_ids[:shared]])
            if shared == 0:  # a stored prefix that shares nothing with this batch's items
                groups.extend(members)
                continue
        groups.append(_Group(key, shared, members, kept is not None))
    forwards: list[ForwardPlan] = []
    chunk = _Chunk()
    computed: set[ProblemKey] = set()  # prefixes captured by an earlier forward of this batch

    def make_room(need: int) -> None:
        nonlocal chunk
        if chunk.tokens and chunk.tokens + need > chunk_tokens:
            forwards.append(chunk.build())
            computed.update(chunk.prefixes)
            chunk = _Chunk()

    for unit in groups:
        if isinstance(unit, int):
            make_room(items[unit].length)
            if unit in captured_whole:
                key, shared = captured_whole[unit]
                chunk.lone_captures.append((key, len(chunk.lone), shared))
            chunk.lone.append(Segment(items[unit].input_ids, 0, unit))
            chunk.tokens += items[unit].length
            continue
        for m in unit.members:
            ids = items[m].input_ids
            # Computed already (stored, in an earlier forward, or in this row): a flush in
            # make_room moves this row's prefixes to ``computed``, so the answer holds after it.
            available = unit.stored or unit.key in computed or unit.key in chunk.prefixes
            make_room(len(ids) - unit.shared + (0 if available else unit.shared))
            if not available:
                chunk.prefixes[unit.key] = ids[: unit.shared]
                chunk.tokens += unit.shared
            target = chunk.row_suffixes if unit.key in chunk.prefixes else chunk.stored_suffixes
            target.setdefault(unit.key, []).append(Segment(ids[unit.shared :], unit.shared, m))
            chunk.tokens += len(ids) - unit.shared
    if chunk.tokens:
        forwards.append(chunk.build())
    return forwards
