"""`--where` filters for queries: a tiny, strict grammar parsed into a tree, never pasted into SQL.

    expr   := or ;  or := and ("OR" and)* ;  and := not ("AND" not)* ;  not := "NOT" not | atom
    atom   := "(" expr ")" | COLUMN op LITERAL | COLUMN ["NOT"] "IN" "(" LITERAL ("," LITERAL)* ")"
            | COLUMN "IS" ["NOT"] "NULL"
    op     := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="
    LITERAL:= 'single-quoted string' ('' escapes a quote) | number

Columns come from a whitelist with types (strings compare with strings, numbers with numbers). The tree
turns into a pyarrow compute expression or into a DuckDB predicate with `?` parameters; values never
become SQL text. Anything else is rejected with the position of the offending token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines.errors import PipelineError
from pipelines.store.schema import TABLES, meta_columns, table_schema


def _column_kinds(table: str) -> dict[str, str]:
    """The filterable columns of `table` (its metadata columns, the geo scalars included) -> "str" | "num",
    from the store's schema. `datetime` is filtered by --after / --before, not here."""
    schema = table_schema(table, 1)
    kinds = {}
    for name in meta_columns(table):
        t = schema.field(name).type
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            kinds[name] = "num"
        elif pa.types.is_string(t):
            kinds[name] = "str"
    return kinds


COLUMNS: dict[str, dict[str, str]] = {table: _column_kinds(table) for table in TABLES}
OPS = ("=", "!=", "<>", "<", "<=", ">", ">=")
MAX_LENGTH = 2000

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<op><=|>=|<>|!=|=|<|>)|(?P<punct>[(),])|(?P<word>[A-Za-z_][A-Za-z0-9_]*))"
)
_KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL"}


class FilterError(PipelineError, ValueError):
    """The filter text is not in the grammar; the message says where and why."""


@dataclass(frozen=True)
class Cmp:
    column: str
    op: str
    value: Any


@dataclass(frozen=True)
class In:
    column: str
    values: tuple
    negated: bool = False


@dataclass(frozen=True)
class IsNull:
    column: str
    negated: bool = False


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    left: Any
    right: Any


@dataclass(frozen=True)
class Not:
    operand: Any


@dataclass(frozen=True)
class _Tok:
    kind: str
    value: Any
    pos: int


def _tokenize(text: str) -> list[_Tok]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"--where: unexpected character {text[pos:].lstrip()[:1]!r} at position {pos}")
        kind = m.lastgroup
        raw = m.group(kind)
        start = m.start(kind)
        if kind == "str":
            tokens.append(_Tok("lit", raw[1:-1].replace("''", "'"), start))
        elif kind == "num":
            tokens.append(_Tok("lit", float(raw) if any(c in raw for c in ".eE") else int(raw), start))
        elif kind == "word" and raw.upper() in _KEYWORDS:
            tokens.append(_Tok(raw.upper(), raw.upper(), start))
        else:
            tokens.append(_Tok(kind, raw, start))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str, table: str) -> None:
        if table not in COLUMNS:
            raise FilterError(f"unknown table {table!r}")
        if len(text) > MAX_LENGTH:
            raise FilterError(f"--where: filter longer than {MAX_LENGTH} characters")
        self.text = text
        self.columns = COLUMNS[table]
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> _Tok | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, kind: str | None = None, value: str | None = None) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise FilterError(f"--where: {self.text!r} ends early; expected {value or kind or 'more'}")
        if (kind and tok.kind != kind) or (value and tok.value != value):
            want = value or {"lit": "a quoted string or a number", "word": "a column name"}.get(kind, kind)
            raise FilterError(f"--where: expected {want} at position {tok.pos}, found {tok.value!r}")
        self.i += 1
        return tok

    def parse(self):
        if not self.tokens:
            raise FilterError("--where: empty filter")
        node = self.parse_or()
        if self.peek() is not None:
            tok = self.peek()
            raise FilterError(f"--where: unexpected {tok.value!r} at position {tok.pos}")
        return node

    def parse_or(self):
        node = self.parse_and()
        while self.peek() is not None and self.peek().kind == "OR":
            self.take()
            node = BoolOp("or", node, self.parse_and())
        return node

    def parse_and(self):
        node = self.parse_not()
        while self.peek() is not None and self.peek().kind == "AND":
            self.take()
            node = BoolOp("and", node, self.parse_not())
        return node

    def parse_not(self):
        if self.peek() is not None and self.peek().kind == "NOT":
            self.take()
            return Not(self.parse_not())
        return self.parse_atom()

    def column(self) -> str:
        tok = self.take("word")
        if tok.value not in self.columns:
            raise FilterError(
                f"--where: unknown column {tok.value!r} at position {tok.pos}; "
                f"filterable columns: {', '.join(self.columns)}"
            )
        return tok.value

    def literal(self, column: str):
        tok = self.take("lit")
        want = self.columns[column]
        if (want == "str") != isinstance(tok.value, str):
            kind = "a quoted string" if want == "str" else "a number"
            raise FilterError(
                f"--where: column {column!r} needs {kind}, got {tok.value!r} at position {tok.pos}"
            )
        return tok.value

    def parse_atom(self):
        tok = self.peek()
        if tok is not None and tok.kind == "punct" and tok.value == "(":
            self.take()
            node = self.parse_or()
            self.take("punct", ")")
            return node
        column = self.column()
        tok = self.peek()
        if tok is None:
            raise FilterError(f"--where: {self.text!r} ends after column {column!r}")
        if tok.kind == "op":
            self.take()
            return Cmp(column, "!=" if tok.value == "<>" else tok.value, self.literal(column))
        if tok.kind == "IS":
            self.take()
            negated = self.peek() is not None and self.peek().kind == "NOT"
            if negated:
                self.take()
            self.take("NULL", "NULL")
            return IsNull(column, negated)
        negated = tok.kind == "NOT"
        if negated:
            self.take()
        if self.peek() is not None and self.peek().kind == "IN":
            self.take()
            self.take("punct", "(")
            values = [self.literal(column)]
            while self.peek() is not None and self.peek().value == ",":
                self.take()
                values.append(self.literal(column))
            self.take("punct", ")")
            return In(column, tuple(values), negated)
        tok = self.peek()
        found = tok.value if tok else "end of text"
        raise FilterError(
            f"--where: after column {column!r} expected an operator ({' '.join(OPS)}), IN or IS NULL, "
            f"found {found!r}" + (f" at position {tok.pos}" if tok else "")
        )


def parse_where(text: str, table: str = "images"):
    """Parse `--where` text into a filter tree (raises FilterError)."""
    return _Parser(text, table).parse()


def to_arrow(node):
    """The filter tree as a pyarrow compute expression (for pyarrow datasets / Table.filter)."""
    import pyarrow.compute as pc

    if isinstance(node, BoolOp):
        left, right = to_arrow(node.left), to_arrow(node.right)
        return (left & right) if node.op == "and" else (left | right)
    if isinstance(node, Not):
        return ~to_arrow(node.operand)
    if isinstance(node, IsNull):
        expr = pc.field(node.column).is_null()
        return ~expr if node.negated else expr
    if isinstance(node, In):
        expr = pc.field(node.column).isin(list(node.values))
        return ~expr if node.negated else expr
    f, v = pc.field(node.column), node.value
    return {
        "=": lambda: f == v,
        "!=": lambda: f != v,
        "<": lambda: f < v,
        "<=": lambda: f <= v,
        ">": lambda: f > v,
        ">=": lambda: f >= v,
    }[node.op]()


def to_sql(node) -> tuple[str, list[Any]]:
    """The filter tree as a DuckDB predicate with `?` placeholders and its parameter list.

    Column names come from the whitelist and are double-quoted; every value is a parameter.
    """
    if isinstance(node, BoolOp):
        ls, lp = to_sql(node.left)
        rs, rp = to_sql(node.right)
        return f"({ls} {node.op.upper()} {rs})", lp + rp
    if isinstance(node, Not):
        s, p = to_sql(node.operand)
        return f"(NOT {s})", p
    col = f'"{node.column}"'
    if isinstance(node, IsNull):
        return f"({col} IS {'NOT ' if node.negated else ''}NULL)", []
    if isinstance(node, In):
        marks = ", ".join("?" for _ in node.values)
        return f"({col} {'NOT ' if node.negated else ''}IN ({marks}))", list(node.values)
    return f"({col} {node.op} ?)", [node.value]


def columns_of(node) -> set[str]:
    if isinstance(node, BoolOp):
        return columns_of(node.left) | columns_of(node.right)
    if isinstance(node, Not):
        return columns_of(node.operand)
    return {node.column}
