"""Tokenizer loading and incremental detokenization (front-end work: never inside the model step)."""
from __future__ import annotations

from pathlib import Path


def load_tokenizer(path: Path | str):
    """The checkpoint's tokenizer through transformers, as users of the checkpoint would load it."""
    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"checkpoint {path} has no tokenizer.json or tokenizer_config.json")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding the whole output.

    Decodes a small window (a few tokens of context before the unread ones) and emits only what
    is new; a window ending in an incomplete UTF-8 sequence ("\ufffd") waits for the next token,
    but only for MAX_HELD_TOKENS: a character is at most 4 bytes, so beyond that the bytes are
    invalid, not incomplete, and go out as "\ufffd" (otherwise a model stuck on stray bytes
    streams nothing at all until it finishes).
    """

    CONTEXT_TOKENS = 5
    MAX_HELD_TOKENS = 4

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_token_ids: list[int]) -> str:
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        held = len(self.token_ids) - self.read_offset
        if len(full_text) > len(prefix_text) and (not full_text.endswith("\ufffd") or held >= self.MAX_HELD_TOKENS):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            return full_text[len(prefix_text):]
        return ""
