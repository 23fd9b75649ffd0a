"""Offline scoring: ``codescaler-serve score|rank IN.jsonl -o OUT.jsonl``, no server needed.

Runs the server's Engine in-process (same extraction, tokenization, batching and prefix
reuse), so a file scored here gets the rewards the service would give. Each input line
is a JSON object, ``{"problem", "response"}`` (score) or ``{"problem", "responses": [...]}``
(rank), with an optional ``language``; other fields are carried to the output line,
which adds the result fields (a result field overrides an input field of the same name).

The input is read twice: a first pass checks every line, reports a malformed one with
its number (or, with ``--strict``, stops with exit code 1 before the model loads) and
counts items for the progress bar; the second streams records through the engine in
chunks of about ``--chunk-items`` items, two chunks in flight so that tokenizing one
overlaps the model running the other, and memory stays bounded. Lines of one problem
stay in one chunk where they are adjacent, so the batcher can share their prefix.
Output goes to a temporary file beside the target, renamed over it at the end: a crash
or an interrupt never leaves half an output. Exit codes: 0 done, 1 bad input, 2 bad
settings or model, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from models.base import Scorer
from service.engine import Engine, ItemInput, ItemOutcome
from service.metrics import Metrics
from service.schemas import check_unicode
from service.settings import Settings
from service.shaping import ranking

EXIT_BAD_INPUT = 1
EXIT_INTERRUPTED = 130
OWN_OPTIONS = ("input", "output", "strict", "chunk_items", "progress")
Record = dict[str, Any]


class BadLine(ValueError):
    """An input line that cannot be scored; the message says why."""


def _text(name: str, value: Any, limit: int) -> str:
    """A required string field: present, valid Unicode (tokenizers crash on lone surrogates), bounded."""
    if not isinstance(value, str):
        raise BadLine(f'"{name}" is missing' if value is None else f'"{name}" must be a string')
    if len(value) > limit:
        raise BadLine(f'"{name}" has {len(value)} characters; the limit is {limit}')
    try:
        return check_unicode(value)
    except ValueError as exc:
        raise BadLine(f'"{name}" {exc}') from None


def parse_line(raw: bytes, mode: str, settings: Settings) -> tuple[Record, list[ItemInput]] | None:
    """The record of one line and its items; None for a blank line; BadLine when malformed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadLine("not UTF-8") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise BadLine("not a JSON object")
    limit = settings.max_chars_per_field
    problem = _text("problem", record.get("problem"), limit)
    language = record.get("language")
    if language is not None and not isinstance(language, str):
        raise BadLine('"language" must be a string')
    if mode == "score":
        return record, [ItemInput(problem, _text("response", record.get("response"), limit), language)]
    responses = record.get("responses")
    most = min(settings.max_items_per_request, settings.max_queue_items)
    if not isinstance(responses, list) or not responses:
        raise BadLine('"responses" must be a non-empty list of strings')
    if len(responses) > most:
        raise BadLine(f'"responses" has {len(responses)} entries; the limit is {most}')
    return record, [ItemInput(problem, _text(f"responses[{i}]", r, limit), language)
                    for i, r in enumerate(responses)]


def check_input(path: Path, mode: str, settings: Settings, strict: bool) -> tuple[int, int, int]:
    """First pass: (good lines, items, malformed lines); each malformed line reported on stderr.

    With ``strict`` the first malformed line raises BadLine (after its report).
    """
    good = items = bad = 0
    with path.open("rb") as source:
        for number, raw in enumerate(source, start=1):
            try:
                parsed = parse_line(raw, mode, settings)
            except BadLine as exc:
                bad += 1
                print(f"{path}:{number}: {exc}; " + ("stopping (--strict)" if strict else "skipped"), file=sys.stderr)
                if strict:
                    raise
                continue
            if parsed is not None:
                good += 1
                items += len(parsed[1])
    return good, items, bad


Chunk = list[tuple[Record, list[ItemInput]]]


def read_chunks(path: Path, mode: str, settings: Settings, chunk_items: int) -> Iterator[Chunk]:
    """Second pass: well-formed records, grouped into chunks of at least ``chunk_items`` items."""
    chunk: Chunk = []
    size = 0
    with path.open("rb") as source:
        for raw in source:
            try:
                parsed = parse_line(raw, mode, settings)
            except BadLine:
                continue  # reported by the first pass
            if parsed is None:
                continue
            chunk.append(parsed)
            size += len(parsed[1])
            if size >= chunk_items:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def score_fields(outcome: ItemOutcome) -> Record:
    """What score mode adds to an input line."""
    return {"reward": outcome.reward, "score": outcome.score, "valid": outcome.valid,
            "extraction_status": outcome.extraction.status.value, "error": outcome.error,
            "truncated": outcome.truncated, "tokens": outcome.tokens}


def rank_fields(outcomes: Sequence[ItemOutcome]) -> Record:
    """What rank mode adds: the ranking by the server's rule (``shaping.ranking``)."""
    order = ranking([o.reward for o in outcomes])
    return {"best": order[0], "ranking": order, "rewards": [o.reward for o in outcomes],
            "scores": [o.score for o in outcomes], "valid": [o.valid for o in outcomes],
            "extraction_status": [o.extraction.status.value for o in outcomes],
            "errors": [o.error for o in outcomes], "truncated": [o.truncated for o in outcomes],
            "tokens": [o.tokens for o in outcomes]}


@dataclass
class Tally:
    """What the summary reports."""

    lines: int = 0
    rewards: list[float] = field(default_factory=list)
    valid: int = 0


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values (numpy's default rule)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


async def score_file(engine: Engine, path: Path, mode: str, out: IO[str], chunk_items: int, bar: Any) -> Tally:
    """Stream the input through the engine, two chunks in flight, writing lines in input order."""
    tally = Tally()
    pending: deque[tuple[Chunk, asyncio.Task[list[ItemOutcome]]]] = deque()

    async def finish_oldest() -> None:
        chunk, task = pending.popleft()
        outcomes = iter(await task)
        for record, items in chunk:
            mine = [next(outcomes) for _ in items]
            fields = score_fields(mine[0]) if mode == "score" else rank_fields(mine)
            out.write(json.dumps({**record, **fields}) + "\n")
            tally.lines += 1
            tally.rewards.extend(o.reward for o in mine)
            tally.valid += sum(o.valid for o in mine)
            bar.update(len(mine))

    in_flight = 0
    try:
        for chunk in read_chunks(path, mode, engine.settings, chunk_items):
            size = sum(len(items) for _, items in chunk)
            # The batcher refuses more than max_queue_items queued items: wait for room first.
            while pending and (len(pending) >= 2 or in_flight + size > engine.settings.max_queue_items):
                in_flight -= sum(len(items) for _, items in pending[0][0])
                await finish_oldest()
            inputs = [item for _, items in chunk for item in items]
            pending.append((chunk, asyncio.create_task(engine.score(inputs, timeout=math.inf))))
            in_flight += size
        while pending:
            await finish_oldest()
    finally:
        for _, task in pending:
            task.cancel()
    return tally


async def run(settings: Settings, scorer: Scorer, path: Path, mode: str, out: IO[str], chunk_items: int,
              bar: Any) -> Tally:
    """Start the engine, score the file, stop the engine."""
    engine = Engine(scorer, settings, Metrics())
    await engine.start()
    try:
        return await score_file(engine, path, mode, out, chunk_items, bar)
    finally:
        await engine.stop()


def summary(mode: str, tally: Tally, skipped: int, seconds: float, target: Path) -> str:
    """The closing lines on stderr: counts, speed, valid rate and reward quantiles."""
    items = len(tally.rewards)
    lines = [(f"codescaler-serve {mode}: {tally.lines} lines scored, {skipped} skipped; "
              f"{items} items in {seconds:.1f} s ({items / max(seconds, 1e-9):.1f} items/s)")]
    if items:
        ordered = sorted(tally.rewards)
        p10, p50, p90 = (quantile(ordered, q) for q in (0.1, 0.5, 0.9))
        lines.append(f"valid: {tally.valid}/{items} ({100 * tally.valid / items:.1f}%); "
                     f"reward p10 {p10:.4f}  p50 {p50:.4f}  p90 {p90:.4f}")
    lines.append(f"wrote {target}")
    return "\n".join(lines)


def build_parser(mode: str) -> argparse.ArgumentParser:
    """The flags of one mode: the input, the output, the run's own options and every server setting."""
    from service.cli import add_settings_flags

    what = '{"problem", "response"}' if mode == "score" else '{"problem", "responses": [...]}'
    parser = argparse.ArgumentParser(prog=f"codescaler-serve {mode}",
                                     description=f"{mode.capitalize()} a JSONL file of {what} lines offline.")
    parser.add_argument("input", type=Path, help="input JSONL file")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output JSONL file (written atomically)")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed line (exit code 1)")
    parser.add_argument("--chunk-items", type=int, default=512,
                        help="items handed to the engine at a time (two chunks in flight)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bar on stderr")
    add_settings_flags(parser)
    return parser


def main(args: Sequence[str]) -> None:
    """``codescaler-serve score|rank ...``: ``args[0]`` is the mode."""
    from tqdm import tqdm

    from service.cli import load_or_exit, parse_settings, setup_logging

    mode, rest = args[0], list(args[1:])
    options = vars(build_parser(mode).parse_args(rest))
    settings = parse_settings({k: v for k, v in options.items() if k not in OWN_OPTIONS})
    setup_logging(settings)
    source, target = options["input"], options["output"]
    chunk_items = max(1, min(options["chunk_items"], settings.max_queue_items // 2))
    try:
        good, items, bad = check_input(source, mode, settings, options["strict"])
    except BadLine:
        sys.exit(EXIT_BAD_INPUT)
    except OSError as exc:
        print(f"codescaler-serve {mode}: cannot read {source}: {exc.strerror}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if good == 0:
        print(f"codescaler-serve {mode}: nothing to score in {source}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    scorer = load_or_exit(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    started = time.monotonic()
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out, \
                tqdm(total=items, unit="item", file=sys.stderr, disable=not options["progress"]) as bar:
            tally = asyncio.run(run(settings, scorer, source, mode, out, chunk_items, bar))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, target)
    except KeyboardInterrupt:
        Path(temp_name).unlink(missing_ok=True)
        print(f"codescaler-serve {mode}: interrupted; {target} left unchanged", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    print(summary(mode, tally, bad, time.monotonic() - started, target), file=sys.stderr)
