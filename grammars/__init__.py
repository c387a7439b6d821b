"""difill.grammars: what difill knows about the syntax of the languages it completes.

The engine and the language server use exactly these names:

* :func:`language_for` / :func:`supported_languages` / :class:`Language`: the language table
  (``languages.json`` and ``queries/<name>/*.scm``; per-language knowledge is data, not code).
* :func:`decide_mode`: "line" or "block" from the cursor's syntactic position.
* :func:`trim_completion`: cut a completion back to a syntactic boundary.
* :func:`stop_at_stutter`: cut a multi-line text before a line that repeats the one above it.
* :class:`SyntaxCritic`: judge a canvas between denoising steps ("no new syntax errors").
* :func:`syntax_errors`: ERROR + MISSING nodes of a parse.

Adding a language: a table entry in ``languages.json`` (grammar module and function, LSP ids,
extensions, brackets, comment markers, header pattern, block node types) and a
``queries/<name>/context.scm`` that captures its literals (@string), comments (@comment), other
prose (@text) and code nested in literals (@code). No code changes.
"""

from .critic import SyntaxCritic
from .languages import Language, language_for, load_languages, supported_languages
from .modes import BLOCK, LINE, decide_mode, stop_at_stutter, trim_completion
from .syntax import syntax_errors

__all__ = [
    "BLOCK",
    "LINE",
    "Language",
    "SyntaxCritic",
    "decide_mode",
    "language_for",
    "load_languages",
    "stop_at_stutter",
    "supported_languages",
    "syntax_errors",
    "trim_completion",
]
