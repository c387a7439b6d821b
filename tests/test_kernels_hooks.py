"""The engine-side hooks of difill.kernels, driven with the bundled model and tokenizer.

On CUDA the engine flags the attention layers (canvas attention kernel) and gives the sampler a
``confidence_fn`` (fused head + confidence). Here both run in Triton's interpreter on the CPU,
and must reproduce what the plain model path computes: the same hidden states, the same
tokens and probabilities, the same denoised canvas. Only mechanics are checked, never the
quality of the text (the bundled model is an early checkpoint).
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from difill import default_model_path, kernels  # noqa: E402
from difill.inference.loader import load_model  # noqa: E402
from difill.inference.sampler import Denoise, SamplerSettings  # noqa: E402
from difill.inference.tokenizer import Tokenizer  # noqa: E402
from difill.kernels import confidence_reference  # noqa: E402
from difill.kernels.hooks import forbidden_ids, make_confidence_fn, set_canvas_attention  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def _interpreted() -> bool:
    from difill.kernels import confidence

    return type(confidence._confidence_partial_kernel).__name__ == "InterpretedFunction"


pytestmark = pytest.mark.skipif(
    not kernels.triton_available() or (not ON_GPU and not _interpreted()),
    reason=f"triton is not importable ({kernels.TRITON_ERROR})" if not kernels.triton_available()
    else "no GPU, and difill.kernels was imported before TRITON_INTERPRET=1 was set (run this file on its own)",
)

PREFIX = "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        return "
SUFFIX = "\n\n\nprint(read_lines('x'))\n"
CANVAS = 16


@pytest.fixture(scope="module")
def setup():
    directory = default_model_path()
    model = load_model(directory, device=DEVICE, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(directory / "tokenizer.json")
    c = model.config
    if c.prefix_token_id is None or c.attention != "block":
        pytest.skip("the bundled model does not use the block layout")
    ids = [c.suffix_token_id] + tokenizer.encode(SUFFIX) + [c.prefix_token_id] + tokenizer.encode(PREFIX) + [c.middle_token_id]
    banned = torch.zeros(c.vocab_size, dtype=torch.bool)
    banned[[t for t in (c.mask_token_id, c.pad_token_id, c.bos_token_id, c.prefix_token_id, c.suffix_token_id, c.middle_token_id)
            if t is not None and t != c.end_token_id]] = True
    yield model, ids, banned
    set_canvas_attention(model, False)


def _context_cache(model, ids):
    cache = model.new_cache()
    with torch.inference_mode():
        model.hidden_states(torch.tensor([ids], device=DEVICE), torch.arange(len(ids), device=DEVICE),
                            cache=cache, causal=True, store=True)
    return cache


def _canvas(model, rows: int, seed: int) -> torch.Tensor:
    """Mostly masks, a few committed tokens, as in the middle of a denoising run."""
    canvas = torch.full((rows, CANVAS), model.config.mask_token_id, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    canvas[:, ::5] = torch.randint(10, model.config.vocab_size, (rows, len(range(0, CANVAS, 5))), generator=g)
    return canvas


def test_canvas_attention_hook_reproduces_the_model(setup):
    model, ids, _ = setup
    cache = _context_cache(model, ids)
    canvas = _canvas(model, rows=2, seed=0).to(DEVICE)
    positions = torch.arange(cache.length, cache.length + CANVAS, device=DEVICE)
    with torch.inference_mode():
        assert set_canvas_attention(model, False) == model.config.n_layers
        plain = model.hidden_states(canvas, positions, cache=cache)
        set_canvas_attention(model, True)
        fused = model.hidden_states(canvas, positions, cache=cache)
        set_canvas_attention(model, False)
    assert cache.length == len(ids), "a canvas step must not grow the context cache"
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


def test_forbidden_ids_lists_the_vetoes():
    forbidden = torch.zeros(2, 4, 50, dtype=torch.bool)
    reviews = torch.zeros(2, 4, dtype=torch.long)
    assert forbidden_ids(forbidden, reviews) is None
    forbidden[0, 1, [3, 17]] = True
    forbidden[1, 3, 49] = True
    reviews[0, 1], reviews[1, 3] = 2, 1
    ids = forbidden_ids(forbidden, reviews)
    assert ids.shape == (2, 4, 2)
    assert ids[0, 1].tolist() == [3, 17] and ids[1, 3].tolist() == [49, -1]
    assert (ids[0, 0] == -1).all() and (ids[1, 0] == -1).all()


@pytest.mark.parametrize("policy", ["confidence", "entropy"])
def test_confidence_fn_matches_the_logits_path(setup, policy):
    """Bans (special tokens) and a critic veto at one position, as the sampler passes them."""
    model, ids, banned = setup
    cache = _context_cache(model, ids)
    canvas = _canvas(model, rows=2, seed=1)
    positions = torch.arange(cache.length, cache.length + CANVAS, device=DEVICE)
    with torch.inference_mode():
        hidden = model.hidden_states(canvas.to(DEVICE), positions, cache=cache)
        logits = model.logits(hidden).cpu()
    forbidden = torch.zeros(2, CANVAS, model.config.vocab_size, dtype=torch.bool)
    reviews = torch.zeros(2, CANVAS, dtype=torch.long)
    vetoed = int(logits[1, 3].masked_fill(banned, float("-inf")).argmax())
    forbidden[1, 3, vetoed] = True
    reviews[1, 3] = 1
    bias = torch.zeros(model.config.vocab_size).masked_fill(banned, float("-inf"))
    want = confidence_reference(hidden.cpu(), model.lm_head.weight.detach().cpu(), policy, bias=bias,
                                banned_ids=forbidden_ids(forbidden, reviews))
    with torch.inference_mode():
        token, prob, score = make_confidence_fn(model, cache, CANVAS, banned, policy)(canvas, forbidden, reviews)
    assert token.shape == (2, CANVAS) and token.device.type == "cpu"
    assert int(token[1, 3]) != vetoed
    assert not banned[token].any()
    torch.testing.assert_close(prob, want.prob, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(score, want.score, atol=1e-4, rtol=1e-4)
    top2 = (logits.masked_fill(banned, float("-inf")).masked_fill(forbidden, float("-inf"))).topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    assert torch.equal(token[clear], want.token[clear])


def test_denoise_with_the_kernels_matches_the_plain_sampler(setup):
    """Four fixed steps of the real sampler: the kernel path commits what the logits path does."""
    model, ids, banned = setup
    c = model.config
    is_end = torch.zeros(c.vocab_size, dtype=torch.bool)
    is_end[c.end_token_id] = True
    settings = SamplerSettings(policy="margin", steps=4)

    def run(use_kernels: bool):
        cache = _context_cache(model, ids)
        positions = torch.arange(cache.length, cache.length + CANVAS, device=DEVICE)
        set_canvas_attention(model, use_kernels)

        def logits_fn(canvas, select):
            hidden = model.hidden_states(canvas.to(DEVICE), positions, cache=cache)
            return model.logits(hidden)[select.to(DEVICE)].cpu()

        confidence_fn = make_confidence_fn(model, cache, CANVAS, banned, settings.policy) if use_kernels else None
        denoise = Denoise(None if use_kernels else logits_fn, c.mask_token_id, is_end, banned, settings,
                          confidence_fn=confidence_fn)
        with torch.inference_mode():
            return denoise.run(1, CANVAS)

    try:
        plain, fused = run(False), run(True)
    finally:
        set_canvas_attention(model, False)
    assert plain.tokens[0], "the plain sampler committed nothing"
    assert fused.steps == plain.steps
    assert fused.tokens == plain.tokens
    assert fused.ended == plain.ended


def test_engine_call_site_uses_the_kernels(monkeypatch):
    """The engine's hook (normally switched on by device == "cuda"), forced on the CPU: the
    completion is the plain engine's, and the sampler really went through ``confidence_fn``."""
    from difill.inference.engine import Engine, EngineSettings, InfillRequest
    from difill.kernels import hooks

    made = []
    original = hooks.make_confidence_fn
    monkeypatch.setattr(hooks, "make_confidence_fn", lambda *a, **k: made.append(a) or original(*a, **k))
    request = InfillRequest(PREFIX, SUFFIX, language="python", mode="line", max_tokens=8, steps=4, constrain_syntax=False)
    # The kernels read the head's weight: float32 on the CPU (on CUDA, bfloat16 by default).
    plain = Engine.load(device=DEVICE, settings=EngineSettings(use_kernels=False, dtype="float32"))
    assert not plain.use_kernels
    expected = plain.infill(request)
    fused = Engine.load(device=DEVICE, settings=EngineSettings(dtype="float32"))
    fused.use_kernels = True
    set_canvas_attention(fused.model, True)
    got = fused.infill(request)
    assert made, "the engine did not build a confidence_fn"
    assert (got.completion, got.tokens, got.steps) == (expected.completion, expected.tokens, expected.steps)
