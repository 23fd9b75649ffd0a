"""Code extraction: find the program in a model response and say whether it parses.

Three policies:

``paper``
    The CodeScaler authors' rule, kept exactly: the regex ``r"```(\\w*)\\n(.*?)```"``
    (DOTALL) must match exactly once; ``code = body.strip()`` must be non-empty and
    parse. The tag is ignored (the requested language decides validity), so a ``c++``
    tag, a space or CRLF after the tag and an unclosed fence find no block at all.
``lenient``
    Markdown as models really write it: any info string, spaces, CRLF, aliases, several
    blocks (the last one in the requested language that parses wins), an unclosed last
    fence.
``none``
    The whole response is the code, untouched and ungated (general reward models).

Validity is ``service.syntax``'s (``ast.parse`` for Python, tree-sitter for the others).
Hostile input (megabytes, deep nesting, NUL bytes, lone surrogates) yields a status,
never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from itertools import islice

from service.syntax import budget_deadline, canonical_language, parses


class ExtractionStatus(StrEnum):
    """Why an extraction did or did not yield code; the values appear in API responses."""

    OK = "ok"
    NO_CODE = "no_code"
    MULTIPLE_BLOCKS = "multiple_blocks"
    SYNTAX_ERROR = "syntax_error"
    EMPTY = "empty"
    UNSUPPORTED_LANGUAGE = "unsupported_language"


@dataclass(frozen=True, slots=True)
class Extraction:
    """The outcome for one response.

    ``language`` is the canonical name the code was judged as (the name as given when it
    is unsupported); ``code`` is set only when ``status`` is OK, so callers cannot score
    a half-extracted program by accident.
    """

    status: ExtractionStatus
    language: str
    code: str | None

    @property
    def valid(self) -> bool:
        """True when code was found and parses; shaping gives invalid items 0.0."""
        return self.status == ExtractionStatus.OK


EXTRACTION_POLICIES: tuple[str, ...] = ("paper", "lenient", "none")

# The authors' pattern, verbatim in meaning: ``\w*`` tag, newline right after it,
# shortest body up to the next fence. Linear: a failed start costs one tag scan, and a
# start that finds its closing fence consumes it, so no text is rescanned per start.
_PAPER_FENCE = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)

_FENCE = "```"

# Lenient mode tries at most this many blocks, newest first. Real responses hold a
# handful; the cap keeps a hostile response of 10^5 tiny blocks from costing 10^5 parses.
_MAX_LENIENT_CANDIDATES = 64


def _extract_paper(response: str, language: str) -> Extraction:
    """The authors' rule: exactly one regex match, stripped, non-empty, parsing."""
    # Two matches already decide MULTIPLE_BLOCKS; stop there instead of collecting
    # every match of a hostile response.
    matches = list(islice(_PAPER_FENCE.finditer(response), 2))
    if not matches:
        return Extraction(ExtractionStatus.NO_CODE, language, None)
    if len(matches) > 1:
        return Extraction(ExtractionStatus.MULTIPLE_BLOCKS, language, None)
    code = matches[0].group(2).strip()
    return _judge(code, language)


def _judge(code: str, language: str) -> Extraction:
    """EMPTY, SYNTAX_ERROR or OK for one stripped candidate."""
    if not code:
        return Extraction(ExtractionStatus.EMPTY, language, None)
    if not parses(code, language, budget_deadline()):
        return Extraction(ExtractionStatus.SYNTAX_ERROR, language, None)
    return Extraction(ExtractionStatus.OK, language, code)


def _lenient_blocks(response: str) -> Iterator[tuple[str, str]]:
    """Yield ``(tag, body)`` for each fenced block in order; the last may be unclosed.

    Line-based, so prose around fences cannot shift them. Outside a block, a line with an
    odd number of fences opens one (an even number is inline code such as
    ```` ```x``` ````) when the text after its last fence is a single word or nothing:
    that word is the tag (``c++``, ``python3``, ``C#``). Inside a block, the first line
    holding a fence closes it, and the text before that fence is the body's last line,
    as under the paper rule. CRLF line ends are dropped from fences and bodies alike.
    """
    tag: str | None = None  # None while outside a block
    body: list[str] = []
    for raw_line in response.split("\n"):
        line = raw_line.removesuffix("\r")
        if tag is None:
            if line.count(_FENCE) % 2 == 1:
                info = line.rsplit(_FENCE, 1)[1].split()
                if len(info) <= 1:
                    tag = info[0] if info else ""
                    body = []
        elif _FENCE in line:
            body.append(line.split(_FENCE, 1)[0])
            yield tag, "\n".join(body)
            tag = None
        else:
            body.append(line)
    if tag is not None:
        yield tag, "\n".join(body)


def _extract_lenient(response: str, language: str) -> Extraction:
    """The last block in ``language`` (untagged blocks count) whose body parses.

    NO_CODE when no block is in the language, EMPTY when all such blocks are empty,
    SYNTAX_ERROR when some are non-empty but none parses.
    """
    bodies = [
        body.strip()
        for tag, body in _lenient_blocks(response)
        if not tag or canonical_language(tag) == language
    ]
    if not bodies:
        return Extraction(ExtractionStatus.NO_CODE, language, None)
    candidates = [body for body in bodies if body]
    if not candidates:
        return Extraction(ExtractionStatus.EMPTY, language, None)
    deadline = budget_deadline()  # one budget for the whole response, however many blocks
    for code in islice(reversed(candidates), _MAX_LENIENT_CANDIDATES):
        if parses(code, language, deadline):
            return Extraction(ExtractionStatus.OK, language, code)
    return Extraction(ExtractionStatus.SYNTAX_ERROR, language, None)


def extract(response: str, policy: str = "paper", language: str = "python") -> Extraction:
    """Extract and validate the code in ``response`` under ``policy`` for ``language``.

    Never raises for any response text. Raises ValueError for an unknown policy: the
    HTTP layer validates policies, so reaching here with one is a bug. An unknown
    language is a property of the request, so it is a status (for every policy,
    ``none`` included, so one request field means the same thing everywhere).
    """
    if policy not in EXTRACTION_POLICIES:
        raise ValueError(f"unknown extraction policy {policy!r}")
    canonical = canonical_language(language)
    if canonical is None:
        return Extraction(ExtractionStatus.UNSUPPORTED_LANGUAGE, language, None)
    if policy == "none":
        return Extraction(ExtractionStatus.OK, canonical, response)
    if policy == "paper":
        return _extract_paper(response, canonical)
    return _extract_lenient(response, canonical)
