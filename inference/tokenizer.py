"""The tokenizer wrapper: a Hugging Face ``tokenizers`` file plus the special tokens difill needs.

difill's own vocabulary reserves the special tokens below at fixed ids 0..6, so that model code
never has to look them up by string. Open checkpoints bring their own ids through their
config; :class:`Tokenizer` only encodes and decodes.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

# Order matters: these become ids 0..6 of difill's vocabulary.
SPECIAL_TOKENS = ["<|mask|>", "<|eoi|>", "<|pad|>", "<|prefix|>", "<|suffix|>", "<|middle|>", "<|bos|>"]
MASK, EOI, PAD, PREFIX, SUFFIX, MIDDLE, BOS = range(len(SPECIAL_TOKENS))


class TokenizerError(ValueError):
    """The tokenizer file is missing or unreadable."""


class Tokenizer:
    """Exact byte-level round trip: ``decode(encode(s)) == s`` for every UTF-8 string."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._pieces: list[str] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # the Rust side raises a bare Exception for bad JSON
            raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        return self._encode(text).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and the (start, end) character span of each token in ``text``."""
        encoding = self._encode(text)
        return encoding.ids, encoding.offsets

    def _encode(self, text: str):
        try:
            return self.hf.encode(text, add_special_tokens=False)
        except TypeError as exc:  # the Rust side's answer to anything that is not valid Unicode text
            if not isinstance(text, str):
                raise TokenizerError(f"expected text, got {type(text).__name__}") from exc
            bad = next((i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF), None)
            where = f" (a lone surrogate at character {bad})" if bad is not None else ""
            raise TokenizerError(f"the text is not valid Unicode{where}") from exc

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def piece(self, token_id: int) -> str:
        """The text of one token (a partial UTF-8 character decodes to U+FFFD)."""
        return self.pieces()[token_id] if 0 <= token_id < self.vocab_size else ""

    def pieces(self) -> list[str]:
        """The text of every token, decoded once (the sampler's critics and the end-of-line test
        read them per step)."""
        if self._pieces is None:
            self._pieces = self.hf.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=True)
        return self._pieces
