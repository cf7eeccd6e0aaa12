"""`{index}` templates of the [fleet] table: "zone-{index % 3}", "emu-{index:04}".

Each `{...}` holds an integer expression of `index` (the node's number in its group) with
+ - * // % and parentheses, and an optional format spec after ':'. The expression is parsed
with `ast` and only those nodes are accepted, so a config file can never run code.
"""

from __future__ import annotations

import ast
import operator
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

_OPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_FORMAT_SPEC = re.compile(r"[<>^=]?[+\- ]?0?\d*[bdoxX]?")
Expr = Callable[[int], int]


class TemplateError(ValueError):
    pass


def _compile(node: ast.expr, text: str) -> Expr:
    if isinstance(node, ast.Name) and node.id == "index":
        return lambda i: i
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
        return lambda _: value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _compile(node.operand, text)
        return lambda i: -inner(i)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        op, left, right = _OPS[type(node.op)], _compile(node.left, text), _compile(node.right, text)
        if type(node.op) in (ast.FloorDiv, ast.Mod) and isinstance(node.right, ast.Constant) and node.right.value == 0:
            raise TemplateError(f"{{{text}}} divides by zero")
        return lambda i: op(left(i), right(i))
    raise TemplateError(
        f"{{{text}}} is not an integer expression of index (allowed: index, integers, + - * // % and parentheses)"
    )


@dataclass(frozen=True)
class Template:
    """A string with `{expr[:spec]}` fields; render(index) fills them in."""

    text: str
    parts: tuple[str | tuple[Expr, str], ...]

    @property
    def constant(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    def render(self, index: int) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                expr, spec = part
                out.append(format(expr(index), spec))
        return "".join(out)


def parse_template(text: str) -> Template:
    """Raises TemplateError with a message naming the bad field."""
    parts: list[str | tuple[Expr, str]] = []
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(f"{text!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for literal, field, spec, conversion in fields:
        if literal:
            parts.append(literal)
        if field is None:
            continue
        if conversion:
            raise TemplateError(f"{{{field}!{conversion}}}: conversions are not supported")
        if not _FORMAT_SPEC.fullmatch(spec or ""):
            raise TemplateError(f"{{{field}:{spec}}}: {spec!r} is not an integer format spec such as 04 or x")
        try:
            tree = ast.parse(field.strip() or "''", mode="eval")
        except SyntaxError:
            raise TemplateError(f"{{{field}}} is not an expression") from None
        parts.append((_compile(tree.body, field), spec or ""))
    return Template(text, tuple(parts))
