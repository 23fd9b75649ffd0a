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

Validity: Python uses ``ast.parse`` (the authors' check, the reference grammar); the
other languages use tree-sitter, where a tree is valid when it has no ERROR or MISSING
node. Hostile input (megabytes, deep nesting, NUL bytes, lone surrogates) yields a
status, never an exception.
"""

from __future__ import annotations

import ast
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from itertools import islice

import tree_sitter
import tree_sitter_c
import tree_sitter_cpp
import tree_sitter_go
import tree_sitter_java
import tree_sitter_javascript
import tree_sitter_rust


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


SUPPORTED_LANGUAGES: tuple[str, ...] = ("python", "cpp", "c", "java", "javascript", "go", "rust")
EXTRACTION_POLICIES: tuple[str, ...] = ("paper", "lenient", "none")

# Names callers and fence tags use, lower-cased, mapped to the canonical names above.
_ALIASES: dict[str, str] = {
    "python": "python", "py": "python", "python3": "python",
    "cpp": "cpp", "c++": "cpp", "cxx": "cpp", "cc": "cpp",
    "c": "c",
    "java": "java",
    "javascript": "javascript", "js": "javascript", "node": "javascript",
    "go": "go", "golang": "go",
    "rust": "rust", "rs": "rust",
}  # fmt: skip

# Each grammar package exposes ``language()``, a pointer to the compiled grammar.
_GRAMMARS: dict[str, Callable[[], object]] = {
    "cpp": tree_sitter_cpp.language,
    "c": tree_sitter_c.language,
    "java": tree_sitter_java.language,
    "javascript": tree_sitter_javascript.language,
    "go": tree_sitter_go.language,
    "rust": tree_sitter_rust.language,
}

# The authors' pattern, verbatim in meaning: ``\w*`` tag, newline right after it,
# shortest body up to the next fence. Linear: a failed start costs one tag scan, and a
# start that finds its closing fence consumes it, so no text is rescanned per start.
_PAPER_FENCE = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)

_FENCE = "```"

# Lenient mode tries at most this many blocks, newest first. Real responses hold a
# handful; the cap keeps a hostile response of 10^5 tiny blocks from costing 10^5 parses.
_MAX_LENIENT_CANDIDATES = 64

# CPU seconds of tree-sitter work one extract() or is_valid_code() call may spend.
# Valid code parses at about 0.6 us/byte (a 400 kB program in ~0.25 s), but error
# recovery on garbage costs ~16 us/byte with the GIL held: 400 kB of it froze every
# thread for ~6 s. Work past the budget is cancelled and the code judged invalid, which
# only garbage and programs above ~1.5 MB can reach. Thread CPU time, not wall time,
# so a busy machine does not change a verdict.
_TREE_SITTER_CPU_BUDGET_S = 1.0
_READ_CHUNK = 64 * 1024  # bytes handed to tree-sitter per read callback

# ast.parse cannot be interrupted and holds the GIL throughout: about 1 us per character
# of typical code and 3 us for dense one-statement lines (0.39 s for 400 kB froze the
# event loop). Longer Python is judged a syntax error without parsing, like code past the
# tree-sitter budget: 128 Ki characters is ~0.15-0.4 s of parsing at most, and more code
# than fits the longest inputs anyone scores (32k tokens at ~4 characters a token).
_AST_MAX_CHARS = 128 * 1024

# What ast.parse raises on hostile input: SyntaxError (including "too many nested
# parentheses"), ValueError (NUL bytes, lone surrogates via UnicodeEncodeError, huge int
# literals), RecursionError / MemoryError (deep nesting hits the parser's stack guard);
# OverflowError is defensive, never seen, but cheap to rule out.
_PYTHON_PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError)


def canonical_language(name: str) -> str | None:
    """The canonical language for a user or fence-tag name, or None when unknown.

    Case-insensitive and whitespace-tolerant so ``"C++"`` and ``" Python3 "`` both work.
    """
    return _ALIASES.get(name.strip().lower())


@cache
def _tree_sitter_language(language: str) -> tree_sitter.Language:
    """Build each grammar once; Language objects are immutable and shared by threads.

    ``cache`` may build one twice under a race; both results are equal, so no lock.
    """
    return tree_sitter.Language(_GRAMMARS[language]())


class _Parsers(threading.local):
    """One tree-sitter Parser per thread and language: Parser is not thread-safe and
    extraction runs in a thread pool."""

    def __init__(self) -> None:
        self.by_language: dict[str, tree_sitter.Parser] = {}

    def get(self, language: str) -> tree_sitter.Parser:
        parser = self.by_language.get(language)
        if parser is None:
            parser = tree_sitter.Parser(_tree_sitter_language(language))
            self.by_language[language] = parser
        return parser


_parsers = _Parsers()


def _parses(code: str, language: str, deadline: float) -> bool:
    """Whether ``code`` parses as canonical ``language``; never raises.

    ``deadline`` is a ``time.thread_time()`` value bounding tree-sitter's work. Text that
    cannot be encoded as UTF-8 (a lone surrogate) is invalid in every language: no
    compiler accepts such a file, ``ast.parse`` already rejects it, and one rule for all
    languages beats silently repairing the text for tree-sitter only.
    """
    if language == "python":
        if len(code) > _AST_MAX_CHARS:
            return False
        try:
            ast.parse(code)
        except _PYTHON_PARSE_ERRORS:
            return False
        return True
    try:
        source = code.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return _tree_sitter_parses(source, language, deadline)


def _tree_sitter_parses(source: bytes, language: str, deadline: float) -> bool:
    """True when the tree has no ERROR or MISSING node and was built before ``deadline``.

    Parsing through a read callback is what enables the progress callback, which both
    enforces the budget and runs Python every ~100 parser operations, so the GIL is
    handed to other threads (the event loop) instead of held for the whole parse.
    """
    parser = _parsers.get(language)
    try:
        tree = parser.parse(
            lambda offset, _point: source[offset : offset + _READ_CHUNK],
            progress_callback=lambda _offset, _has_error: time.thread_time() > deadline,
        )
    except ValueError:  # cancelled by the progress callback
        parser.reset()  # otherwise the next parse() would resume this one
        return False
    return not tree.root_node.has_error


def _deadline() -> float:
    """The tree-sitter budget's end, in this thread's CPU time."""
    return time.thread_time() + _TREE_SITTER_CPU_BUDGET_S


def is_valid_code(code: str, language: str) -> bool:
    """Whether ``code`` is syntactically valid ``language`` (any alias).

    Empty code is valid here (an empty module parses); rejecting empty bodies is
    ``extract``'s job, which reports them as EMPTY. Raises ValueError for an unknown
    language because that is a caller bug, not bad input.
    """
    canonical = canonical_language(language)
    if canonical is None:
        raise ValueError(f"unsupported language {language!r}")
    return _parses(code, canonical, _deadline())


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
    if not _parses(code, language, _deadline()):
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
    deadline = _deadline()  # one budget for the whole response, however many blocks
    for code in islice(reversed(candidates), _MAX_LENIENT_CANDIDATES):
        if _parses(code, language, deadline):
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
