"""The bound on ast.parse (unit tier): Python past it is a syntax error without being parsed."""

from __future__ import annotations

import ast

import pytest

from service import syntax
from service.extraction import ExtractionStatus, extract


def test_python_past_the_bound_is_a_syntax_error_without_ast_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[int] = []
    real_parse = ast.parse

    def counting(source: str, *args: object, **kwargs: object) -> ast.AST:
        parsed.append(len(source))
        return real_parse(source, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(syntax.ast, "parse", counting)
    line = "x = 1\n"
    under = line * (syntax._AST_MAX_CHARS // len(line) - 1)
    assert extract(f"```python\n{under}```").status is ExtractionStatus.OK
    assert parsed  # under the bound the authors' check runs
    parsed.clear()
    over = line * (syntax._AST_MAX_CHARS // len(line) + 1)
    assert len(over.strip()) > syntax._AST_MAX_CHARS
    assert extract(f"```python\n{over}```").status is ExtractionStatus.SYNTAX_ERROR
    assert parsed == []
