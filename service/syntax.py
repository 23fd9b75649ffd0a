"""Syntax validity: whether code parses in one of the supported languages, within a CPU budget.

Python uses ``ast.parse`` (the CodeScaler authors' check, the reference grammar); the
other languages use tree-sitter, where a tree is valid when it has no ERROR or MISSING
node. Language names go through one alias table (``canonical_language``). Hostile code
(megabytes, deep nesting, NUL bytes, lone surrogates) is judged invalid, never raises.
"""

from __future__ import annotations

import ast
import threading
import time
from collections.abc import Callable
from functools import cache

import tree_sitter
import tree_sitter_c
import tree_sitter_cpp
import tree_sitter_go
import tree_sitter_java
import tree_sitter_javascript
import tree_sitter_rust

SUPPORTED_LANGUAGES: tuple[str, ...] = ("python", "cpp", "c", "java", "javascript", "go", "rust")

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


def parses(code: str, language: str, deadline: float) -> bool:
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


def budget_deadline() -> float:
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
    return parses(code, canonical, budget_deadline())
