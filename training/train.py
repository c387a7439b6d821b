"""Train a masked-diffusion infill model from a JSON config; checkpoints and resumes.

    python -m difill.training.train training/configs/small.json --run runs/small

The objective is MDLM on the canvas (absorbing mask state, masking rate t drawn per sequence,
cross-entropy on masked positions weighted by 1/t) plus, because the block layout processes
the context causally, next-token prediction on the context: the same forward pass gives a
dense signal from every context token at little extra cost.

A run is a folder: ``ckpt/`` (weights and optimizer state in safetensors, ``state.json``),
``log.jsonl`` (loss, validation, FIM checks against tokens seen) and ``export/`` (the Hugging
Face layout that the engine loads). Stop it at any time; the same command resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from difill.inference.engine import DTYPES
from difill.inference.loader import weight_files
from difill.inference.model import ModelConfig, Transformer, block_diffusion_mask, init_weights
from difill.inference.tokenizer import BOS, EOI, MASK, MIDDLE, PAD, PREFIX, SUFFIX, Tokenizer
from difill.training.data import Batch, InfillSampler, load_texts

log = logging.getLogger("difill.train")


@dataclass
class TrainConfig:
    model: dict = field(default_factory=dict)
    corpus: str = "data/corpus"
    tokenizer: str = "data/tokenizer.json"
    context_len: int = 256
    suffix_budget: int = 64
    canvas_lens: tuple = (16, 32, 64)
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    max_steps: int = 20000
    # A run on a lent machine has minutes, not a known number of steps: the learning-rate schedule
    # then ends at whichever comes first, max_steps or this many minutes of training steps.
    time_budget_minutes: float | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    ar_weight: float = 0.5
    ar_positions: int = 64
    eoi_pad_weight: float = 0.1  # loss weight of the <|eoi|> padding after the first one
    min_mask_rate: float = 0.05
    threads: int = 0
    # The share of the training draws per language (InfillSampler); unlisted languages share the
    # rest in proportion to their size. Empty: every file in proportion to its size.
    language_shares: dict = field(default_factory=dict)
    # Processes that draw batches ahead of the training step (0: in the training process). A GPU
    # step takes less time than Python needs to cut and tokenize a batch.
    loader_workers: int = 0
    device: str = "auto"  # "cpu", "cuda", or "auto": CUDA when PyTorch sees a GPU
    bf16: bool = True
    compile: bool = False
    # The exported weights: "float32", or "bfloat16" for a model that must fit the package's 64 MB
    # (a 30M model is 120 MB in float32); the engine loads either into the dtype it runs.
    export_dtype: str = "float32"
    # Split the exported weights into shards of at most this many MiB, with an index (the device
    # machines return files of at most 16 MiB); None: one model.safetensors.
    export_shard_mib: float | None = None
    init_from: str | None = None  # a model directory (Hugging Face layout) whose weights a new run starts from
    # The engine's default semi-autoregressive window for this model: a number, or one per mode
    # ({"line": null, "block": 1}); chosen by measurement (bench/engine.py's window section).
    decode_window: int | dict | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    checkpoint_every: int = 100

    @classmethod
    def from_file(cls, path: Path) -> "TrainConfig":
        return cls(**json.loads(Path(path).read_text()))


def model_config_for(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The model's config, with the context budget it was trained on (the engine's default).
    ``cfg.model["attention"]`` picks the layout: "block" (default) or "bidirectional"."""
    return ModelConfig(
        extra={"context_tokens": cfg.context_len, "suffix_tokens": cfg.suffix_budget,
               **({"decode_window": cfg.decode_window} if cfg.decode_window else {})},
        vocab_size=tokenizer.vocab_size,
        mask_token_id=MASK, end_token_id=EOI, pad_token_id=PAD, bos_token_id=BOS,
        prefix_token_id=PREFIX, suffix_token_id=SUFFIX, middle_token_id=MIDDLE,
        **cfg.model,
    )


def lr_at(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """Linear warmup, then a cosine to ``min_lr_ratio`` over the steps or the time budget."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.time_budget_minutes:
        progress = max(progress, min(1.0, seconds / (cfg.time_budget_minutes * 60)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def attention_mask(context: torch.Tensor, canvas_len: int, after: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, T, T] with padding keys hidden: the block-diffusion pattern, or full attention
    when a suffix follows the canvas (bidirectional layout)."""
    b, c = context.shape
    device = context.device
    pieces = [context != PAD, torch.ones(b, canvas_len, dtype=torch.bool, device=device)]
    if after is not None:
        pieces.append(after != PAD)
    keys_real = torch.cat(pieces, dim=1)
    total = keys_real.shape[1]
    base = torch.ones(total, total, dtype=torch.bool, device=device) if after is not None else block_diffusion_mask(c, canvas_len, device)
    mask = base[None] & keys_real[:, None, :]
    mask |= torch.eye(total, dtype=torch.bool, device=device)[None]  # pads see themselves, not NaN
    return mask[:, None]


class _StepBatches(torch.utils.data.Dataset):
    """Training step -> its batch (:meth:`InfillSampler.batch_at`), for a DataLoader's workers."""

    def __init__(self, sampler: InfillSampler, cfg: TrainConfig):
        self.sampler, self.cfg = sampler, cfg

    def __len__(self) -> int:
        return self.cfg.max_steps

    def __getitem__(self, step: int) -> Batch:
        canvas_len = self.cfg.canvas_lens[step % len(self.cfg.canvas_lens)]
        return self.sampler.batch_at(step, self.cfg.batch_size, canvas_len)


def batch_loader(sampler: InfillSampler, cfg: TrainConfig, first_step: int):
    """The batches of steps ``first_step`` onwards, in order; drawn ``cfg.loader_workers``
    processes ahead when there are workers. Which batch a step gets never depends on them."""
    steps = range(first_step, cfg.max_steps)
    workers = cfg.loader_workers
    return torch.utils.data.DataLoader(_StepBatches(sampler, cfg), batch_size=None, sampler=steps, num_workers=workers,
                                       prefetch_factor=8 if workers else None, persistent_workers=False,
                                       multiprocessing_context="fork" if workers else None)


def diffusion_loss(model: Transformer, context: torch.Tensor, canvas: torch.Tensor, cfg: TrainConfig,
                   generator: torch.Generator, after: torch.Tensor | None = None,
                   body=None) -> tuple[torch.Tensor, dict]:
    """MDLM loss on the canvas plus (block layout) weighted next-token loss on the context.
    ``body`` replaces ``model.hidden_states`` (e.g. a compiled copy of it)."""
    b, c = context.shape
    m = canvas.shape[1]
    # Stratified masking rates: one per sequence, spread evenly over [min_mask_rate, 1]. The draws
    # come from a CPU generator (the same masks on any device, and a resumable state).
    u = (torch.rand(1, generator=generator) + torch.arange(b) / b) % 1.0
    t = cfg.min_mask_rate + (1 - cfg.min_mask_rate) * u
    masked = torch.rand(b, m, generator=generator) < t[:, None]
    masked[torch.arange(b), torch.randint(0, m, (b,), generator=generator)] = True
    device = next(model.parameters()).device
    context, canvas, masked, t = context.to(device), canvas.to(device), masked.to(device), t.to(device)
    after = after.to(device) if after is not None else None
    noisy = torch.where(masked, torch.full_like(canvas, MASK), canvas)
    ids = torch.cat([context, noisy] + ([after] if after is not None else []), dim=1)
    positions = torch.arange(ids.shape[1], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        hidden = (body or model.hidden_states)(ids, positions, mask=attention_mask(context, m, after))
        canvas_logits = model.logits(hidden[:, c: c + m][masked])
        canvas_logits[:, MASK] = float("-inf")
        ce = F.cross_entropy(canvas_logits, canvas[masked], reduction="none")
        # The <|eoi|> tokens after the first one only pad the canvas: at full weight they make up
        # most of the targets and an undertrained model learns "end everywhere" (empty infills).
        is_end = canvas == EOI
        padding = is_end & (is_end.cumsum(dim=1) > 1)
        position_weight = torch.where(padding, cfg.eoi_pad_weight, 1.0)
        weights = ((1.0 / t)[:, None] * position_weight)[masked]
        canvas_loss = (ce * weights).sum() / (b * m)
        # Next-token loss on the last ar_positions context tokens only: the output head over
        # the whole context would cost a third of the step for little extra signal.
        start = max(0, c - 1 - cfg.ar_positions)
        targets = context[:, start + 1:]
        real = (targets != PAD) & (context[:, start:-1] != PAD)
        if after is None:  # the context is causal only in the block layout
            ar_loss = F.cross_entropy(model.logits(hidden[:, start: c - 1][real]), targets[real])
        else:
            ar_loss = torch.zeros(())
    loss = canvas_loss + cfg.ar_weight * ar_loss
    # Tensors, not floats: reading them waits for the GPU, so the loop reads them only to log.
    return loss, {"canvas_loss": canvas_loss.detach(), "masked_ce": ce.mean().detach(), "ar_loss": ar_loss.detach()}


@torch.no_grad()
def validation_loss(model: Transformer, sampler: InfillSampler, cfg: TrainConfig, batches: int = 8) -> float:
    """Masked cross-entropy on held-out files, with fixed seeds so that runs compare."""
    model.eval()
    state = sampler.rng.getstate()
    sampler.rng.seed(1234)
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for i in range(batches):
        batch = sampler.batch(cfg.batch_size, cfg.canvas_lens[i % len(cfg.canvas_lens)])
        _, parts = diffusion_loss(model, batch.context, batch.canvas, cfg, gen, batch.after)
        total += parts["masked_ce"].item()
    sampler.rng.setstate(state)
    model.train()
    return total / batches


def fim_check(model: Transformer, tokenizer: Tokenizer, texts: list[str], cases: int = 48, seed: int = 7) -> dict:
    """Exact match of single-line infills (line tails and whole lines) on held-out files, with the
    real engine and sampler: the learning curve that plans the next run."""
    from difill.inference.engine import Engine, InfillRequest
    from difill.training.data import choose_span

    model.eval()
    engine = Engine(model, tokenizer, name="training", device=next(model.parameters()).device.type)
    rng = random.Random(seed)
    pool = [t for t in texts if len(t) > 500]
    hits = {"line_tail": 0, "whole_line": 0}
    counts = dict.fromkeys(hits, 0)
    for i in range(cases):
        kind = "line_tail" if i % 2 == 0 else "whole_line"
        text = rng.choice(pool)
        span = choose_span(text, kind, rng)
        if span is None or span[1] == span[0]:
            continue
        start, end = span
        request = InfillRequest(prefix=text[max(0, start - 3000):start], suffix=text[end:end + 1000], mode="line",
                                language="python", constrain_syntax=False)
        completion = engine.infill(request).completion
        counts[kind] += 1
        hits[kind] += int(completion.strip() == text[start:end].strip())
    model.train()
    return {f"fim_exact_{k}": round(hits[k] / max(1, counts[k]), 4) for k in hits}


def save_checkpoint(run: Path, model: Transformer, optimizer: torch.optim.Optimizer, state: dict,
                    generator: torch.Generator | None = None) -> None:
    """Weights, optimizer moments and the masking RNG as safetensors, the rest (including the
    data sampler's RNG) as JSON: no pickle anywhere, and a resumed run continues exactly."""
    ckpt = run / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / "tmp"
    tmp.mkdir(exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight" or not model.config.tie_embeddings}
    save_file(weights, str(tmp / "model.safetensors"))
    opt_state = optimizer.state_dict()
    tensors = {f"{idx}.{key}": value.cpu().contiguous() for idx, s in opt_state["state"].items() for key, value in s.items()}
    if generator is not None:
        tensors["generator.state"] = generator.get_state()
    save_file(tensors, str(tmp / "optim.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": opt_state["param_groups"]}))
    for name in ("model.safetensors", "optim.safetensors", "state.json"):
        (tmp / name).replace(ckpt / name)  # each file lands whole; state.json last marks a complete set


def load_checkpoint(run: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator | None = None) -> dict | None:
    ckpt = run / "ckpt"
    if not (ckpt / "state.json").exists():
        return None
    state = json.loads((ckpt / "state.json").read_text())
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    tensors = load_file(str(ckpt / "optim.safetensors"))  # load_state_dict moves them to the parameters' device
    opt_state: dict = {"state": {}, "param_groups": state.pop("param_groups")}
    generator_state = tensors.pop("generator.state", None)
    if generator is not None and generator_state is not None:
        generator.set_state(generator_state)
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        opt_state["state"].setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict(opt_state)
    return state


def training_record(run: Path, cfg: TrainConfig, state: dict, n_params: int) -> dict:
    """What the exported model's training.json says of this run: its totals, config, hardware and
    learning curve (the validation records of its log). The model carries its own history, so a
    model card can be written after the run folder is gone (runs/ never travels between sessions)."""
    log_path = run / "log.jsonl"
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    hardware = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    return {"run": run.name, "steps": state["step"], "tokens": state["tokens"], "train_seconds": round(state["seconds"]),
            "parameters": n_params, "config": asdict(cfg), "hardware": hardware,
            "curve": [r for r in rows if "val_masked_ce" in r]}


def save_weights(weights: dict[str, torch.Tensor], out: Path, shard_mib: float | None) -> None:
    """model.safetensors, or (when larger than shard_mib) shards in Hugging Face's layout:
    model-0000i-of-0000n.safetensors and model.safetensors.index.json, filled in name order."""
    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a re-export must not leave shards of another layout behind
    limit = int(shard_mib * 2**20) if shard_mib else None
    total = sum(t.numel() * t.element_size() for t in weights.values())
    if limit is None or total <= limit:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(weights):
        nbytes = weights[name].numel() * weights[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def export(run: Path, model: Transformer, tokenizer_path: Path, card: dict, out: Path | None = None) -> Path:
    """Write the Hugging Face layout that the engine loads: config.json, model.safetensors, tokenizer.json,
    and training.json (this run's figures; under "continued" those of the model it started from)."""
    out = out or run / "export"
    earlier = Path(card["config"].get("init_from") or "", "training.json")
    if card["config"].get("init_from") and earlier.is_file():
        card = {**card, "continued": json.loads(earlier.read_text())}
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "difill", **model.config.to_dict()}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    dtype = DTYPES[card["config"].get("export_dtype", "float32")]
    weights = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight" or not model.config.tie_embeddings}
    save_weights(weights, out, card["config"].get("export_shard_mib"))
    (out / "tokenizer.json").write_text(Path(tokenizer_path).read_text())
    (out / "training.json").write_text(json.dumps(card, indent=1))
    return out


def start_from_model(model: Transformer, directory: Path, tokenizer_path: Path) -> None:
    """Load an exported model's weights so that a new run continues where an earlier one ended
    (e.g. the shipped model, whose run folder is gone); a resumed checkpoint overrides them."""
    if Path(directory, "tokenizer.json").read_text() != Path(tokenizer_path).read_text():
        raise SystemExit(f"{directory} was trained with another tokenizer than {tokenizer_path}")
    exported = json.loads(Path(directory, "config.json").read_text())
    mine = model.config.to_dict()
    differing = [k for k, v in mine.items() if k in exported and exported[k] != v and k != "extra"]  # extra: engine defaults
    if differing:
        raise SystemExit(f"{directory} has another architecture ({', '.join(differing)} differ)")
    weights = {name: tensor for file in weight_files(Path(directory)) for name, tensor in load_file(str(file)).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"{directory} does not fit the model: missing {missing}, unexpected {unexpected}")
    log.info("starting from the weights of %s", directory)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[dict]:
    """While the loop runs, SIGTERM (a preempted job, ``timeout``) ends it after the current step,
    so that the last checkpoint and the export are still written. The previous handler comes back
    afterwards: train() also runs inside other programs (the tests, the CLI), and a handler left
    behind would be inherited by their forked children, which then ignore terminate()."""
    stop = {"now": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(config_path: Path, run: Path, max_minutes: float | None = None) -> Path:
    cfg = TrainConfig.from_file(config_path)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 leftovers outside autocast
    torch.manual_seed(cfg.seed)
    tokenizer = Tokenizer.from_file(cfg.tokenizer)
    model = Transformer(model_config_for(cfg, tokenizer))
    init_weights(model, cfg.seed)
    if cfg.init_from:
        start_from_model(model, Path(cfg.init_from), Path(cfg.tokenizer))
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    corpus = Path(cfg.corpus)
    layout = model.config.attention
    train_sampler = InfillSampler(load_texts(corpus / "train.jsonl"), tokenizer, cfg.context_len, cfg.suffix_budget, cfg.seed,
                                  layout, cfg.language_shares)
    # Validation draws files as they come, so that its loss compares across runs and weightings.
    val_sampler = InfillSampler(load_texts(corpus / "val.jsonl"), tokenizer, cfg.context_len, cfg.suffix_budget, cfg.seed + 1, layout)
    generator = torch.Generator().manual_seed(cfg.seed)
    state = load_checkpoint(run, model, optimizer, generator) or {"step": 0, "tokens": 0, "seconds": 0.0}
    if state["step"]:
        log.info("resumed %s at step %d (%d tokens)", run, state["step"], state["tokens"])
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters on %s, config %s", n_params / 1e6, device, model.config)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=1))

    # The loader's workers start (fork) before the handler below, so that SIGTERM still ends them.
    batches = iter(batch_loader(train_sampler, cfg, state["step"]))
    with stop_on_sigterm() as stop, open(run / "log.jsonl", "a") as logfile:
        deadline = time.time() + max_minutes * 60 if max_minutes else None
        model.train()
        # The compiled transformer body serves the training step only: the masked-position head has a
        # new shape every step, and the FIM check's engine calls the plain model with its own shapes.
        body = torch.compile(model.hidden_states) if cfg.compile else model.hidden_states
        window_start, window_tokens = time.time(), 0
        budget_seconds = cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else math.inf
        while (state["step"] < cfg.max_steps and state["seconds"] < budget_seconds and not stop["now"]
               and not (deadline and time.time() > deadline)):
            step_start = time.time()
            batch = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state["step"], cfg, state["seconds"])
            loss, parts = diffusion_loss(model, batch.context, batch.canvas, cfg, generator, batch.after, body)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            tokens = batch.context.numel() + batch.canvas.numel() + (batch.after.numel() if batch.after is not None else 0)
            state["step"] += 1
            state["tokens"] += tokens
            state["seconds"] += time.time() - step_start
            window_tokens += tokens
            if state["step"] % cfg.log_every == 0:
                rate = window_tokens / (time.time() - window_start)
                window_start, window_tokens = time.time(), 0
                record = {"step": state["step"], "tokens": state["tokens"], "loss": round(loss.item(), 4),
                          **{k: round(v.item(), 4) for k, v in parts.items()}, "tokens_per_s": round(rate),
                          "lr": lr_at(state["step"], cfg, state["seconds"])}
                log.info("step %(step)d  tokens %(tokens)d  loss %(loss).3f  masked_ce %(masked_ce).3f  ar %(ar_loss).3f  %(tokens_per_s)d tok/s", record)
                logfile.write(json.dumps(record) + "\n")
                logfile.flush()
            if state["step"] % cfg.eval_every == 0:
                record = {"step": state["step"], "tokens": state["tokens"], "val_masked_ce": round(validation_loss(model, val_sampler, cfg), 4)}
                try:
                    record.update(fim_check(model, tokenizer, val_sampler.texts))
                except Exception:  # the FIM check must never stop a training run
                    log.exception("FIM check failed")
                    model.train()
                log.info("validation: %s", record)
                logfile.write(json.dumps(record) + "\n")
                logfile.flush()
            if state["step"] % cfg.checkpoint_every == 0:
                save_checkpoint(run, model, optimizer, state, generator)
    save_checkpoint(run, model, optimizer, state, generator)
    out = export(run, model, Path(cfg.tokenizer), training_record(run, cfg, state, n_params))
    log.info("exported %s", out)
    return out


def export_checkpoint(config_path: Path, run: Path, out: Path) -> Path:
    """Export the run's latest checkpoint without training (e.g. while the run goes on)."""
    cfg = TrainConfig.from_file(config_path)
    tokenizer = Tokenizer.from_file(cfg.tokenizer)
    model = Transformer(model_config_for(cfg, tokenizer))
    state = json.loads((run / "ckpt" / "state.json").read_text())
    model.load_state_dict(load_file(str(run / "ckpt" / "model.safetensors")), strict=False)
    record = training_record(run, cfg, state, sum(p.numel() for p in model.parameters()))
    return export(run, model, Path(cfg.tokenizer), record, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    parser.add_argument("--export-to", type=Path, help="only export the latest checkpoint to this directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    random.seed(0)
    if args.export_to:
        export_checkpoint(args.config, args.run, args.export_to)
        return
    train(args.config, args.run, args.max_minutes)


if __name__ == "__main__":
    main()
