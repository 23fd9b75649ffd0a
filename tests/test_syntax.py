"""Unit tests for service.syntax: seven grammars, language names, the tree-sitter budget, threads.

Fast tier: no torch, no network.
"""

from __future__ import annotations

import threading

import pytest

from service import syntax
from service.syntax import SUPPORTED_LANGUAGES, canonical_language, is_valid_code
from tests.programs import INVALID, VALID


@pytest.mark.parametrize("language", SUPPORTED_LANGUAGES)
def test_is_valid_code_per_language(language: str) -> None:
    assert is_valid_code(VALID[language], language)
    assert not is_valid_code(INVALID[language], language)


@pytest.mark.parametrize(
    ("code", "language"),
    [
        pytest.param(VALID["python"], "cpp", id="python-as-cpp"),
        pytest.param(VALID["cpp"], "python", id="cpp-as-python"),
        pytest.param(VALID["go"], "java", id="go-as-java"),
        pytest.param(VALID["rust"], "javascript", id="rust-as-javascript"),
    ],
)
def test_code_is_judged_as_the_requested_language(code: str, language: str) -> None:
    assert not is_valid_code(code, language)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("python", "python"), ("PY", "python"), ("Python3", "python"),
        ("c++", "cpp"), ("CPP", "cpp"), ("cxx", "cpp"), ("cc", "cpp"),
        ("c", "c"), ("Java", "java"),
        ("js", "javascript"), ("JavaScript", "javascript"), ("node", "javascript"),
        ("go", "go"), ("golang", "go"), ("rust", "rust"), ("rs", "rust"),
        (" python ", "python"), ("c#", None), ("typescript", None), ("", None),
    ],
)  # fmt: skip
def test_canonical_language(name: str, canonical: str | None) -> None:
    assert canonical_language(name) == canonical


def test_is_valid_code_unknown_language_raises() -> None:
    with pytest.raises(ValueError, match="language"):
        is_valid_code("x = 1", "cobol")


def test_tree_sitter_budget_cancels_and_the_parser_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    big_valid = "int f() { return 1; }\n" * 5000
    assert is_valid_code(big_valid, "cpp")
    monkeypatch.setattr(syntax, "_TREE_SITTER_CPU_BUDGET_S", 0.0)
    assert not is_valid_code(big_valid, "cpp")  # cancelled: judged invalid
    monkeypatch.undo()
    # A cancelled parser that is not reset resumes the old parse and gets this wrong.
    assert is_valid_code(VALID["cpp"], "cpp")


def test_each_thread_gets_its_own_parser() -> None:
    mine = syntax._parsers.get("cpp")
    assert syntax._parsers.get("cpp") is mine  # cached within a thread
    theirs: list[object] = []
    worker = threading.Thread(target=lambda: theirs.append(syntax._parsers.get("cpp")))
    worker.start()
    worker.join()
    assert theirs and theirs[0] is not mine
