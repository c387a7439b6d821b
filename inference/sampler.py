"""The masked-diffusion sampler: fill a canvas of mask tokens in a few parallel steps.

Each step runs the denoiser over the canvas (the context's keys and values come from a cache)
and reads the output head only at the positions that can still change: masked positions
before the first committed end token (plus the committed ones when re-masking is on). Each such
position gets a token (argmax, or a sample for the extra candidates) and a score: confidence
(the token's probability), margin (top-1 minus top-2 probability) or negative entropy.

Then, per row, either a fixed share of the masked positions is committed (``steps`` given:
``ceil(masked / steps_left)`` best-scored positions) or every position whose confidence passes
``threshold`` (Fast-dLLM's parallel decoding; the best-scored one when none passes, so every
step commits at least one token). Options:

* ``remask_below``: a committed token whose probability has since fallen below this is masked
  again (at most two per row and step, ``max_remasks_per_position`` times per position), and
  predicted afresh on the next step.
* an end token (``fill_id``: end-of-infill) committed at position e fills every masked position
  after e with the end token at once: the model was trained with end tokens up to the end of
  the canvas, so the tail costs no further steps.
* a critic (the tree-sitter syntax check) can veto newly committed tokens between steps: they
  are masked again and that token is forbidden at that position.
* token healing (``heal``, per row): the canvas must start with a given text (the partial word
  the engine took back from the prefix). Until its committed run from the start covers that
  text, the row's leftmost masked position may take only the tokens that agree with the rest
  of the text (``heal_allowed``), so the model picks the word's tokenization; where one of them
  covers only part of it, that position is the only one the row commits in the step.

A row is finished when an end token (end-of-infill, or a newline in line mode) is committed and
every position before it is committed too, or when every position is committed.

Rows may have different canvas lengths (batched requests): ``run`` takes one length per row and
never reads or commits positions past a row's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch


class Cancelled(Exception):
    """The caller cancelled the request between two denoising steps."""


POLICIES = ("confidence", "margin", "entropy")


@dataclass
class SamplerSettings:
    policy: str = "confidence"  # "confidence" | "margin" | "entropy"
    steps: int | None = None  # None: threshold decoding; else commit n_masked / steps_left per step
    threshold: float = 0.9  # confidence a token needs to be committed in parallel (threshold decoding)
    remask_below: float | None = None
    temperature: float = 0.0  # 0: greedy (deterministic); > 0 samples, for extra candidates
    max_reviews_per_position: int = 3
    # Where the critic rejects a token, up to this many next-best tokens of the same step are
    # tried in its place before the position is masked again (0: mask at once).
    review_alternatives: int = 8
    max_remasks_per_position: int = 2
    # End tokens grow leftwards from a committed end token in the same step while the model's
    # choice there is an end token this likely (None: off). Canvases end in a run of end tokens
    # (training pads the middle with them), which a model is surest about at the run's left
    # edge: without this, a short infill in a long canvas costs one step per end token.
    end_run_threshold: float | None = 0.5
    # Semi-autoregressive decoding (LLaDA's sub-blocks, as a sliding window): only the first
    # ``window`` masked positions of a row may be committed in a step, so every token is chosen
    # next to text already decided. None: any position. A small model writes far less incoherent
    # text this way (repeated tokens at positions decided independently); bench/README.md.
    window: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown unmasking policy {self.policy!r} (confidence, margin, entropy)")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], not {self.threshold}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, not {self.steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1, not {self.window}")
        if self.remask_below is not None and not 0.0 < self.remask_below < 1.0:
            raise ValueError(f"remask_below must be in (0, 1), not {self.remask_below}")
        if self.end_run_threshold is not None and not 0.0 < self.end_run_threshold <= 1.0:
            raise ValueError(f"end_run_threshold must be in (0, 1], not {self.end_run_threshold}")


@dataclass
class StepView:
    """What a step callback sees: the canvas after the step (mask id where still masked)."""

    block: int
    step: int
    canvas: list[list[int]]
    committed: int
    # per row: the text its canvas starts with that is before the cursor (token healing), or ""
    heal: list[str] = field(default_factory=list)


class Critic(Protocol):
    def review(self, pieces: Sequence[str | None], newly_committed: Sequence[int], ended: bool) -> list[int]: ...


@dataclass
class BlockResult:
    tokens: list[list[int]]  # per row: the canvas tokens up to and including the end token, or the whole canvas
    ended: list[bool]  # per row: an end token closed the infill inside this block
    steps: int
    remasked_by_critic: int = 0
    remasked_low_confidence: int = 0
    row_steps: list[int] = field(default_factory=list)  # per row: the step at which it finished
    cancelled: list[bool] = field(default_factory=list)  # per row: its row_cancel() turned true


# (canvas [B, M], select [B, M] bool) -> logits [N, V] at the selected positions, row-major.
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (canvas [B, M], forbidden [B, M, V'] bool, reviews [B, M]) -> (token, prob, score), each [B, M].
# The GPU kernels' entry point (difill.kernels.hooks): no logits ever reach the host.
ConfidenceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


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
    """One block of denoising for B rows (candidates of one request, or several requests).

    ``logits_fn`` hides the backend and the cache. ``is_end`` marks the token ids that end the
    infill: a bool vector [V] shared by the rows, or [B, V] (requests in different modes).
    ``banned`` [V] are never produced (mask, pad, layout tokens). ``generator`` draws the
    samples of every sampled row; ``generators`` (one per row) overrides it for batches of
    requests, so each request samples as it would alone.
    """

    logits_fn: LogitsFn | None
    mask_id: int
    is_end: torch.Tensor
    banned: torch.Tensor
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    piece: Callable[[int], str] | None = None
    critics: Sequence[Critic | None] = ()
    cancel: Callable[[], bool] | None = None
    # Per row (batches of requests): a row whose flag turns true stops denoising and is reported
    # in BlockResult.cancelled, while the other rows go on.
    row_cancel: Sequence[Callable[[], bool] | None] = ()
    on_step: Callable[[StepView], None] | None = None
    generator: torch.Generator | None = None
    generators: Sequence[torch.Generator | None] | None = None
    fill_id: int | None = None  # end-of-infill: committing it fills the rest of the row
    confidence_fn: ConfidenceFn | None = None  # used instead of logits_fn for greedy rows without re-masking
    heal: Sequence[str | None] = ()  # per row: the text the canvas must start with (token healing)
    # text -> ([V] bool, whole): the tokens that agree with a canvas that must start with that
    # text, and whether each covers all of it. The engine's answers (cached there).
    heal_allowed: Callable[[str], tuple[torch.Tensor, bool]] | None = None

    def __post_init__(self) -> None:
        self._banned_ids = self.banned.nonzero()[:, 0]

    def run(self, rows: int, canvas_len: int | Sequence[int], block: int = 0, greedy_rows: int = 1,
            sampled: Sequence[bool] | None = None) -> BlockResult:
        """Denoise ``rows`` canvases of ``canvas_len`` tokens (one length, or one per row).

        Rows from ``greedy_rows`` on sample at ``settings.temperature`` (``sampled`` gives the
        flag per row instead). Raises :class:`Cancelled` when ``cancel()`` turns true.
        """
        s = self.settings
        lens = [int(canvas_len)] * rows if isinstance(canvas_len, int) else [int(n) for n in canvas_len]
        if len(lens) != rows or min(lens) < 1:
            raise ValueError(f"need one canvas length >= 1 per row, got {lens} for {rows} rows")
        width = max(lens)
        if sampled is None:
            sampled = [r >= greedy_rows for r in range(rows)]
        sampled = [bool(f) and s.temperature > 0 for f in sampled]
        is_end = self.is_end if self.is_end.dim() == 2 else self.is_end[None].expand(rows, -1)
        canvas = torch.full((rows, width), self.mask_id, dtype=torch.long)
        valid = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]
        columns = torch.arange(width)
        reviews = torch.zeros(rows, width, dtype=torch.long)
        remasks = torch.zeros(rows, width, dtype=torch.long)
        self._forbidden: torch.Tensor | None = None  # the critic's vetoes
        # Token healing: per row, the position being healed and the tokens it may not take.
        self._healing: dict[int, tuple[int, torch.Tensor, bool]] = {}
        heal = [h or None for h in self.heal] + [None] * (rows - len(self.heal))
        if any(heal) and (self.heal_allowed is None or self.piece is None):
            raise ValueError("token healing needs heal_allowed and piece")
        # For the critic: this step's best tokens at the selected positions (its second choices),
        # and per row the committed positions past a gap, to be judged once the gap is filled.
        self._ranked: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._unreviewed: list[set[int]] = [set() for _ in range(rows)]
        # and the last token of an unfinished run, which only the next one shows right or wrong
        # (`.` of `.5`): the critic's errors on it then count as rejections (last_blamed_old).
        self._provisional: list[set[int]] = [set() for _ in range(rows)]
        # (the kernels' confidence_fn takes short veto lists, not healing's vocabulary-wide restriction)
        use_confidence = self.confidence_fn is not None and not any(sampled) and s.remask_below is None and not any(heal)
        if not use_confidence and self.logits_fn is None:
            raise ValueError("Denoise needs a logits_fn for sampled rows or re-masking")
        done = [False] * rows
        cancelled = [False] * rows
        row_steps = [0] * rows
        critic_remasked = confidence_remasked = 0
        step = 0
        while not all(done):
            if self.cancel is not None and self.cancel():
                raise Cancelled()
            if self.row_cancel:
                for r, row_cancel in enumerate(self.row_cancel):
                    if not done[r] and row_cancel is not None and row_cancel():
                        done[r] = cancelled[r] = True
                if all(done):
                    break
            masked = (canvas == self.mask_id) & valid
            live = torch.tensor([not d for d in done])[:, None]
            # Positions after a committed end token can no longer change the infill.
            ends_at = torch.gather(is_end, 1, canvas) & ~masked & valid
            first = torch.where(ends_at.any(dim=1), ends_at.float().argmax(dim=1), torch.full((rows,), width))
            before_end = columns[None, :] < first[:, None]
            to_commit = masked & before_end & live
            still_masked = to_commit.sum(dim=1).tolist()  # per row: what the fixed-steps schedule divides
            if s.window is not None:
                # Only the first masked positions may be committed: the output head runs on them alone.
                share = [math.ceil(n / max(1, s.steps - step)) if s.steps is not None else 0 for n in still_masked]
                limit = torch.tensor([max(s.window, k) for k in share])
                to_commit &= to_commit.cumsum(dim=1) <= limit[:, None]
            self._healing = self._heal_positions(canvas, heal, masked)
            for r, (p, _, whole) in self._healing.items():
                if not whole:  # the word may be split: its tokens go in left to right, one per step
                    to_commit[r] &= columns == p
            select = to_commit | (valid & ~masked & before_end & live) if s.remask_below is not None else to_commit
            if use_confidence:
                token_all, prob_all, score_all = self.confidence_fn(canvas, self._vetoes(rows, width), reviews)
                tokens, token_prob, scores = token_all[select], prob_all[select].float(), score_all[select].float()
                current = None
            else:
                tokens, token_prob, scores, current = self._predict(canvas, select, reviews, sampled)
            selected = select.nonzero()  # [N, 2], row-major like the predictions
            counts = select.sum(dim=1).tolist()
            newly: list[list[int]] = [[] for _ in range(rows)]
            offset = 0
            for r in range(rows):
                n = counts[r]
                if done[r] or n == 0:
                    offset += n
                    continue
                sl = slice(offset, offset + n)
                offset += n
                pos = selected[sl, 1]
                is_masked = masked[r, pos]
                if s.remask_below is not None and current is not None and (s.steps is None or step + 1 < s.steps):
                    committed = ~is_masked
                    weak = committed & (current[sl] < s.remask_below) & (remasks[r, pos] < s.max_remasks_per_position)
                    if bool(weak.any()):
                        order = current[sl].masked_fill(~weak, float("inf")).argsort()[: min(2, int(weak.sum()))]
                        again = pos[order]
                        canvas[r, again] = self.mask_id
                        remasks[r, again] += 1
                        confidence_remasked += len(again)
                candidates = is_masked.nonzero()[:, 0]
                if len(candidates) == 0:
                    continue
                # A fixed number of steps commits k per step (the window widened to k above).
                k = max(1, math.ceil(still_masked[r] / max(1, s.steps - step))) if s.steps is not None else 1
                cand_pos = pos[candidates]
                cand_scores = scores[sl][candidates]
                if s.steps is not None:
                    pick = cand_scores.topk(min(k, len(candidates))).indices
                else:
                    sure = token_prob[sl][candidates] >= s.threshold
                    if s.window is not None:  # the leftmost goes in every step, the sure ones beside it
                        sure[0] = True
                    pick = sure.nonzero()[:, 0]
                    if len(pick) == 0:
                        pick = cand_scores.argmax()[None]
                chosen = cand_pos[pick]
                canvas[r, chosen] = tokens[sl][candidates][pick]
                if s.end_run_threshold is not None:
                    chosen = self._grow_end_run(canvas[r], is_end[r], cand_pos, tokens[sl][candidates],
                                                token_prob[sl][candidates], chosen)
                newly[r] = chosen.tolist()
            if self.fill_id is not None:
                self._fill_after_end(canvas, valid, columns)
            critic_remasked += self._review(canvas, newly, reviews, is_end)
            step += 1
            for r in range(rows):
                if not done[r]:
                    row = canvas[r, : lens[r]]
                    done[r] = first_end(row, is_end[r], self.mask_id) is not None or bool((row != self.mask_id).all())
                    row_steps[r] = step
            if self.on_step is not None:
                self.on_step(StepView(block, step, [canvas[r, : lens[r]].tolist() for r in range(rows)],
                                      int(((canvas != self.mask_id) & valid).sum()), [h or "" for h in heal]))
            if step >= 4 * width:  # the critic keeps vetoing: stop, trimming decides
                break
        tokens_out, ended = [], []
        for r in range(rows):
            row = canvas[r, : lens[r]]
            e = first_end(row, is_end[r], self.mask_id)
            values = row.tolist()
            if e is None:
                stop = values.index(self.mask_id) if self.mask_id in values else len(values)
                tokens_out.append(values[:stop])
                ended.append(stop < len(values))
            else:
                tokens_out.append(values[: e + 1])  # the end token decodes to "" or to text ending in a newline
                ended.append(True)
        return BlockResult(tokens_out, ended, step, critic_remasked, confidence_remasked, row_steps, cancelled)

    # ------------------------------------------------------------------ internals
    def _predict(self, canvas: torch.Tensor, select: torch.Tensor, reviews: torch.Tensor, sampled: Sequence[bool]):
        """Token, its probability, the policy score and (re-masking) the probability of the
        token already there, at each selected position."""
        s = self.settings
        logits = self.logits_fn(canvas, select).float()
        if len(self._banned_ids):
            logits.index_fill_(1, self._banned_ids.to(logits.device), float("-inf"))
        if self._forbidden is not None and bool((reviews[select] > 0).any()):
            vetoed = self._forbidden[select]  # [N, V]
            logits.masked_fill_(vetoed.to(logits.device), float("-inf"))
        if self._healing:
            rows_of = select.nonzero()
            for r, (p, forbidden, _) in self._healing.items():
                at = ((rows_of[:, 0] == r) & (rows_of[:, 1] == p)).nonzero()[:, 0]
                if len(at):
                    logits[at.to(logits.device)] = logits[at.to(logits.device)].masked_fill(forbidden.to(logits.device), float("-inf"))
        # The arithmetic runs where the logits are (the GPU): only [N]-sized results reach the host.
        probs = torch.softmax(logits, dim=-1)
        if self.critics:  # where the critic rejects a token, the next best ones stand in (see _review)
            top = probs.topk(min(s.review_alternatives + 1, probs.shape[-1]), dim=-1)
            self._ranked = (select, (top.values.cpu(), top.indices.cpu()))
        token_prob, tokens = probs.max(dim=-1)
        scores = token_prob if s.policy == "confidence" else score(probs, s.policy)
        current = None
        if s.remask_below is not None:
            committed = canvas[select].clamp(0, probs.shape[-1] - 1).to(probs.device)
            current = probs.gather(-1, committed[:, None])[:, 0].cpu()
        token_prob, tokens, scores = token_prob.cpu(), tokens.cpu(), scores.cpu()
        if any(sampled):
            rows_of = select.nonzero()[:, 0]
            gens = self.generators
            for r in range(len(sampled)):
                if not sampled[r]:
                    continue
                idx = (rows_of == r).nonzero()[:, 0]
                if len(idx) == 0:
                    continue
                gen = gens[r] if gens is not None else self.generator
                row_logits = logits[idx.to(logits.device)].cpu()  # the generators are CPU generators
                tempered = torch.softmax(row_logits / s.temperature, dim=-1)
                draw = torch.multinomial(tempered, 1, generator=gen)[:, 0]
                row_probs = torch.softmax(row_logits, dim=-1)
                tokens[idx] = draw
                token_prob[idx] = row_probs.gather(-1, draw[:, None])[:, 0]
                if s.policy == "confidence":
                    scores[idx] = token_prob[idx]
        return tokens, token_prob, scores, current

    def _grow_end_run(self, row: torch.Tensor, is_end: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor,
                      probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Commit end tokens right-to-left from each committed end token while the prediction
        one to the left is an end token with probability >= ``end_run_threshold``."""
        ok = is_end[tokens] & (probs >= self.settings.end_run_threshold)
        if not bool(ok.any()):
            return chosen
        predicted = {int(p): int(t) for p, t, good in zip(positions.tolist(), tokens.tolist(), ok.tolist()) if good}
        extra = []
        for p in sorted(predicted, reverse=True):
            right = p + 1
            if right < row.shape[0] and row[p] == self.mask_id and bool(is_end[row[right]]) and row[right] != self.mask_id:
                row[p] = predicted[p]
                extra.append(p)
        return torch.cat([chosen, torch.tensor(extra, dtype=torch.long)]) if extra else chosen

    def _fill_after_end(self, canvas: torch.Tensor, valid: torch.Tensor, columns: torch.Tensor) -> None:
        """Every masked position after a committed end-of-infill token becomes end-of-infill."""
        is_fill = canvas == self.fill_id
        if not bool(is_fill.any()):
            return
        first = torch.where(is_fill.any(dim=1), is_fill.float().argmax(dim=1), torch.full((canvas.shape[0],), canvas.shape[1]))
        tail = (columns[None, :] > first[:, None]) & (canvas == self.mask_id) & valid
        canvas[tail] = self.fill_id

    def _heal_positions(self, canvas: torch.Tensor, heal: Sequence[str | None], masked: torch.Tensor
                        ) -> dict[int, tuple[int, torch.Tensor, bool]]:
        """Per row still healing: its leftmost masked position, the tokens forbidden there and
        whether each allowed one covers the rest of the heal text.

        A row heals while the text of its committed run from position 0 does not yet cover its
        heal text; the run is always a start of that text (each of its tokens was restricted)."""
        out = {}
        for r, text in enumerate(heal):
            if not text:
                continue
            run = masked[r].nonzero()
            p = int(run[0]) if len(run) else canvas.shape[1]
            written = "".join(self.piece(t) for t in canvas[r, :p].tolist())
            if len(written) < len(text) and p < canvas.shape[1]:
                allowed, whole = self.heal_allowed(text[len(written):])
                out[r] = (p, ~allowed, whole)
        return out

    def _vetoes(self, rows: int, width: int) -> torch.Tensor:
        if self._forbidden is None:
            return torch.zeros(rows, width, self.banned.shape[0], dtype=torch.bool)
        return self._forbidden

    def _review(self, canvas: torch.Tensor, newly: list[list[int]], reviews: torch.Tensor, is_end: torch.Tensor) -> int:
        """Ask each row's critic about the tokens committed this step (and about those committed
        earlier past a gap, once it is filled). A rejected token is forbidden at its position and
        the next best token of this step's prediction there takes its place and is reviewed in
        turn (``review_alternatives`` rounds at most, no model call); where none is left, the
        position is masked again and predicted afresh next step. Returns the rejections."""
        if not self.critics or self.piece is None:
            return 0
        count = 0
        for r, critic in enumerate(self.critics):
            if r >= canvas.shape[0] or critic is None:
                continue
            changed = set(newly[r]) | self._unreviewed[r]
            rounds = 0
            while changed:
                rejected = self._judge_row(critic, canvas, r, changed, reviews, is_end)
                changed = set()
                for p in rejected:
                    if self._forbidden is None:
                        self._forbidden = torch.zeros(canvas.shape[0], canvas.shape[1], self.banned.shape[0], dtype=torch.bool)
                    self._forbidden[r, p, int(canvas[r, p])] = True
                    count += 1
                    alternative = self._alternative(r, p) if rounds < self.settings.review_alternatives else None
                    if alternative is None:
                        reviews[r, p] += 1
                        canvas[r, p] = self.mask_id
                    else:
                        canvas[r, p] = alternative
                        changed.add(p)
                rounds += 1
        return count

    def _judge_row(self, critic: Critic, canvas: torch.Tensor, r: int, changed: set[int], reviews: torch.Tensor,
                   is_end: torch.Tensor) -> list[int]:
        """One review of row r: the positions among ``changed`` that the critic rejects.

        Only the committed run from the start of the canvas can be judged: changed positions past
        a gap wait in ``_unreviewed``. The ended state is reviewed too, with the end token as a
        position of its own (its text before the line break, "" for end-of-infill): the critic
        blames it when the text may not end there (`foo(a` + end), and another token goes there.
        Not for a blank infill (an empty completion adds nothing); after
        ``max_reviews_per_position`` end vetoes in a row the last token before the end is
        rejected instead, so that an infill cannot grow forever.
        """
        limit = self.settings.max_reviews_per_position
        row = canvas[r].tolist()
        e = first_end(canvas[r], is_end[r], self.mask_id)
        upto = e if e is not None else len(row)
        pieces = [None if t == self.mask_id else self.piece(t) for t in row[:upto]]
        run = pieces.index(None) if None in pieces else upto
        self._unreviewed[r] = {p for p in changed if p >= run and p != e and row[p] != self.mask_id and not is_end[r][row[p]]}
        candidates = [p for p in sorted(changed) if p < run and int(reviews[r, p]) < limit]
        retreat = False
        if e is not None and (candidates or e in changed):
            pieces.append(self.piece(row[e]).split("\n", 1)[0])
            if "".join(pieces).strip() and int(reviews[r, e]) < limit:
                candidates.append(e)
                # Out of end vetoes: the infill may grow no further, so where it may not end
                # either, its last token goes instead (`.` + end: the `.` is tried again).
                retreat = self._forbidden is not None and int(self._forbidden[r][:, is_end[r]].sum()) >= limit
        provisional = {p for p in self._provisional[r] if p < run}
        self._provisional[r] = provisional
        if not candidates:
            return []
        rejected = [p for p in critic.review(pieces, candidates, e is not None) if p in candidates]
        if retreat and e in rejected:
            rejected.remove(e)
            last = max((p for p in range(e) if pieces[p].strip()), default=None)
            if last is not None and last not in rejected and int(reviews[r, last]) < limit:
                rejected.append(last)
        if not rejected:
            # Errors on earlier tokens: on a provisional one, or on any once the infill has ended
            # (it is about to be final), they are rejections too.
            old = getattr(critic, "last_blamed_old", ())
            rejected = [p for p in old if (p in provisional or e is not None) and int(reviews[r, p]) < limit]
        # A provisional token is settled by the first review after it that rejects nothing.
        self._provisional[r] = provisional - set(rejected) if rejected else set()
        if e is None and run - 1 in candidates and run - 1 not in rejected:
            self._provisional[r].add(run - 1)
        return rejected

    def _alternative(self, r: int, p: int) -> int | None:
        """The best token of this step's prediction at (r, p) that is neither banned nor forbidden
        there (None: no prediction was made there this step, or none is left)."""
        if self._ranked is None:
            return None
        select, (probs, tokens) = self._ranked
        if not bool(select[r, p]):
            return None
        index = int(select[:r].sum()) + int(select[r, :p].sum())
        for prob, token in zip(probs[index].tolist(), tokens[index].tolist()):
            if prob > 0 and not bool(self._forbidden[r, p, token]):
                return token
        return None
