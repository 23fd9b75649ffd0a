"""Unit tests for service.extraction: the three policies in seven languages, hostile input.

Fast tier: no torch, no network. Most cases are tables of (response, language) ->
(status, code) so that a changed rule shows up as one named row.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from service.extraction import Extraction, ExtractionStatus, extract
from service.syntax import SUPPORTED_LANGUAGES
from tests.programs import F, INVALID, VALID

S = ExtractionStatus
# A lenient-mode alias tag per language, to prove tags go through canonical_language.
ALIAS_TAG = {"python": "py", "cpp": "c++", "c": "C", "java": "Java", "javascript": "js", "go": "golang", "rust": "rs"}


def fenced(body: str, tag: str = "") -> str:
    """A response with prose around one fenced block."""
    return f"Here is my solution.\n{F}{tag}\n{body}\n{F}\nIt runs in O(n)."


# --- per-language tables -------------------------------------------------------------

LANGUAGE_CASES = [
    case
    for lang in SUPPORTED_LANGUAGES
    for case in (
        pytest.param("paper", fenced(VALID[lang], lang), lang, S.OK, VALID[lang], id=f"{lang}-paper-tagged-valid"),
        pytest.param("paper", fenced(VALID[lang]), lang, S.OK, VALID[lang], id=f"{lang}-paper-untagged-valid"),
        pytest.param("paper", fenced(INVALID[lang], lang), lang, S.SYNTAX_ERROR, None, id=f"{lang}-paper-tagged-invalid"),
        pytest.param("paper", fenced(INVALID[lang]), lang, S.SYNTAX_ERROR, None, id=f"{lang}-paper-untagged-invalid"),
        pytest.param("lenient", fenced(VALID[lang], ALIAS_TAG[lang]), lang, S.OK, VALID[lang], id=f"{lang}-lenient-alias-valid"),
        pytest.param("lenient", fenced(INVALID[lang]), lang, S.SYNTAX_ERROR, None, id=f"{lang}-lenient-untagged-invalid"),
    )
]


@pytest.mark.parametrize(("policy", "response", "language", "status", "code"), LANGUAGE_CASES)
def test_each_language(policy: str, response: str, language: str, status: S, code: str | None) -> None:
    assert extract(response, policy, language) == Extraction(status, language, code)


# --- paper policy: the authors' rule and its consequences ---------------------------

PAPER_CASES = [
    pytest.param(fenced("x = 1", "python"), S.OK, "x = 1", id="one-block"),
    pytest.param(f"{F}\nx = 1\n{F}", S.OK, "x = 1", id="untagged"),
    pytest.param(fenced("x = 1", "java"), S.OK, "x = 1", id="tag-ignored"),
    pytest.param(f"{F}python\n\n   \n  x = 1  \n\n{F}", S.OK, "x = 1", id="body-stripped"),
    pytest.param(f"Wrap code in {F}...{F} like this:\n{F}python\nx = 1\n{F}", S.OK, "x = 1", id="inline-before-block"),
    pytest.param(f"{F}python\nx = 1{F}", S.OK, "x = 1", id="close-on-code-line"),
    pytest.param("x = 1", S.NO_CODE, None, id="zero-blocks"),
    pytest.param("", S.NO_CODE, None, id="empty-response"),
    pytest.param(fenced("a = 1", "python") + fenced("b = 2", "python"), S.MULTIPLE_BLOCKS, None, id="two-blocks"),
    pytest.param(fenced("a = 1") + fenced("b = (") + fenced("c"), S.MULTIPLE_BLOCKS, None, id="three-blocks"),
    # \w* stops at "+", so no newline follows the tag: no match at all.
    pytest.param(fenced("x = 1", "c++"), S.NO_CODE, None, id="cpp-plus-tag"),
    pytest.param(f"{F}python \nx = 1\n{F}", S.NO_CODE, None, id="space-after-tag"),
    pytest.param(f"{F} python\nx = 1\n{F}", S.NO_CODE, None, id="space-before-tag"),
    pytest.param(f"{F}python\r\nx = 1\r\n{F}", S.NO_CODE, None, id="crlf-after-tag"),
    pytest.param(f"{F}python\nx = 1\n", S.NO_CODE, None, id="unclosed-fence"),
    pytest.param(f"Use {F}print(1){F} to print.", S.NO_CODE, None, id="inline-only"),
    # The inline span's closing fence is followed by a newline, so it opens a block
    # whose body runs to the real block's opening fence: one match, empty body.
    pytest.param(f"Call {F}foo{F}\n{F}python\nx = 1\n{F}", S.EMPTY, None, id="inline-at-line-end"),
    # A fence inside the code closes the block early: body "s = '" does not parse.
    pytest.param(f"{F}python\ns = '{F}'\nprint(s)\n{F}", S.SYNTAX_ERROR, None, id="fence-inside-body"),
    pytest.param(f"{F}python\n\n   \n{F}", S.EMPTY, None, id="empty-body"),
    pytest.param(f"{F}python\n{F}", S.EMPTY, None, id="no-body"),
    pytest.param(fenced("def f(:\n    pass", "python"), S.SYNTAX_ERROR, None, id="unparsable-body"),
]


@pytest.mark.parametrize(("response", "status", "code"), PAPER_CASES)
def test_paper_policy(response: str, status: S, code: str | None) -> None:
    assert extract(response) == Extraction(status, "python", code)


def test_paper_cpp_tag_fails_even_for_cpp() -> None:
    # The faithful rule ignores what the tag means; it cannot even see a c++ tag.
    assert extract(fenced(VALID["cpp"], "c++"), "paper", "cpp").status is S.NO_CODE


# Lenient reads tags, so a python request skips a java-tagged block that paper accepts;
# for every other block paper accepts, lenient must agree on the code.
@pytest.mark.parametrize(
    ("response", "status", "code"), [c for c in PAPER_CASES if c.values[1] is S.OK and c.id != "tag-ignored"]
)
def test_lenient_accepts_whatever_paper_accepts(response: str, status: S, code: str) -> None:
    assert extract(response, "lenient") == Extraction(S.OK, "python", code)


# --- lenient policy ------------------------------------------------------------------

LENIENT_CASES = [
    pytest.param(f"{F}python\r\nx = 1\r\ny = 2\r\n{F}\r\n", "python", S.OK, "x = 1\ny = 2", id="crlf"),
    pytest.param(f"{F}python   \t\nx = 1\n{F}", "python", S.OK, "x = 1", id="trailing-spaces-after-tag"),
    pytest.param(f"{F} python\nx = 1\n{F}", "python", S.OK, "x = 1", id="space-before-tag"),
    pytest.param(f"  {F}python\n  x = 1\n  {F}", "python", S.OK, "x = 1", id="indented-fence"),
    pytest.param(fenced("x = 1", "Python3"), "python", S.OK, "x = 1", id="alias-python3"),
    pytest.param(fenced("int x = 1;", "cxx"), "cpp", S.OK, "int x = 1;", id="alias-cxx"),
    pytest.param(fenced("int x = 1;", "cc"), "cpp", S.OK, "int x = 1;", id="alias-cc"),
    pytest.param(fenced("let x = 1;", "node"), "javascript", S.OK, "let x = 1;", id="alias-node"),
    pytest.param("````python\nx = 1\n````", "python", S.OK, "x = 1", id="four-backtick-fence"),
    pytest.param(fenced("a = 1") + fenced("b = 2"), "python", S.OK, "b = 2", id="last-block-wins"),
    pytest.param(fenced("a = 1") + fenced("b = ("), "python", S.OK, "a = 1", id="last-parsing-block-wins"),
    pytest.param(fenced("a = 1") + fenced("", "python"), "python", S.OK, "a = 1", id="empty-last-block-skipped"),
    pytest.param(fenced("x = 1", "python") + fenced("int y = 2;", "cpp"), "python", S.OK, "x = 1", id="skip-cpp-for-python"),
    pytest.param(fenced("int y = 2;", "cpp") + fenced("x = 1", "python"), "cpp", S.OK, "int y = 2;", id="skip-python-for-cpp"),
    pytest.param(fenced("x = 1", "python") + fenced("$ python run.py", "bash"), "python", S.OK, "x = 1", id="skip-unknown-tag"),
    pytest.param(fenced("var x = 1;", "C#"), "python", S.NO_CODE, None, id="only-other-language"),
    pytest.param(fenced("x = 1", "python"), "go", S.NO_CODE, None, id="tagged-python-requested-go"),
    pytest.param(fenced("package main") + "\n", "go", S.OK, "package main", id="untagged-counts-as-requested"),
    pytest.param(f"{F}python\nx = 1\n", "python", S.OK, "x = 1", id="unclosed-final-parses"),
    pytest.param(f"{F}python\nfor i in", "python", S.SYNTAX_ERROR, None, id="unclosed-final-rejected"),
    pytest.param(fenced("a = 1") + f"{F}python\nfor i in", "python", S.OK, "a = 1", id="unclosed-final-falls-back"),
    pytest.param(fenced("b = 2") + f"{F}python\nc = 3", "python", S.OK, "c = 3", id="unclosed-final-preferred"),
    pytest.param(f"{F}python\nx = 1{F}", "python", S.OK, "x = 1", id="close-glued-to-code"),
    pytest.param(f"Use {F}print(1){F} to print.", "python", S.NO_CODE, None, id="inline-only"),
    pytest.param(f"Call {F}foo{F}\n{F}python\nx = 1\n{F}", "python", S.OK, "x = 1", id="inline-at-line-end"),
    pytest.param(f"Type {F} to fence code:\n{F}python\nx = 1\n{F}", "python", S.OK, "x = 1", id="fence-in-prose"),
    pytest.param(fenced("") + fenced("  \n ", "python"), "python", S.EMPTY, None, id="all-empty"),
    pytest.param(fenced("a = (") + fenced("b = )"), "python", S.SYNTAX_ERROR, None, id="none-parse"),
    pytest.param("no fences here", "python", S.NO_CODE, None, id="zero-blocks"),
    # Only the newest 64 non-empty blocks are tried (a hostile-input bound).
    pytest.param(fenced("a = 1") + fenced("b = (") * 63, "python", S.OK, "a = 1", id="64th-newest-tried"),
    pytest.param(fenced("a = 1") + fenced("b = (") * 64, "python", S.SYNTAX_ERROR, None, id="65th-newest-not-tried"),
]


@pytest.mark.parametrize(("response", "language", "status", "code"), LENIENT_CASES)
def test_lenient_policy(response: str, language: str, status: S, code: str | None) -> None:
    assert extract(response, "lenient", language) == Extraction(status, language, code)


# --- none policy, languages, policies ------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        pytest.param("", id="empty"),
        pytest.param("  not code at all (\n", id="prose"),
        pytest.param(fenced("a = 1") + fenced("b = 2"), id="two-blocks-kept-whole"),
    ],
)
def test_none_policy_returns_the_response_untouched(response: str) -> None:
    assert extract(response, "none", "py") == Extraction(S.OK, "python", response)


@pytest.mark.parametrize("policy", ["paper", "lenient", "none"])
def test_unknown_language_is_a_status_for_every_policy(policy: str) -> None:
    assert extract(fenced("x = 1"), policy, "cobol") == Extraction(S.UNSUPPORTED_LANGUAGE, "cobol", None)


def test_unknown_policy_raises() -> None:
    with pytest.raises(ValueError, match="policy"):
        extract("x", "strict")


def test_valid_property() -> None:
    assert extract(fenced("x = 1")).valid
    assert not extract("x = 1").valid


# --- hostile input: a status, never an exception -------------------------------------

DEEP = 10_000
HOSTILE_CASES = [
    pytest.param(fenced("x = " + "(" * DEEP + "1" + ")" * DEEP), "python", S.SYNTAX_ERROR, id="python-deep-parens"),
    pytest.param(fenced("x = " + "[" * DEEP + "]" * DEEP), "python", S.SYNTAX_ERROR, id="python-deep-brackets"),
    pytest.param(fenced("x = " + "-" * 100_000 + "1"), "python", S.SYNTAX_ERROR, id="python-deep-unary"),
    pytest.param(fenced("x = " + "+".join(["1"] * 200_000)), "python", S.SYNTAX_ERROR, id="python-long-chain"),
    pytest.param(fenced("int x = " + "(" * DEEP + "1" + ")" * DEEP + ";"), "cpp", S.OK, id="cpp-deep-parens"),
    pytest.param(fenced("int x[] = {" + "[" * DEEP + "};"), "cpp", S.SYNTAX_ERROR, id="cpp-deep-brackets"),
    pytest.param(fenced("x = '\ud800'"), "python", S.SYNTAX_ERROR, id="python-lone-surrogate"),
    pytest.param(fenced('const char* s = "\ud800";'), "cpp", S.SYNTAX_ERROR, id="cpp-lone-surrogate"),
    pytest.param(fenced("x = 1\x00"), "python", S.SYNTAX_ERROR, id="python-nul"),
    pytest.param(fenced("int x = 1;\x00"), "cpp", S.SYNTAX_ERROR, id="cpp-nul"),
]


@pytest.mark.parametrize("policy", ["paper", "lenient"])
@pytest.mark.parametrize(("response", "language", "status"), HOSTILE_CASES)
def test_hostile_code(policy: str, response: str, language: str, status: S) -> None:
    assert extract(response, policy, language).status is status


def test_none_policy_keeps_a_lone_surrogate() -> None:
    assert extract("x = '\ud800'", "none").code == "x = '\ud800'"


MEGABYTE = 1 << 20
# Valid Python, garbage C++. Long lines keep ast.parse cheap (a megabyte of "x = 1"
# lines is ~175k AST nodes, ~3 s of ast.parse alone), so these cases time the scanning
# and tree-sitter, not CPython's AST construction.
LONG_LINE = "s = '" + "a" * 1000 + "'\n"
BIG_RESPONSES = [
    pytest.param(("x ``` y\n" * MEGABYTE)[:MEGABYTE], id="fence-per-line"),
    pytest.param("`" * 2 * MEGABYTE, id="2mb-backticks"),
    pytest.param(F + "a" * 2 * MEGABYTE, id="2mb-tag"),
    pytest.param(f"{F}\n(\n{F}\n" * (MEGABYTE // 10), id="100k-invalid-blocks"),
    pytest.param(f"{F}python\n" + LONG_LINE * (MEGABYTE // len(LONG_LINE)), id="1mb-unclosed-body"),
    pytest.param(fenced(LONG_LINE * (MEGABYTE // len(LONG_LINE))), id="1mb-body"),
    pytest.param(fenced("} ) ] x @ (\n" * (MEGABYTE // 12)), id="1mb-garbage-body"),
]


@pytest.mark.parametrize("language", ["python", "cpp"])
@pytest.mark.parametrize("policy", ["paper", "lenient", "none"])
@pytest.mark.parametrize("response", BIG_RESPONSES)
def test_megabyte_responses_get_a_status(response: str, policy: str, language: str) -> None:
    # No timing threshold here (speed lives in loadtests/); the tree-sitter work is
    # bounded by its CPU budget, which tests/test_syntax.py proves deterministically.
    result = extract(response, policy, language)
    assert result.status in set(S)


# --- threads ---------------------------------------------------------------------------


def test_concurrent_extraction_matches_sequential() -> None:
    jobs = [(fenced(VALID[lang], lang), policy, lang) for lang in SUPPORTED_LANGUAGES for policy in ("paper", "lenient")]
    jobs += [(fenced(INVALID[lang]), "lenient", lang) for lang in SUPPORTED_LANGUAGES]
    jobs += [(case.values[0], "paper", case.values[1]) for case in HOSTILE_CASES[:2]]
    jobs *= 8
    expected = [extract(*job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(lambda job: extract(*job), jobs)) == expected
