"""The training pipeline on a tiny corpus: tokenizer round trip, both attention layouts train,
a run resumes exactly where it stopped, and the export loads in the engine."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difill.inference.engine import Engine, EngineSettings, InfillRequest
from difill.inference.tokenizer import SPECIAL_TOKENS, Tokenizer
from difill.training import corpus as corpus_module
from difill.training.tokenizer import train_tokenizer
from difill.training.train import train

SOURCES = [Path(corpus_module.__file__), Path(corpus_module.__file__).with_name("data.py"),
           Path(corpus_module.__file__).with_name("train.py"), Path(corpus_module.__file__).with_name("tokenizer.py")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "corpus"
    corpus.mkdir()
    rows = [{"path": p.name, "language": "python", "text": p.read_text()} for p in SOURCES]
    (corpus / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    (corpus / "val.jsonl").write_text(json.dumps(rows[3]) + "\n")
    tokenizer = root / "tokenizer.json"
    train_tokenizer(corpus, tokenizer, vocab_size=400)
    return {"root": root, "corpus": corpus, "tokenizer": tokenizer}


def write_config(tiny: dict, name: str, **overrides) -> Path:
    config = {"model": {"hidden_size": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "intermediate_size": 64},
              "corpus": str(tiny["corpus"]), "tokenizer": str(tiny["tokenizer"]), "context_len": 48,
              "suffix_budget": 16, "canvas_lens": [8, 16], "batch_size": 4, "lr": 0.01, "warmup_steps": 2,
              "max_steps": 6, "bf16": False, "threads": 1, "log_every": 1, "eval_every": 1000,
              "checkpoint_every": 3, **overrides}
    path = tiny["root"] / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def test_tokenizer_reserves_special_ids_and_round_trips_any_text(tiny: dict) -> None:
    tokenizer = Tokenizer.from_file(tiny["tokenizer"])
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_id(token) == i
    for text in ["def f(x):\n\treturn x  # ünïcode 😀 中文\r\n", "", "\x00\x7f binary-ish \udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_corpus_keeps_evaluation_packages_out() -> None:
    files = corpus_module.site_package_files()
    packages = {f.package.lower() for f in files}
    assert not packages & corpus_module.EVAL_PACKAGES
    # vendored copies too: setuptools ships more_itertools under setuptools/_vendor/
    assert not any(part.lower().removesuffix('.py') in corpus_module.EVAL_PACKAGES for f in files for part in f.path.parts)
    assert all(corpus_module.is_permissive(f.license) for f in files)
    assert not corpus_module.is_permissive("GNU General Public License v3 (GPLv3)")


@pytest.mark.parametrize("attention", ["block", "bidirectional"])
def test_resumed_run_equals_uninterrupted_run(tiny: dict, attention: str) -> None:
    config = write_config(tiny, f"resume-{attention}", model={"hidden_size": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                                                               "intermediate_size": 64, "attention": attention})
    straight = tiny["root"] / f"straight-{attention}"
    train(config, straight)
    interrupted = tiny["root"] / f"interrupted-{attention}"
    cfg = json.loads(config.read_text())
    half = tiny["root"] / f"half-{attention}.json"
    half.write_text(json.dumps({**cfg, "max_steps": 3}))
    train(half, interrupted)
    # Same schedule length as the straight run, resumed from the step-3 checkpoint.
    train(config, interrupted)
    a = load_file(str(straight / "ckpt" / "model.safetensors"))
    b = load_file(str(interrupted / "ckpt" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    log = [json.loads(line) for line in (interrupted / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_loader_workers_draw_the_same_batches_as_the_training_process(tiny: dict) -> None:
    """A GPU run draws batches in worker processes: the run must not depend on how many."""
    runs = {}
    for workers in (0, 2):
        config = write_config(tiny, f"workers-{workers}", max_steps=4, loader_workers=workers)
        runs[workers] = tiny["root"] / f"workers-{workers}"
        train(config, runs[workers])
    a = load_file(str(runs[0] / "ckpt" / "model.safetensors"))
    b = load_file(str(runs[2] / "ckpt" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_a_time_budget_ends_the_run_and_its_schedule() -> None:
    from difill.training.train import TrainConfig, lr_at
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=0, max_steps=1_000_000, time_budget_minutes=1.0)
    assert lr_at(10, cfg, seconds=0.0) == pytest.approx(1.0, abs=1e-3)
    assert lr_at(10, cfg, seconds=30.0) == pytest.approx(0.55, abs=1e-3)  # half the minutes: half the cosine
    assert lr_at(10, cfg, seconds=60.0) == pytest.approx(0.1)


def test_a_run_stops_at_its_time_budget(tiny: dict) -> None:
    config = write_config(tiny, "budget", max_steps=10_000, time_budget_minutes=0.02)
    run = tiny["root"] / "budget"
    before = signal.getsignal(signal.SIGTERM)
    train(config, run)
    assert signal.getsignal(signal.SIGTERM) is before  # a handler left behind outlives the run in its program
    state = json.loads((run / "ckpt" / "state.json").read_text())
    assert 0 < state["step"] < 10_000 and state["seconds"] >= 1.2
    assert (run / "export" / "config.json").is_file()


def test_training_lowers_the_loss_and_exports_a_loadable_model(tiny: dict) -> None:
    config = write_config(tiny, "learn", max_steps=80, checkpoint_every=1000, log_every=10, eval_every=80)
    run = tiny["root"] / "learn"
    out = train(config, run)
    validation = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "val_masked_ce" in line]
    uniform = math.log(Tokenizer.from_file(tiny["tokenizer"]).vocab_size)  # what an untrained model scores
    assert validation[-1]["val_masked_ce"] < uniform - 1.0
    engine = Engine.load(out)
    assert engine.context_tokens == 48
    result = engine.infill(InfillRequest(prefix="import json\n", suffix="\n", mode="line", language="python"))
    assert result.steps >= 1 and isinstance(result.completion, str)
    assert not list(out.glob("*.bin")) and (out / "model.safetensors").is_file()


def test_a_run_continues_from_an_exported_model(tiny: dict) -> None:
    first = train(write_config(tiny, "first", max_steps=4), tiny["root"] / "first")
    config = write_config(tiny, "second", init_from=str(first), max_steps=0,
                          decode_window={"line": None, "block": 1})
    second = train(config, tiny["root"] / "second")  # no step taken: the weights are the first run's
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the engine's default that the config recommends, per mode
    assert Engine.load(second).decode_windows == {"line": None, "block": 1}
    other = write_config(tiny, "other", init_from=str(first), model={"hidden_size": 64, "n_layers": 2, "n_heads": 2,
                                                                      "n_kv_heads": 1, "intermediate_size": 64})
    with pytest.raises(SystemExit, match="another architecture"):
        train(other, tiny["root"] / "other")


def test_a_bfloat16_export_loads_and_continues(tiny: dict) -> None:
    """Exported in bfloat16 (half the bytes, for the package's size limit), the model loads into the
    engine's float32 and a later run can start from it."""
    first = train(write_config(tiny, "bf16-first", max_steps=2, export_dtype="bfloat16"), tiny["root"] / "bf16-first")
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(first / "model.safetensors")).values())
    engine = Engine.load(first, settings=EngineSettings(dtype="float32"))
    assert engine.describe()["dtype"] == "float32"
    assert isinstance(engine.infill(InfillRequest(prefix="x = ", suffix="\n", mode="line", language="python")).completion, str)
    second = train(write_config(tiny, "bf16-second", init_from=str(first), max_steps=0), tiny["root"] / "bf16-second")
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert all(torch.equal(a[k].float(), b[k]) for k in a)  # float32 again, the same values


def test_a_sharded_export_loads_and_continues(tiny: dict) -> None:
    first = train(write_config(tiny, "shards-first", max_steps=2, export_shard_mib=0.02), tiny["root"] / "shards-first")
    shards = sorted(first.glob("model-*.safetensors"))
    index = json.loads((first / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and not (first / "model.safetensors").exists()
    for f in shards:  # within the limit (plus the file header), or one tensor larger than it alone
        assert f.stat().st_size <= 0.02 * 2**20 + 4096 or len(load_file(str(f))) == 1
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert Engine.load(first).infill(InfillRequest(prefix="x = ", suffix="\n", mode="line")).steps >= 1
    second = train(write_config(tiny, "shards-second", init_from=str(first), max_steps=0), tiny["root"] / "shards-second")
    merged = {k: v for f in shards for k, v in load_file(str(f)).items()}
    assert all(torch.equal(merged[k], v) for k, v in load_file(str(second / "model.safetensors")).items())


def test_a_continued_models_training_record_keeps_the_earlier_one(tiny: dict) -> None:
    first = train(write_config(tiny, "record-first", max_steps=2), tiny["root"] / "record-first")
    second = train(write_config(tiny, "record-second", init_from=str(first), max_steps=1), tiny["root"] / "record-second")
    record = json.loads((second / "training.json").read_text())
    assert record["steps"] == 1 and record["continued"]["steps"] == 2


def test_the_model_card_reads_the_whole_history_from_the_exported_model(tiny: dict, tmp_path: Path) -> None:
    import shutil

    from difill.training.model_card import write_card

    first = train(write_config(tiny, "card-first", max_steps=4, eval_every=2), tiny["root"] / "card-first")
    second = train(write_config(tiny, "card-second", init_from=str(first), max_steps=2, eval_every=2),
                   tiny["root"] / "card-second")
    # run folders do not travel between sessions: the card needs neither log nor checkpoint, only the export
    (tiny["root"] / "card-first" / "log.jsonl").unlink()
    shutil.rmtree(tiny["root"] / "card-first" / "ckpt")
    package = {"license": "MIT", "archive_sha256": None}
    (first / "corpus.json").write_text(json.dumps({"stats": {}, "excluded_for_evaluation": ["click"],
                                                   "packages": [{"name": "old", "version": "1", **package}]}))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "MANIFEST.json").write_text(json.dumps({"stats": {"train": 3, "val": 1, "bytes": 10}, "files": [{}],
                                                      "excluded_for_evaluation": ["attrs"],
                                                      "packages": [{"name": "new", "version": "2", **package}]}))
    metrics = {"cases": 2, "exact_match": 0.5, "edit_similarity": 0.7, "syntax_valid_rate": 1.0,
               "non_empty_rate": 1.0, "latency_p50_ms": 12.0}
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"metrics": metrics, "by_kind": {"line": metrics}, "by_language": {"python": metrics}}))
    safim = tmp_path / "safim.json"
    tested = {**metrics, "pass_at_1": 0.25, "tested": 4}
    safim.write_text(json.dumps({"metrics": tested, "by_kind": {"block": tested}, "by_language": {"python": tested}}))
    card = write_card(second, report, None, corpus, tmp_path / "MODEL_CARD.md", safim_path=safim)
    assert "## SAFIM" in card and "| block | 2 | 0.500 | 0.700 | 0.250 | 4 | 12 |" in card
    attribution = json.loads((tmp_path / "corpus.json").read_text())  # every corpus the model saw, no file list
    assert [p["name"] for p in attribution["packages"]] == ["new", "old"] and "files" not in attribution
    assert attribution["excluded_for_evaluation"] == ["attrs", "click"]
    assert "| card-first | 4 |" in card and "| card-second | 2 |" in card
    assert "- 6 steps," in card
    curve = [line for line in card.splitlines() if line.startswith("| 2 |") or line.startswith("| 4 |") or line.startswith("| 6 |")]
    assert len(curve) == 3  # steps 2 and 4 of the first run, step 2 of the second counted from the first's start


def test_debian_copyright_files_give_the_upstream_license() -> None:
    copyright_text = ("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: cobra\n\n"
                      "Files: *\nCopyright: 2013 Steve Francia\nLicense: Apache-2.0\n\n"
                      "Files: debian/*\nCopyright: 2015 Someone\nLicense: GPL-2+\n")
    assert corpus_module.debian_license(copyright_text) == "Apache-2.0"
    assert corpus_module.is_permissive(corpus_module.debian_license(copyright_text.replace("Apache-2.0", "Expat")))
    assert corpus_module.debian_license("Files: src/*\nLicense: MIT\n") == ""  # no upstream paragraph: not taken


def test_pinned_sources_keep_the_fim_sets_packages_out(tmp_path: Path) -> None:
    pinned = json.loads(Path(corpus_module.__file__).with_name("sources.json").read_text())
    names = {pin["name"] for registry in ("pypi", "npm", "debian") for pin in pinned.get(registry, [])}
    assert not names & (corpus_module.EVAL_PACKAGES | corpus_module.DEBIAN_EVAL_PACKAGES)
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps({"debian": [{"name": "librust-semver-dev", "version": "1.0.14-1"}]}))
    with pytest.raises(ValueError, match="kept back for evaluation"):
        corpus_module.fetch_pinned(sources, tmp_path / "cache")


def test_language_shares_set_how_often_a_language_is_drawn(tiny: dict) -> None:
    from difill.training.data import InfillSampler
    tokenizer = Tokenizer.from_file(tiny["tokenizer"])
    python_text, go_text = "x = 1\n" * 100, "package main\n\nfunc main() {\n\tx := 1\n}\n" * 20
    rust_text = "fn main() {\n    let y = 2;\n}\n" * 60
    texts = [(python_text, "python"), (python_text + "y = 2\n", "python"), (go_text, "go"), (rust_text, "rust")]

    def shares(language_shares: dict | None) -> dict[str, float]:
        sampler = InfillSampler(texts, tokenizer, 48, 16, seed=0, language_shares=language_shares)
        draws = [sampler.draw_parts() for _ in range(1000)]
        text = ["".join(parts) for parts in draws]
        go = sum("package" in t or "func" in t or "x :=" in t for t in text) / len(text)
        rust = sum("fn " in t or "let y" in t for t in text) / len(text)
        return {"go": go, "rust": rust, "python": 1 - go - rust}

    natural = shares(None)  # by size
    size = {language: sum(len(t) for t, lang in texts if lang == language) for language in ("python", "go", "rust")}
    assert all(abs(natural[lang] - size[lang] / sum(size.values())) < 0.06 for lang in size)
    assert abs(shares({"go": 0.7})["go"] - 0.7) < 0.06
    listed = shares({"go": 0.5, "rust": 0.1})  # Python, unlisted, takes the 0.4 left
    assert abs(listed["rust"] - 0.1) < 0.04 and abs(listed["python"] - 0.4) < 0.06
    assert shares({"python": 0.0, "rust": 0.0})["go"] == 1.0
    with pytest.raises(ValueError, match="no file to draw"):
        shares({"python": 0.0, "rust": 0.0, "go": 0.0})


def _source_tree(root: Path) -> list:
    """Files written for a corpus build: distinct ones, an exact duplicate (whitespace aside), a
    near duplicate, one too small and one generated."""
    root.mkdir()
    files = []
    for i in range(30):
        body = "\n".join(f"def function_{i}_{j}(value_{j}):\n    return value_{j} * {i + j} + {j}" for j in range(12))
        files.append((f"module_{i}.py", body + "\n"))
    files.append(("copy.py", files[0][1].replace("\n", "  \n")))  # exact duplicate once whitespace is normalised
    files.append(("near.py", files[1][1].replace("return value_11 * 12 + 11", "return value_11 * 12 + 12")))
    files.append(("tiny.py", "x = 1\n"))
    files.append(("generated.py", "# Generated by a tool. DO NOT EDIT.\n" + files[2][1]))
    sources = []
    for name, text in files:
        (root / name).write_text(text)
        sources.append(corpus_module.SourceFile(root / name, "example", "1.0", "MIT", "python"))
    return sources


def test_corpus_build_deduplicates_the_same_with_any_number_of_workers(tmp_path: Path) -> None:
    sources = _source_tree(tmp_path / "src")
    one = corpus_module.build(tmp_path / "one", sources, workers=1)
    two = corpus_module.build(tmp_path / "two", sources, workers=2)
    assert one == two
    assert (one["exact_dup"], one["near_dup"], one["filtered"]) == (1, 1, 2)
    assert one["train"] + one["val"] == 30
    for split in ("train", "val"):
        assert (tmp_path / "one" / f"{split}.jsonl").read_bytes() == (tmp_path / "two" / f"{split}.jsonl").read_bytes()


# A program with threads and its own SIGTERM handler (the tests, the trainer) builds a corpus. The
# at-fork hook stands for a lock that another thread held when the process forked: a forked worker
# that needs it waits for ever, ignores terminate(), and the build never returns (a CI run hung so).
_BUILD_IN_A_HANDLING_PROGRAM = """
import os, signal, sys, threading
from pathlib import Path
from difill.training import corpus
signal.signal(signal.SIGTERM, lambda *_: None)
os.register_at_fork(after_in_child=lambda: threading.Event().wait())
sources = [corpus.SourceFile(Path(p), "example", "1.0", "MIT", "python") for p in sys.argv[2:]]
print(corpus.build(Path(sys.argv[1]), sources, workers=2)["train"])
"""


def test_corpus_workers_do_not_inherit_the_programs_locks_or_handlers(tmp_path: Path) -> None:
    sources = [str(s.path) for s in _source_tree(tmp_path / "src")]
    process = subprocess.Popen([sys.executable, "-c", _BUILD_IN_A_HANDLING_PROGRAM, str(tmp_path / "out"), *sources],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the corpus build hung: its workers were forked from the calling program")
    assert process.returncode == 0, err
    assert int(out.split()[-1]) > 0


def test_corpus_add_takes_an_earlier_corpus_with_its_attribution_and_splits(tmp_path: Path) -> None:
    import lzma

    sources = _source_tree(tmp_path / "src")
    corpus_module.build(tmp_path / "part", sources[:20])
    part = tmp_path / "part"
    for split in ("train", "val"):  # the compressed form that travels
        (part / f"{split}.jsonl.xz").write_bytes(lzma.compress((part / f"{split}.jsonl").read_bytes()))
        (part / f"{split}.jsonl").unlink()
    added = corpus_module.corpus_files(part)
    assert [a.text for a in added] == [s.path.read_text() for s in sources[:20]]
    rest = [corpus_module.SourceFile(s.path, "other", "2.0", "BSD-3-Clause", "python") for s in sources[20:]]
    corpus_module.build(tmp_path / "merged", added + rest)
    corpus_module.build(tmp_path / "whole", sources)
    merged = json.loads((tmp_path / "merged" / "MANIFEST.json").read_text())
    whole = json.loads((tmp_path / "whole" / "MANIFEST.json").read_text())
    # Every file lands in the split it had, with the package it came from; the duplicates of the
    # added part's files among the others are removed all the same.
    assert {f["file"]: f["split"] for f in merged["files"]} == {f["file"]: f["split"] for f in whole["files"]}
    assert {f["file"]: f["package"] for f in merged["files"] if f["file"] in {str(s.path) for s in sources[:20]}} == \
        {str(s.path): "example" for s in sources[:20]}
    assert merged["stats"]["exact_dup"] == 1 and merged["stats"]["near_dup"] == 1
    assert {p["name"] for p in merged["packages"]} == {"example", "other"}
