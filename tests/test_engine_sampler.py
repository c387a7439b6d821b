"""The denoising loop's rules, step by step, on hand-made distributions.

The sampler is an algorithm over the model's output: which positions to commit, when to stop,
what to re-mask. These tests feed it distributions constructed so that each rule has exactly
one right answer (the engine tests run the same loop with the real model).
"""

from __future__ import annotations

import pytest
import torch

from difill.inference.sampler import Cancelled, Denoise, SamplerSettings, StepView, first_end, score

V = 12
MASK, END, A, B, C, D = 0, 1, 2, 3, 4, 5


def table(rows: list[dict[int, float]]) -> torch.Tensor:
    """Logits [M, V] whose softmax puts the given probabilities on the given tokens (the rest
    spread evenly over the other tokens)."""
    out = torch.empty(len(rows), V)
    for i, probs in enumerate(rows):
        rest = (1.0 - sum(probs.values())) / (V - len(probs))
        p = torch.full((V,), max(rest, 1e-9))
        for token, value in probs.items():
            p[token] = value
        out[i] = p.log()
    return out


class Fixed:
    """A logits_fn with one fixed distribution per position (or a function of the canvas);
    records what it was asked."""

    def __init__(self, per_position, rows: int = 1):
        self.per_position = per_position
        self.rows = rows
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, canvas: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        self.calls.append((canvas.clone(), select.clone()))
        full = self.per_position(canvas) if callable(self.per_position) else self.per_position
        if full.dim() == 2:
            full = full[None].expand(canvas.shape[0], -1, -1)
        return full[:, : canvas.shape[1]][select]


def denoise(fn, settings: SamplerSettings | None = None, **kwargs) -> Denoise:
    is_end = torch.zeros(V, dtype=torch.bool)
    is_end[END] = True
    banned = torch.zeros(V, dtype=torch.bool)
    banned[MASK] = True
    return Denoise(fn, MASK, is_end, banned, settings or SamplerSettings(end_run_threshold=None), **kwargs)


def test_threshold_commits_every_sure_position_at_once_and_one_otherwise():
    fn = Fixed(table([{A: 0.95}, {B: 0.5}, {C: 0.92}, {D: 0.6}]))
    views: list[StepView] = []
    result = denoise(fn, on_step=views.append).run(1, 4)
    assert views[0].canvas == [[A, MASK, C, MASK]]  # both sure positions, nothing else
    assert views[1].canvas == [[A, MASK, C, D]]  # none sure: the single best (0.6 > 0.5)
    assert result.tokens == [[A, B, C, D]] and result.steps == 3 and result.ended == [False]


def test_fixed_steps_commit_a_share_per_step():
    fn = Fixed(table([{A: 0.3}] * 8))
    views: list[StepView] = []
    result = denoise(fn, SamplerSettings(steps=3, end_run_threshold=None), on_step=views.append).run(1, 8)
    committed = [v.committed for v in views]
    assert committed == [3, 6, 8]  # ceil(8/3), then ceil(5/2), then the rest
    assert result.steps == 3


def test_window_commits_the_leftmost_and_the_sure_ones_beside_it():
    # The rightmost position is the likeliest, yet left-to-right decoding takes the leftmost
    # masked position every step; a sure position inside the window joins it.
    fn = Fixed(table([{A: 0.4}, {B: 0.5}, {C: 0.95}, {D: 0.8}, {A: 0.85}]))
    views: list[StepView] = []
    settings = SamplerSettings(window=3, end_run_threshold=None)
    result = denoise(fn, settings, on_step=views.append).run(1, 5)
    assert views[0].canvas == [[A, MASK, C, MASK, MASK]]  # leftmost + the sure one in the window
    assert views[1].canvas == [[A, B, C, MASK, MASK]]  # position 4 (0.85) is sure but outside
    assert views[2].canvas == [[A, B, C, D, MASK]]
    assert result.tokens == [[A, B, C, D, A]] and result.steps == 4
    plain: list[StepView] = []
    unrestricted = denoise(fn, on_step=plain.append).run(1, 5)  # without a window: the most confident first
    assert plain[0].canvas == [[MASK, MASK, C, MASK, MASK]] and plain[1].canvas == [[MASK, MASK, C, MASK, A]]
    assert unrestricted.tokens == result.tokens and unrestricted.steps == 5


def test_window_widens_to_keep_a_fixed_number_of_steps():
    fn = Fixed(table([{A: 0.3}] * 8))
    views: list[StepView] = []
    settings = SamplerSettings(steps=2, window=1, end_run_threshold=None)
    result = denoise(fn, settings, on_step=views.append).run(1, 8)
    assert [v.committed for v in views] == [4, 8] and result.steps == 2
    assert views[0].canvas == [[A] * 4 + [MASK] * 4]  # the leftmost four
    with pytest.raises(ValueError, match="window"):
        SamplerSettings(window=0)


@pytest.mark.parametrize("policy, first", [("confidence", 0), ("margin", 1), ("entropy", 2)])
def test_policies_order_positions_differently(policy, first):
    # position 0: the likeliest token (0.50) with a close second (0.45): best confidence
    # position 1: 0.45 against a thin spread: best margin
    # position 2: two tokens at 0.49 and almost nothing else: lowest entropy
    logits = table([{A: 0.50, B: 0.45}, {A: 0.45}, {C: 0.49, D: 0.49}])
    views: list[StepView] = []
    settings = SamplerSettings(policy=policy, threshold=1.0, end_run_threshold=None)
    denoise(Fixed(logits), settings, on_step=views.append).run(1, 3)
    changed = [i for i, t in enumerate(views[0].canvas[0]) if t != MASK]
    banned = logits.clone()
    banned[:, MASK] = float("-inf")
    assert changed == [int(score(torch.softmax(banned, -1), policy).argmax())] == [first]


def test_end_token_ends_the_row_and_fills_the_tail():
    fn = Fixed(table([{A: 0.95}, {END: 0.95}, {B: 0.2}, {C: 0.2}, {D: 0.2}]))
    views: list[StepView] = []
    result = denoise(fn, on_step=views.append, fill_id=END).run(1, 5)
    assert views[0].canvas == [[A, END, END, END, END]]
    assert result.steps == 1 and result.tokens == [[A, END]] and result.ended == [True]
    assert first_end(torch.tensor([A, END, END]), torch.tensor([i == END for i in range(V)]), MASK) == 1


def test_positions_after_a_committed_end_are_never_read():
    """A newline end in line mode: nothing after it can change the completion."""
    fn = Fixed(table([{B: 0.3}, {END: 0.99}, {C: 0.3}, {D: 0.3}]))
    result = denoise(fn).run(1, 4)
    assert result.tokens == [[B, END]]
    for canvas, select in fn.calls[1:]:
        assert not select[0, 2:].any()


def test_end_run_grows_leftwards_in_one_step():
    def per_position(canvas):
        logits = table([{A: 0.97}, {END: 0.6}, {END: 0.7}, {END: 0.95}])
        return logits

    views: list[StepView] = []
    settings = SamplerSettings(end_run_threshold=0.5)
    denoise(Fixed(per_position), settings, on_step=views.append).run(1, 4)
    assert views[0].canvas == [[A, END, END, END]]  # 0.95 commits, then 0.7 and 0.6 join the run
    views.clear()
    denoise(Fixed(per_position), SamplerSettings(end_run_threshold=None), on_step=views.append).run(1, 4)
    assert views[0].canvas == [[A, MASK, MASK, END]]


def test_remasking_drops_a_token_whose_probability_fell():
    def per_position(canvas):
        if canvas[0, 1] == MASK:
            return table([{A: 0.95}, {B: 0.5}, {D: 0.3}])
        return table([{A: 0.05, C: 0.9}, {B: 0.95}, {D: 0.3}])  # once B is in, A at position 0 looks wrong

    views: list[StepView] = []
    result = denoise(Fixed(per_position), SamplerSettings(remask_below=0.2, end_run_threshold=None),
                     on_step=views.append).run(1, 3)
    assert [v.canvas[0] for v in views[:3]] == [[A, MASK, MASK], [A, B, MASK], [MASK, B, D]]  # A re-masked ...
    assert result.tokens == [[C, B, D]]  # ... and replaced
    assert result.remasked_low_confidence == 1


def test_remasking_is_bounded_per_position():
    flip = {"n": 0}

    def per_position(canvas):  # whatever is committed at position 0 is always doubted
        flip["n"] += 1
        token = A if flip["n"] % 2 else C
        return table([{token: 0.95}, {B: 0.3}, {D: 0.3}])

    result = denoise(Fixed(per_position), SamplerSettings(remask_below=0.5, max_remasks_per_position=2,
                                                          end_run_threshold=None)).run(1, 3)
    assert result.remasked_low_confidence <= 2 * 3
    assert MASK not in result.tokens[0]


def test_rows_of_different_lengths_never_read_past_their_end():
    fn = Fixed(table([{A: 0.5}] * 6))
    result = denoise(fn).run(2, [3, 6])
    assert [len(t) for t in result.tokens] == [3, 6]
    for _, select in fn.calls:
        assert not select[0, 3:].any()
    assert result.row_steps[0] <= result.row_steps[1]


def test_cancel_between_steps():
    fn = Fixed(table([{A: 0.3}] * 6))
    polls = {"n": 0}

    def cancel() -> bool:
        polls["n"] += 1
        return polls["n"] > 2

    with pytest.raises(Cancelled):
        denoise(fn, cancel=cancel).run(1, 6)
    assert len(fn.calls) == 2  # two steps ran, the third was never started


class RejectFirst:
    """A critic that vetoes token A at position 0 the first time it appears."""

    def __init__(self):
        self.seen: list[tuple[list, list, bool]] = []

    def review(self, pieces, newly_committed, ended):
        self.seen.append((list(pieces), list(newly_committed), ended))
        if 0 in newly_committed and pieces[0] == "a" and len(self.seen) == 1:
            return [0]
        return []


def test_critic_veto_remasks_and_forbids_the_token_there():
    fn = Fixed(table([{A: 0.95, B: 0.04}, {C: 0.95}]))
    critic = RejectFirst()
    pieces = {A: "a", B: "b", C: "c", END: ""}
    result = denoise(fn, critics=[critic], piece=lambda t: pieces.get(t, "?")).run(1, 2)
    assert result.remasked_by_critic == 1
    assert result.tokens[0][0] == B  # A is forbidden at position 0 now; B is the next best
    assert critic.seen[0][1] == [0, 1]


def test_healing_writes_the_word_first_left_to_right_in_tokens_that_agree_with_it():
    pieces = {A: "a", B: "b", C: "ab", D: "abc", END: ""}

    def agreeing(text: str) -> tuple[torch.Tensor, bool]:
        allowed = [bool(p) and (p.startswith(text) or text.startswith(p)) for p in (pieces.get(t, "?") for t in range(V))]
        return torch.tensor(allowed), all(pieces.get(t, "?").startswith(text) for t in range(V) if allowed[t])

    fn = Fixed(table([{B: 0.9, A: 0.06, C: 0.03}, {D: 0.9, B: 0.05}, {C: 0.95}]))
    views: list[StepView] = []
    result = denoise(fn, heal=["ab", None], heal_allowed=agreeing, piece=lambda t: pieces.get(t, "?"),
                     on_step=views.append).run(2, 3)
    # Row 0 must start with "ab": "b" is no start of it, so "a" (its best agreeing token), then
    # "b" (the only token that agrees with the rest), then the free choice.
    assert result.tokens[0] == [A, B, C]
    assert result.tokens[1] == [B, D, C]  # row 1 heals nothing: its sure positions go in at once
    assert views[0].canvas[0] == [A, MASK, MASK]  # one position per step while the word may be split
    # Healing "a", which every agreeing token covers: the other sure positions need not wait.
    views.clear()
    result = denoise(fn, heal=["a"], heal_allowed=agreeing, piece=lambda t: pieces.get(t, "?"),
                     on_step=views.append).run(1, 3)
    assert views[0].canvas[0] == [MASK, D, C] and result.tokens[0] == [A, D, C]


def test_sampled_rows_follow_their_generator():
    fn = Fixed(table([{A: 0.3, B: 0.3, C: 0.3}] * 4))

    def run(seed: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return denoise(fn, SamplerSettings(temperature=1.0, end_run_threshold=None), generator=gen).run(3, 4).tokens

    assert run(0) == run(0)
    assert any(run(0)[1:] != run(seed)[1:] for seed in range(1, 6))
    assert all(run(0)[0] == run(seed)[0] for seed in range(1, 4))  # row 0 stays greedy


def test_settings_are_validated():
    with pytest.raises(ValueError, match="policy"):
        SamplerSettings(policy="random")
    with pytest.raises(ValueError, match="threshold"):
        SamplerSettings(threshold=0.0)
    with pytest.raises(ValueError, match="remask_below"):
        SamplerSettings(remask_below=1.5)
    with pytest.raises(ValueError, match="canvas length"):
        denoise(Fixed(table([{A: 0.5}]))).run(2, [1])
