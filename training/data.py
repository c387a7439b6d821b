"""Infill-shaped training examples in the block-diffusion layout.

An example cuts a source file into prefix / middle / suffix the way an editor does (a line
tail from a random column, a whole line, a block of lines, a random span), tokenizes the three
parts separately (as the engine will at inference), and lays them out as

    context = [pad ...] <|suffix|> suffix <|prefix|> prefix <|middle|>     (causal)
    canvas  = middle tokens, then <|eoi|> up to the canvas length          (denoised)

or, for the bidirectional variant that the model card compares against (LLaDA/Dream style),
``[pad ...] <|bos|> prefix [canvas] suffix [pad ...]`` with full attention.

The canvas is followed by <|eoi|> so the model learns where an infill ends; a middle longer
than the canvas is cut and has no <|eoi|>, which teaches the model to go on in the next block.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from difill.inference.tokenizer import BOS, EOI, MIDDLE, PAD, PREFIX, SUFFIX, Tokenizer

SPAN_KINDS = ("line_tail", "whole_line", "block", "random")
SPAN_WEIGHTS = (0.35, 0.2, 0.3, 0.15)
PREFIX_CHARS = 2400  # more than any context budget needs; cut at a line start
SUFFIX_CHARS = 800


@dataclass
class Batch:
    context: torch.Tensor  # [B, C] int64: the tokens before the canvas
    canvas: torch.Tensor  # [B, M] int64, the clean targets
    after: torch.Tensor | None = None  # [B, S] the suffix after the canvas (bidirectional layout)


def load_texts(path: Path) -> list[tuple[str, str]]:
    """(text, language) of every file of a corpus split."""
    with open(path, encoding="utf-8") as f:
        return [(row["text"], row.get("language", "")) for row in map(json.loads, f)]


def choose_span(text: str, kind: str, rng: random.Random) -> tuple[int, int] | None:
    """Character offsets (start, end) of the middle, or None when the file has no such span."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    content_lines = [i for i, line in enumerate(lines) if line.strip()]
    if not content_lines:
        return None
    i = rng.choice(content_lines)
    line = lines[i].rstrip("\r\n")
    indent = len(line) - len(line.lstrip())
    if kind == "line_tail":
        col = rng.randint(indent, len(line))
        return starts[i] + col, starts[i] + len(line)
    if kind == "whole_line":
        return starts[i] + indent, starts[i] + len(line)
    if kind == "block":
        # The statement at line i and what is indented under it, up to 12 lines.
        j = i + 1
        while j < len(lines) and j - i < 12 and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        j = max(j, min(i + rng.randint(1, 4), len(lines)))
        end = starts[j] - len(lines[j - 1]) + len(lines[j - 1].rstrip("\r\n"))
        return starts[i] + indent, end
    start = rng.randrange(len(text))
    return start, min(len(text), start + rng.randint(1, 160))


def language_factors(sizes: dict[str, int], shares: dict[str, float]) -> dict[str, float]:
    """Per language, what a file's size is multiplied by so that the draws follow ``shares``
    (see InfillSampler); ``sizes``: each language's total size in the corpus."""
    listed = sum(share for language, share in shares.items() if sizes.get(language))
    rest = sum(size for language, size in sizes.items() if language not in shares)
    left = max(0.0, 1.0 - listed)
    return {language: shares[language] / size if language in shares else left / rest for language, size in sizes.items()}


class InfillSampler:
    """Draws batches of infill examples from a list of source texts, reproducibly from a seed."""

    def __init__(self, texts: list[tuple[str, str]], tokenizer: Tokenizer, context_len: int, suffix_budget: int, seed: int,
                 layout: str = "block", language_shares: dict[str, float] | None = None):
        """``texts``: (text, language) pairs. A file is drawn in proportion to its length (capped).
        ``language_shares`` sets the share of the draws that a language gets, whatever the corpus
        holds (it is mostly Python, the editors' files are not, and a corpus built on another
        machine holds other amounts): each listed language its share, the unlisted ones what is
        left in proportion to their size; 0 leaves a language out."""
        if layout not in {"block", "bidirectional"}:
            raise ValueError(f"unknown layout {layout!r}")
        self.layout = layout
        kept = [(t, language, min(len(t), 50_000)) for t, language in texts if len(t) > 200]
        sizes: dict[str, int] = {}
        for _, language, size in kept:
            sizes[language] = sizes.get(language, 0) + size
        factor = language_factors(sizes, language_shares or {})
        kept = [(t, w) for t, language, size in kept if (w := size * factor[language]) > 0]
        if not kept:
            raise ValueError(f"no file to draw from: {len(texts)} texts, language shares {language_shares}")
        self.texts = [t for t, _ in kept]
        # Cumulative once: ``choices(weights=...)`` would re-add 20k weights for every draw.
        self.cum_weights = list(itertools.accumulate(w for _, w in kept))
        self.tokenizer = tokenizer
        self.context_len = context_len
        self.suffix_budget = suffix_budget
        self.seed = seed
        self.rng = random.Random(seed)

    def draw_parts(self) -> tuple[str, str, str]:
        while True:
            text = self.rng.choices(self.texts, cum_weights=self.cum_weights)[0]
            kind = self.rng.choices(SPAN_KINDS, weights=SPAN_WEIGHTS)[0]
            span = choose_span(text, kind, self.rng)
            if span is None:
                continue
            start, end = span
            prefix_start = max(0, start - PREFIX_CHARS)
            if prefix_start > 0:  # begin at a line start, as the engine's budgeting does
                newline = text.find("\n", prefix_start, start)
                prefix_start = newline + 1 if newline >= 0 else prefix_start
            suffix_end = min(len(text), end + SUFFIX_CHARS)
            newline = text.rfind("\n", end, suffix_end)
            if suffix_end < len(text) and newline > end:
                suffix_end = newline
            return text[prefix_start:start], text[start:end], text[end:suffix_end]

    def batch_at(self, step: int, batch_size: int, canvas_len: int) -> Batch:
        """The batch of training step ``step``: a function of the seed and the step alone, so a
        resumed run sees the batches an uninterrupted one would, and loader workers can draw
        any step's batch in any order."""
        self.rng.seed(self.seed * 1_000_003 + step)
        return self.batch(batch_size, canvas_len)

    def batch(self, batch_size: int, canvas_len: int) -> Batch:
        parts = [self.draw_parts() for _ in range(batch_size)]
        encoded = self.tokenizer.encode_batch([p for triple in parts for p in triple])
        contexts, canvases, afters = [], [], []
        for b in range(batch_size):
            prefix, middle, suffix = encoded[3 * b: 3 * b + 3]
            suffix = suffix[: self.suffix_budget]
            canvas = middle[:canvas_len]
            canvases.append(canvas + [EOI] * (canvas_len - len(canvas)))
            if self.layout == "block":
                room = self.context_len - len(suffix) - 3
                prefix = prefix[-room:] if room > 0 else []
                context = [SUFFIX] + suffix + [PREFIX] + prefix + [MIDDLE]
                contexts.append([PAD] * (self.context_len - len(context)) + context)
            else:  # [bos] prefix [canvas] suffix, as the open dLLMs infill
                room = self.context_len - self.suffix_budget - 1
                prefix = prefix[-room:]
                contexts.append([PAD] * (room - len(prefix)) + [BOS] + prefix)
                afters.append(suffix + [PAD] * (self.suffix_budget - len(suffix)))
        return Batch(torch.tensor(contexts), torch.tensor(canvases), torch.tensor(afters) if afters else None)
