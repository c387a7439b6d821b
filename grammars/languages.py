"""The language table: what difill knows about each supported language.

Everything that differs between languages is data: ``languages.json`` next to this file holds
the lexical and structural facts, and ``queries/<name>/*.scm`` holds tree-sitter queries. This
module only turns those files into :class:`Language` objects, so adding a language means adding
a table entry and a query folder, never a branch in code.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import tree_sitter

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_TABLE = _HERE / "languages.json"
_QUERIES = _HERE / "queries"


@dataclass(frozen=True)
class Language:
    """One supported language: its tree-sitter grammar plus the table facts the checks need.

    Instances are created once per process (see :func:`load_languages`) and shared, so they are
    immutable; the tree-sitter objects are excluded from comparison because they are identified
    by the name anyway.
    """

    name: str
    ts_language: tree_sitter.Language = field(repr=False, compare=False)
    language_ids: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    # (opener, closer) pairs, e.g. ("(", ")").
    brackets: tuple[tuple[str, str], ...] = ()
    # Characters that open a string literal; only used to stop a bracket scan at a literal that
    # tree-sitter has not been able to close yet (text still being written).
    string_quotes: tuple[str, ...] = ()
    line_comment: str | None = None
    block_comment: tuple[str, str] | None = None
    # Matches the text of a line that ends where a block begins (`def f():`, `if (x) {`).
    header_pattern: re.Pattern[str] = field(default=re.compile(r"(?!)"), repr=False, compare=False)
    # (line pattern, text that closes the block): how a completion that stops at a header is judged
    block_fillers: tuple[tuple[re.Pattern[str], str], ...] = field(default=(), repr=False, compare=False)
    # Nodes whose named children are statements or members.
    block_node_types: frozenset[str] = frozenset()
    # Indentation is syntax (Python): every new logical line's indent is checked.
    indent_based: bool = False
    # Compiled queries/<name>/*.scm, by file stem ("context" -> captures @string/@comment/...).
    queries: dict[str, tree_sitter.Query] = field(default_factory=dict, repr=False, compare=False)
    # Node types that the queries capture directly, by capture name (from `(type) @name` patterns).
    captured_node_types: dict[str, frozenset[str]] = field(default_factory=dict, repr=False, compare=False)

    def parser(self) -> tree_sitter.Parser:
        """A fresh parser for this language (parsers hold state, so each user gets its own)."""
        return tree_sitter.Parser(self.ts_language)

    @property
    def openers(self) -> dict[str, str]:
        """Opener -> closer."""
        return dict(self.brackets)

    @property
    def closers(self) -> dict[str, str]:
        """Closer -> opener."""
        return {c: o for o, c in self.brackets}

    @property
    def string_node_types(self) -> frozenset[str]:
        """Literal node types (queries/<name>/context.scm, capture @string)."""
        return self.captured_node_types.get("string", frozenset())

    @property
    def comment_node_types(self) -> frozenset[str]:
        """Comment node types (queries/<name>/context.scm, capture @comment)."""
        return self.captured_node_types.get("comment", frozenset())

    def query(self, stem: str) -> tree_sitter.Query | None:
        """The compiled query file ``queries/<name>/<stem>.scm``, or None if the language has none."""
        return self.queries.get(stem)


_SIMPLE_PATTERN = re.compile(r"^\s*\((\w+)\)\s*@([\w.]+)", re.MULTILINE)


def _load_queries(name: str, ts_language: tree_sitter.Language) -> tuple[dict[str, tree_sitter.Query], dict[str, frozenset[str]]]:
    """Compile every ``.scm`` file of a language (a broken file is a packaging bug, so it raises),
    and list the node types that simple `(type) @capture` patterns capture."""
    folder = _QUERIES / name
    queries: dict[str, tree_sitter.Query] = {}
    types: dict[str, set[str]] = {}
    if folder.is_dir():
        for path in sorted(folder.glob("*.scm")):
            source = path.read_text(encoding="utf-8")
            queries[path.stem] = tree_sitter.Query(ts_language, source)
            for node_type, capture in _SIMPLE_PATTERN.findall(source):
                types.setdefault(capture, set()).add(node_type)
    return queries, {capture: frozenset(found) for capture, found in types.items()}


def _build(entry: dict) -> Language:
    """Turn one table entry into a Language (imports the grammar wheel and compiles queries)."""
    grammar = entry["grammar"]
    module = importlib.import_module(grammar["module"])
    ts_language = tree_sitter.Language(getattr(module, grammar["function"])())
    block_comment = entry.get("block_comment")
    queries, captured = _load_queries(entry["name"], ts_language)
    return Language(
        name=entry["name"],
        ts_language=ts_language,
        language_ids=tuple(entry.get("language_ids", ())),
        extensions=tuple(ext.lower() for ext in entry.get("extensions", ())),
        brackets=tuple((pair[0], pair[1]) for pair in entry.get("brackets", ())),
        string_quotes=tuple(entry.get("string_quotes", ())),
        line_comment=entry.get("line_comment"),
        block_comment=(block_comment[0], block_comment[1]) if block_comment else None,
        header_pattern=re.compile(entry.get("header_pattern") or r"(?!)"),
        block_fillers=tuple((re.compile(pattern), text) for pattern, text in entry.get("block_fillers", ())),
        block_node_types=frozenset(entry.get("block_node_types", ())),
        indent_based=bool(entry.get("indent_based", False)),
        queries=queries,
        captured_node_types=captured,
    )


@functools.lru_cache(maxsize=1)
def _table() -> list[dict]:
    """The raw table entries, read once."""
    with _TABLE.open(encoding="utf-8") as handle:
        return list(json.load(handle)["languages"])


@functools.lru_cache(maxsize=None)
def _language(name: str) -> Language | None:
    """Build a language on first use: importing a grammar costs a few ms, so only pay for those used."""
    for entry in _table():
        if entry["name"] == name:
            try:
                return _build(entry)
            except (ImportError, AttributeError, ValueError, tree_sitter.QueryError) as error:
                # A missing grammar wheel makes the language unsupported, not the server broken.
                logger.warning("grammar for %s unavailable: %s", name, error)
                return None
    return None


def supported_languages() -> list[str]:
    """Names of the languages in the table, in table order."""
    return [entry["name"] for entry in _table()]


def load_languages() -> list[Language]:
    """Every language whose grammar can be loaded."""
    return [lang for lang in (_language(name) for name in supported_languages()) if lang is not None]


def language_for(language_id: str | None = None, path: str | None = None) -> Language | None:
    """The language of a document, from its LSP languageId, else from its file extension.

    The languageId wins because editors know better than file names (e.g. a `.h` file that the
    editor treats as C++). An unrecognised id falls back to the extension. Returns None for an
    unsupported document; the caller then completes unconstrained (and logs it).
    """
    if language_id:
        wanted = language_id.strip().lower()
        for entry in _table():
            if wanted == entry["name"] or wanted in (i.lower() for i in entry.get("language_ids", ())):
                return _language(entry["name"])
    if path:
        lowered = path.lower()
        best: tuple[int, str] | None = None
        for entry in _table():
            for ext in entry.get("extensions", ()):
                # Longest matching ending wins, so ".c++" is never mistaken for ".c".
                if lowered.endswith(ext.lower()) and (best is None or len(ext) > best[0]):
                    best = (len(ext), entry["name"])
        if best is not None:
            return _language(best[1])
    logger.debug("no language for languageId=%r path=%r", language_id, path)
    return None
