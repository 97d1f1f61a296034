"""Benchmark workloads: seeded request lists whose lengths follow documented distributions.

Prompts are real text by default (`text="real"`, see corpus.py): chat asks questions written
for Punctual (with documentation excerpts as context when the prompt is long), summarize and
shared-prefix carry standard-library documentation, code carries standard-library Python source,
so a trained model copies, stops and tokenizes as it would in use; their token counts are
estimates. `text="synthetic"` keeps the earlier word salad: words from a fixed list of common
English words, each a single token in the built-in tokenizer (and in the GPT-2, Llama and
SmolLM tokenizers), so a prompt of N words is exactly about N tokens. Outputs are forced to
their sampled length with `max_tokens` and `ignore_eos`. Nothing is downloaded.

Every length is multiplied by `length_scale` (then rounded, at least 1 prompt token and 2
output tokens) so that a slow CPU can run the same shape at a fraction of the cost.

Lengths (and shared prefixes, and tenants) come from `seed`; the words of the rest of each
prompt come from `seed` and `salt`. A rate sweep gives each run its own salt: the same
lengths, but prompts that the previous run did not leave in a prefix cache.

The workloads, and the statistics each follows:

- chat: ShareGPT-like. Lognormal prompt and output lengths whose means match the ShareGPT
  figures reported in the vLLM paper (Kwon et al., SOSP'23: mean prompt 161, mean output 338
  tokens), with sigma 1.0 (prompts) and 0.8 (outputs) for the long tail; clipped to
  [4, 1024] like vLLM's ShareGPT sampler drops longer requests.
- summarize: long documents, short summaries, in the range of LongBench-style summarization
  (DistServe's summarization workload): prompt lognormal mean 1400, sigma 0.2, clipped to
  [1000, 1700]; output lognormal mean 100, sigma 0.5, clipped to [16, 256]. The upper clip
  keeps prompt + output inside a 2,048-token context.
- code: medium prompts, long outputs (a function signature and surrounding code in, a body
  out), a decode-heavy shape rather than a fit to one dataset: prompt lognormal mean 400,
  sigma 0.5, clipped to [64, 1024]; output lognormal mean 600, sigma 0.4, clipped to [64, 1024].
- shared-prefix: a few long shared contexts (system prompts or retrieved documents) reused by
  many requests, as in Prompt Cache (Gim et al., MLSys'24) and RAGCache (Jin et al., 2024):
  4 prefixes of 1,024 tokens, chosen with Zipf(1) popularity (RAGCache reports skewed
  document reuse); each request appends a question (lognormal mean 64, sigma 0.5, clipped to
  [8, 256]) and asks for an answer (lognormal mean 128, sigma 0.5, clipped to [16, 512]).
- multi-turn: conversations whose prompt is the whole history so far: each turn adds a user
  message (lognormal mean 64, sigma 0.8, clipped to [4, 512]) and the previous turn's reply
  (lognormal mean 128, sigma 0.8, clipped to [4, 512]; synthetic text, so prompts can be made
  in advance); 2 to 6 turns per conversation (uniform), history truncated from the front to
  1,536 tokens. Requests are ordered turn by turn across conversations (all first turns, then
  all second turns, ...) so that a turn is sent after the one before it in an open-loop run.
- multi-tenant: chat-shaped requests from 4 tenants whose rates stand 4:2:1:1 (one heavy
  hitter with half the traffic, as in VTC's fairness experiments, Sheng et al., OSDI'24).
  Each request's tenant is drawn with probability proportional to its rate, which makes each
  tenant's arrivals a Poisson process of its own when the total is Poisson. The tenant goes
  in the OpenAI `user` field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Common English words; each is one token in the built-in tokenizer with a leading space.
WORDS = tuple("""
the of and to in is that for it as with was on be by this are from or an at not have but which one
all can their has its more time when will some value name data file list return new first each other
number used line string object type default error call test code text path case set get add end out
use only any into may over after state then also two must same size both such most where these many
them before while under back part point order result field class method module function system
process server client request response message key table index user group model token block cache
memory queue batch stream event thread task step rate load plan check start stop open close read
write send receive store update delete create build run make find keep take give show tell ask work
turn move play help need want like look come go know think see say long short high low small large
early late next last good great little own old right left big few full real best sure free clear
simple single double main local global public private common general special given known based often
always never still again here there today week month year day hour minute second book letter word
question answer reason idea fact issue problem change effect level area family person people child
price cost service policy report study history form news
""".split())


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: its prompt text and the lengths it asks for."""

    prompt: str
    prompt_len: int          # intended prompt tokens (one per word); the server's usage is the truth
    output_len: int          # tokens to generate, enforced with max_tokens + ignore_eos
    user: str | None = None  # tenant, sent as the OpenAI `user` field
    arrival_s: float | None = None  # offset from the start, for trace replay; else the arrival process decides


def words(rng: np.random.Generator, count: int) -> str:
    """`count` words drawn uniformly from WORDS: about `count` tokens, and no two prompts share a prefix."""
    picks = rng.integers(0, len(WORDS), size=count)
    return " ".join(WORDS[i] for i in picks)


TEXT_KINDS = ("real", "synthetic")


def prompt_text(style: str, rng: np.random.Generator, num_tokens: int, text: str) -> str:
    """About `num_tokens` tokens of prompt in a workload's style (chat, document, code, reply)."""
    if text == "synthetic":
        return words(rng, num_tokens)
    from punctual.bench import corpus

    def pick(texts) -> tuple[int, int]:
        return int(rng.integers(0, len(texts))), int(rng.integers(0, 1 << 30))

    if style == "code":
        return corpus.excerpt(corpus.sources(), *pick(corpus.sources()), num_tokens, "code")
    if style == "chat":
        question = corpus.QUESTIONS[int(rng.integers(0, len(corpus.QUESTIONS)))]
        question_tokens = round(len(question.split()) * corpus.TOKENS_PER_WORD["prose"])
        if num_tokens <= question_tokens + 8:  # too short for a question with context: an excerpt
            return corpus.excerpt(corpus.documents(), *pick(corpus.documents()), num_tokens)
        context = corpus.excerpt(corpus.documents(), *pick(corpus.documents()), num_tokens - question_tokens - 4)
        return f"{context}\n\nQuestion: {question}"
    if style == "summarize":
        body = corpus.excerpt(corpus.documents(), *pick(corpus.documents()), max(1, num_tokens - 6))
        return f"Summarize the following text.\n\n{body}"
    return corpus.excerpt(corpus.documents(), *pick(corpus.documents()), num_tokens)  # a document or a reply


def lognormal_lengths(rng: np.random.Generator, count: int, mean: float, sigma: float,
                      low: int, high: int) -> np.ndarray:
    """Integer lengths from a lognormal with the given mean (not median) and log-space sigma, clipped."""
    mu = math.log(mean) - sigma * sigma / 2  # the mean of a lognormal is exp(mu + sigma^2 / 2)
    return np.clip(np.rint(rng.lognormal(mu, sigma, size=count)), low, high).astype(int)


def scaled(length: int, scale: float, minimum: int) -> int:
    return max(minimum, int(round(length * scale)))


def _independent(rng, text_rng, num_requests, scale, prompt, output, text, style, user=None):
    """Requests with independent prompt and output lengths: (mean, sigma, low, high) for each."""
    prompt_lens = lognormal_lengths(rng, num_requests, *prompt)
    output_lens = lognormal_lengths(rng, num_requests, *output)
    requests = []
    for i in range(num_requests):
        n_in, n_out = scaled(prompt_lens[i], scale, 1), scaled(output_lens[i], scale, 2)
        requests.append(BenchRequest(prompt_text(style, text_rng, n_in, text), n_in, n_out,
                                     None if user is None else user[i]))
    return requests


CHAT_PROMPT = (161, 1.0, 4, 1024)
CHAT_OUTPUT = (338, 0.8, 4, 1024)


# Each workload: (num_requests, rng for lengths, rng for prompt text, length scale, text kind) -> requests.

def chat(num_requests: int, rng: np.random.Generator, text_rng: np.random.Generator,
         scale: float, text: str = "real") -> list[BenchRequest]:
    return _independent(rng, text_rng, num_requests, scale, CHAT_PROMPT, CHAT_OUTPUT, text, "chat")


def summarize(num_requests: int, rng: np.random.Generator, text_rng: np.random.Generator,
              scale: float, text: str = "real") -> list[BenchRequest]:
    return _independent(rng, text_rng, num_requests, scale, (1400, 0.2, 1000, 1700), (100, 0.5, 16, 256),
                        text, "summarize")


def code(num_requests: int, rng: np.random.Generator, text_rng: np.random.Generator,
         scale: float, text: str = "real") -> list[BenchRequest]:
    return _independent(rng, text_rng, num_requests, scale, (400, 0.5, 64, 1024), (600, 0.4, 64, 1024),
                        text, "code")


SHARED_PREFIXES = 4
SHARED_PREFIX_LEN = 1024


def shared_prefix(num_requests: int, rng: np.random.Generator, text_rng: np.random.Generator,
                  scale: float, text: str = "real") -> list[BenchRequest]:
    prefix_len = scaled(SHARED_PREFIX_LEN, scale, 1)
    # From the seed alone, so shared across salts; one line each (no blank line inside a prefix).
    prefixes = [prompt_text("document", rng, prefix_len, text) for _ in range(SHARED_PREFIXES)]
    popularity = 1.0 / np.arange(1, SHARED_PREFIXES + 1)  # Zipf(1)
    choice = rng.choice(SHARED_PREFIXES, size=num_requests, p=popularity / popularity.sum())
    question_lens = lognormal_lengths(rng, num_requests, 64, 0.5, 8, 256)
    output_lens = lognormal_lengths(rng, num_requests, 128, 0.5, 16, 512)
    requests = []
    for i in range(num_requests):
        n_question = scaled(question_lens[i], scale, 1)
        prompt = prefixes[choice[i]] + "\n\n" + prompt_text("chat", text_rng, n_question, text)
        requests.append(BenchRequest(prompt, prefix_len + n_question, scaled(output_lens[i], scale, 2)))
    return requests


MAX_HISTORY = 1536


def multi_turn(num_requests: int, rng: np.random.Generator, text_rng: np.random.Generator,
               scale: float, text: str = "real") -> list[BenchRequest]:
    # Turns are kept as words; a word is a token of synthetic text, about 1.5 of real prose.
    tokens_per_word = 1.0 if text == "synthetic" else _prose_tokens_per_word()
    max_words = max(1, round(scaled(MAX_HISTORY, scale, 1) / tokens_per_word))
    conversations: list[list[BenchRequest]] = []
    total = 0
    while total < num_requests:
        turns = int(rng.integers(2, 7))
        history: list[str] = []  # words so far, user and assistant turns alternating
        conversation = []
        for _ in range(min(turns, num_requests - total)):
            n_user = scaled(lognormal_lengths(rng, 1, 64, 0.8, 4, 512)[0], scale, 1)
            history += prompt_text("reply", text_rng, n_user, text).split()
            history = history[-max_words:]
            n_out = scaled(lognormal_lengths(rng, 1, 128, 0.8, 4, 512)[0], scale, 2)
            conversation.append(BenchRequest(" ".join(history), max(1, round(len(history) * tokens_per_word)), n_out))
            history += prompt_text("reply", text_rng, n_out, text).split()  # the reply the next turn carries
        conversations.append(conversation)
        total += len(conversation)
    # Turn by turn across conversations, so each turn follows the one before it.
    longest = max(len(c) for c in conversations)
    return [c[t] for t in range(longest) for c in conversations if t < len(c)]


def _prose_tokens_per_word() -> float:
    from punctual.bench.corpus import TOKENS_PER_WORD

    return TOKENS_PER_WORD["prose"]


TENANT_RATE_SHARES = (4, 2, 1, 1)


def multi_tenant(num_requests: int, rng: np.random.Generator, text_rng: np.random.Generator,
                 scale: float, text: str = "real") -> list[BenchRequest]:
    shares = np.array(TENANT_RATE_SHARES, dtype=float)
    tenants = rng.choice(len(shares), size=num_requests, p=shares / shares.sum())
    return _independent(rng, text_rng, num_requests, scale, CHAT_PROMPT, CHAT_OUTPUT, text, "chat",
                        user=[f"tenant-{t}" for t in tenants])


WORKLOADS = {"chat": chat, "summarize": summarize, "code": code, "shared-prefix": shared_prefix,
             "multi-turn": multi_turn, "multi-tenant": multi_tenant}


def generate_workload(name: str, num_requests: int, seed: int = 0, length_scale: float = 1.0,
                      salt: int = 0, text: str = "real") -> list[BenchRequest]:
    """The requests of workload `name`; the same arguments always give the same requests, and
    another `salt` the same lengths with other text. `text`: real (default) or synthetic."""
    if text not in TEXT_KINDS:
        raise ValueError(f"text: unknown {text!r}; choose from {', '.join(TEXT_KINDS)}")
    if name not in WORKLOADS:
        raise ValueError(f"workload: unknown {name!r}; choose from {', '.join(WORKLOADS)}")
    if num_requests < 1:
        raise ValueError(f"num_requests: must be at least 1, got {num_requests}")
    if not length_scale > 0:
        raise ValueError(f"length_scale: must be positive, got {length_scale}")
    return WORKLOADS[name](num_requests, np.random.default_rng(seed), np.random.default_rng([seed, salt, 1]),
                           length_scale, text)


def load_trace(path: str | Path, seed: int = 0, length_scale: float = 1.0) -> list[BenchRequest]:
    """Requests and arrival times from a JSONL trace, one object per line.

    Fields: `timestamp` (or `arrival_time`; seconds, any origin), `prompt` (text) or
    `prompt_len` (or `input_length`; tokens, filled with words), `output_len` (or
    `output_length`; tokens), optional `user`. Arrivals are made relative to the first and
    sorted; lengths from the trace are scaled by `length_scale`, given prompt text is not.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"trace {path} line {line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
        arrival = _field(row, where, "timestamp", "arrival_time")
        n_out = _field(row, where, "output_len", "output_length")
        if "prompt" in row:
            prompt = str(row["prompt"])
            n_in = len(prompt.split())
        else:
            n_in = scaled(int(_field(row, where, "prompt_len", "input_length")), length_scale, 1)
            prompt = words(rng, n_in)
        rows.append(BenchRequest(prompt, n_in, scaled(int(n_out), length_scale, 2), row.get("user"), float(arrival)))
    if not rows:
        raise ValueError(f"trace {path}: no requests")
    start = min(r.arrival_s for r in rows)
    rows.sort(key=lambda r: r.arrival_s)
    return [BenchRequest(r.prompt, r.prompt_len, r.output_len, r.user, r.arrival_s - start) for r in rows]


def _field(row: dict, where: str, *names: str):
    for name in names:
        if name in row:
            return row[name]
    raise ValueError(f"{where}: missing field {' or '.join(repr(n) for n in names)}")
