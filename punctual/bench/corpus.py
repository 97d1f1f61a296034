"""Real text for the benchmark workloads: questions we wrote, documents and source code that ship
with Python.

A trained model behaves differently on real text than on word salad: it copies from its context
(which prompt lookup exploits), its output lengths and stops follow the text, and its tokenizer
splits real words and code differently. Nothing here is downloaded:

- questions: everyday and technical questions written for Punctual's benchmarks;
- documents: the documentation of standard-library modules (the module's docstring, then those
  of its public classes and functions), one document per module, in a fixed order;
- sources: standard-library Python files, in a fixed order.

Token counts are estimated (about 1.5 tokens per word of documentation prose, and one per 4 characters of
code, in Llama-family tokenizers); the server's usage is the truth.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import sysconfig
from pathlib import Path

TOKENS_PER_WORD = {"prose": 1.5}
CHARS_PER_CODE_TOKEN = 4.0

QUESTIONS = (
    "What is the capital of France?",
    "How do vaccines train the immune system?",
    "Why is the sky blue during the day and red at sunset?",
    "Explain the difference between a list and a tuple in Python.",
    "What are three tips for getting better sleep?",
    "How does a refrigerator keep food cold?",
    "Write a short poem about autumn leaves.",
    "What causes the seasons on Earth?",
    "How do I reverse a string in Python?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is the difference between weather and climate?",
    "Give me a recipe for a simple tomato soup.",
    "How does compound interest work?",
    "What is photosynthesis?",
    "Explain what an API is to a ten-year-old.",
    "What are the main causes of inflation?",
    "How can I improve my public speaking?",
    "What is the Pythagorean theorem, with an example?",
    "Why do cats purr?",
    "Describe how a bill becomes a law.",
    "What is the difference between TCP and UDP?",
    "Suggest a name for a bakery that sells bread and coffee.",
    "How do I make a good first impression at a job interview?",
    "What is machine learning?",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "How many planets are in the solar system, and what are they?",
    "What does a database index do?",
    "Why is exercise good for mental health?",
    "Write a haiku about the ocean.",
    "What are prime numbers? List the first ten.",
    "How does a bicycle stay upright?",
    "Explain recursion with a simple example.",
    "What should I pack for a weekend hiking trip?",
    "What is the boiling point of water at sea level?",
    "How do solar panels produce electricity?",
    "What is the difference between a virus and a bacterium?",
    "Give three ideas for a rainy-day activity with children.",
    "How do I write a polite email declining an invitation?",
    "What is a black hole?",
    "Why do we have leap years?",
)

# Modules whose documentation does not change with what else is imported: `inspect` was one of
# them until torch was seen to replace inspect.getfile on import, which made a workload's text
# depend on whether the tool that generated it had imported torch.
DOCUMENT_MODULES = (
    "argparse", "difflib", "statistics", "textwrap", "heapq", "json", "csv", "fractions", "decimal", "collections",
    "functools", "itertools", "pathlib", "logging", "unittest", "email", "http.client", "asyncio", "threading",
    "datetime", "calendar", "random", "re", "string", "shutil", "subprocess", "zipfile", "tarfile", "sqlite3",
    "urllib.parse", "enum", "dataclasses", "typing", "contextlib", "shlex", "pickle", "socket", "codecs",
)

SOURCE_FILES = (
    "textwrap.py", "heapq.py", "bisect.py", "json/decoder.py", "json/encoder.py", "functools.py", "statistics.py",
    "fractions.py", "difflib.py", "csv.py", "argparse.py", "shlex.py", "string.py", "calendar.py", "glob.py",
    "fnmatch.py", "colorsys.py", "queue.py", "sched.py", "graphlib.py",
)


@functools.cache
def documents() -> tuple[str, ...]:
    """One document per module: its documentation as `help()` would order it."""
    docs = []
    for name in DOCUMENT_MODULES:
        module = importlib.import_module(name)
        parts = [inspect.getdoc(module) or ""]
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{attr}: {doc}")
        docs.append("\n\n".join(p for p in parts if p))
    return tuple(docs)


@functools.cache
def sources() -> tuple[str, ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return tuple((stdlib / name).read_text(encoding="utf-8") for name in SOURCE_FILES if (stdlib / name).exists())


@functools.lru_cache(maxsize=512)
def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())  # split once: a million-request workload cuts ~3 excerpts from each


@functools.lru_cache(maxsize=512)
def _lines(text: str) -> tuple[str, ...]:
    return tuple(text.splitlines())


def excerpt(texts: tuple[str, ...], index: int, offset: int, num_tokens: int, kind: str = "prose") -> str:
    """About `num_tokens` tokens of text, starting `offset` words (or, for code, lines) into text
    `index`, wrapping around and on into the next texts when one runs out."""
    index %= len(texts)
    if kind == "code":  # whole lines, so indentation survives
        budget = max(1, round(num_tokens * CHARS_PER_CODE_TOKEN))
        lines = _lines(texts[index])
        offset %= max(1, len(lines))
        out: list[str] = []
        size = 0
        while size < budget:
            if offset >= len(lines):
                index = (index + 1) % len(texts)
                lines, offset = _lines(texts[index]), 0
                continue
            line = lines[offset][:budget - size]
            out.append(line)
            size += len(line) + 1
            offset += 1
        return "\n".join(out)
    wanted = max(1, round(num_tokens / TOKENS_PER_WORD["prose"]))
    words = _words(texts[index])
    offset %= max(1, len(words))
    pieces: list[str] = []
    while len(pieces) < wanted:
        pieces.extend(words[offset:offset + wanted - len(pieces)])
        index = (index + 1) % len(texts)
        words, offset = _words(texts[index]), 0
    return " ".join(pieces)
