"""Train difill's byte-level BPE on the corpus.

Byte-level so that any UTF-8 text round-trips exactly; GPT-2 style pre-splitting keeps runs
of spaces together, so indentation becomes single tokens once BPE merges them.

    python -m difill.training.tokenizer --corpus data/corpus --out data/tokenizer.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from difill.inference.tokenizer import SPECIAL_TOKENS

log = logging.getLogger(__name__)


def corpus_texts(corpus: Path, max_bytes: int) -> Iterator[str]:
    total = 0
    with open(corpus / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            total += len(text)
            if total > max_bytes:
                return
            yield text


def train_tokenizer(corpus: Path, out: Path, vocab_size: int = 8192, max_bytes: int = 60_000_000) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_texts(corpus, max_bytes), trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    log.info("tokenizer: %d tokens -> %s", tokenizer.get_vocab_size(), out)
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--out", type=Path, default=Path("data/tokenizer.json"))
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-bytes", type=int, default=60_000_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_tokenizer(args.corpus, args.out, args.vocab_size, args.max_bytes)


if __name__ == "__main__":
    main()
