"""The masked-diffusion sampler: fill a canvas of mask tokens in a few parallel steps.

Each step runs the denoiser over the canvas (the context's keys and values come from a cache),
scores every masked position (confidence = max probability, margin = top-1 minus top-2, or
negative entropy), and commits either a fixed share of the masked positions (``steps`` given)
or every position whose score passes ``threshold`` (Fast-dLLM's parallel decoding, at least one
per step). Optionally, committed tokens whose probability has fallen below ``remask_below`` are
masked again. A critic (the tree-sitter syntax check) can veto newly committed tokens between
steps: they are re-masked and that token is forbidden at that position.

A canvas row is finished when an end token (end-of-infill, or a newline in line mode) is
committed and every position before it is committed too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch


class Cancelled(Exception):
    """The caller cancelled the request between two denoising steps."""


@dataclass
class SamplerSettings:
    policy: str = "confidence"  # "confidence" | "margin" | "entropy"
    steps: int | None = None  # None: threshold decoding; else commit n_masked / steps_left per step
    threshold: float = 0.9
    remask_below: float | None = None
    temperature: float = 0.0  # 0: greedy (deterministic); > 0 samples, for extra candidates
    max_reviews_per_position: int = 3

    def __post_init__(self) -> None:
        if self.policy not in {"confidence", "margin", "entropy"}:
            raise ValueError(f"unknown unmasking policy {self.policy!r} (confidence, margin, entropy)")


@dataclass
class StepView:
    """What a step callback sees: the canvas after the step (mask id where still masked)."""

    block: int
    step: int
    canvas: list[list[int]]
    committed: int


class Critic(Protocol):
    def review(self, pieces: Sequence[str | None], newly_committed: Sequence[int], ended: bool) -> list[int]: ...


@dataclass
class BlockResult:
    tokens: list[list[int]]  # per row: the canvas tokens up to and including the end token, or the whole canvas
    ended: list[bool]  # per row: an end token closed the infill inside this block
    steps: int
    remasked_by_critic: int = 0


def score(probs: torch.Tensor, policy: str) -> torch.Tensor:
    """Higher is surer. probs: [..., V]."""
    if policy == "confidence":
        return probs.max(dim=-1).values
    if policy == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    return -entropy


def first_end(row: torch.Tensor, is_end: torch.Tensor, mask_id: int) -> int | None:
    """Index of the first committed end token if every position before it is committed."""
    ends = is_end[row].nonzero()
    if len(ends) == 0:
        return None
    e = int(ends[0])
    return e if bool((row[:e] != mask_id).all()) else None


@dataclass
class Denoise:
    """One block of denoising for B rows that share a context cache.

    ``logits_fn(canvas) -> [B, M, V]`` hides the backend and the cache; ``is_end`` marks the
    token ids that end the infill (a bool vector over the vocabulary).
    """

    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    mask_id: int
    is_end: torch.Tensor
    banned: torch.Tensor  # bool [V]: never produced (mask, pad, layout tokens)
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    piece: Callable[[int], str] | None = None
    critics: Sequence[Critic | None] = ()
    cancel: Callable[[], bool] | None = None
    on_step: Callable[[StepView], None] | None = None
    generator: torch.Generator | None = None

    def run(self, rows: int, canvas_len: int, block: int = 0, greedy_rows: int = 1) -> BlockResult:
        s = self.settings
        canvas = torch.full((rows, canvas_len), self.mask_id, dtype=torch.long)
        forbidden = torch.zeros(rows, canvas_len, self.banned.shape[0], dtype=torch.bool)
        reviews = torch.zeros(rows, canvas_len, dtype=torch.long)
        done = [False] * rows
        remasked = 0
        max_steps = s.steps or canvas_len
        step = 0
        while not all(done):
            if self.cancel is not None and self.cancel():
                raise Cancelled()
            logits = self.logits_fn(canvas).float()
            logits[:, :, self.banned] = float("-inf")
            logits.masked_fill_(forbidden, float("-inf"))
            probs = torch.softmax(logits if s.temperature <= 0 else logits / s.temperature, dim=-1)
            if s.temperature > 0 and rows > greedy_rows:
                sampled = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=self.generator).view(rows, canvas_len)
                tokens = probs.argmax(dim=-1)
                tokens[greedy_rows:] = sampled[greedy_rows:]
            else:
                tokens = probs.argmax(dim=-1)
            token_prob = probs.gather(-1, tokens[..., None])[..., 0]
            scores = score(probs, s.policy) if s.policy != "confidence" else token_prob
            newly: list[list[int]] = [[] for _ in range(rows)]
            for r in range(rows):
                if done[r]:
                    continue
                masked = (canvas[r] == self.mask_id).nonzero()[:, 0]
                if s.remask_below is not None and step + 1 < max_steps:
                    committed = (canvas[r] != self.mask_id).nonzero()[:, 0]
                    current = probs[r, committed].gather(-1, canvas[r, committed][:, None])[:, 0]
                    weak = committed[current < s.remask_below][:2]
                    canvas[r, weak] = self.mask_id
                    masked = (canvas[r] == self.mask_id).nonzero()[:, 0]
                if len(masked) == 0:
                    done[r] = True
                    continue
                row_scores = scores[r, masked]
                if s.steps is not None:
                    k = max(1, math.ceil(len(masked) / max(1, s.steps - step)))
                    chosen = masked[row_scores.topk(min(k, len(masked))).indices]
                else:
                    chosen = masked[token_prob[r, masked] >= s.threshold]
                    if len(chosen) == 0:
                        chosen = masked[row_scores.argmax()][None]
                canvas[r, chosen] = tokens[r, chosen]
                newly[r] = chosen.tolist()
            remasked += self._review(canvas, newly, forbidden, reviews)
            step += 1
            for r in range(rows):
                if not done[r]:
                    done[r] = first_end(canvas[r], self.is_end, self.mask_id) is not None or bool((canvas[r] != self.mask_id).all())
            if self.on_step is not None:
                self.on_step(StepView(block, step, canvas.tolist(), int((canvas != self.mask_id).sum())))
            if step >= 4 * canvas_len:  # the critic keeps vetoing: stop, trimming decides
                break
        tokens_out, ended = [], []
        for r in range(rows):
            e = first_end(canvas[r], self.is_end, self.mask_id)
            row = canvas[r].tolist()
            if e is None:
                stop = row.index(self.mask_id) if self.mask_id in row else len(row)
                tokens_out.append(row[:stop])
                ended.append(stop < len(row))
            else:
                tokens_out.append(row[: e + 1])  # the end token decodes to "" or to text ending in a newline
                ended.append(True)
        return BlockResult(tokens_out, ended, step, remasked)

    def _review(self, canvas: torch.Tensor, newly: list[list[int]], forbidden: torch.Tensor, reviews: torch.Tensor) -> int:
        """Ask each row's critic about the tokens committed this step; re-mask what it rejects."""
        if not self.critics or self.piece is None:
            return 0
        count = 0
        for r, critic in enumerate(self.critics):
            if critic is None or not newly[r]:
                continue
            row = canvas[r].tolist()
            e = first_end(canvas[r], self.is_end, self.mask_id)
            upto = e if e is not None else len(row)
            pieces = [None if t == self.mask_id else self.piece(t) for t in row[:upto]]
            candidates = [p for p in newly[r] if p < upto and int(reviews[r, p]) < self.settings.max_reviews_per_position]
            if not candidates:
                continue
            for p in critic.review(pieces, candidates, e is not None):
                if p in candidates:
                    forbidden[r, p, row[p]] = True
                    reviews[r, p] += 1
                    canvas[r, p] = self.mask_id
                    count += 1
        return count
