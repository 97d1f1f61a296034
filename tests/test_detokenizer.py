"""Incremental detokenization: a character split over tokens streams whole; stray bytes still stream."""
from __future__ import annotations

import pytest

from punctual.checkpoints.builtin import builtin_path
from punctual.tokenizer import IncrementalDetokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(builtin_path("builtin-tiny"))


def byte_level_char(value: int) -> str:
    """How byte-level BPE (GPT-2's scheme) spells one raw byte: printable Latin-1 bytes stand for
    themselves, the other 68 are moved to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    if value in printable:
        return chr(value)
    return chr(256 + [b for b in range(256) if b not in printable].index(value))


def byte_token(tokenizer, value: int) -> int:
    token_id = tokenizer.convert_tokens_to_ids(byte_level_char(value))
    assert token_id is not None and token_id != tokenizer.unk_token_id
    return token_id


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    return [detokenizer.add([token_id]) for token_id in token_ids]


def test_character_split_over_byte_tokens_streams_whole(tokenizer):
    prompt = tokenizer.encode("price:")
    euro = [byte_token(tokenizer, b) for b in "€".encode()]  # three bytes, three tokens
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt), euro)
    assert deltas == ["", "", "€"]


def test_stray_bytes_stream_before_the_end(tokenizer):
    """A random-weight model can emit lead bytes forever: the text must not wait for the finish."""
    prompt = tokenizer.encode("hello")
    lead = byte_token(tokenizer, 0xE2)  # starts a 3-byte character that never completes
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt), [lead] * 12)
    first = next(i for i, d in enumerate(deltas) if d)
    assert first < IncrementalDetokenizer.MAX_HELD_TOKENS
    assert "".join(deltas).count("\ufffd") >= 8
