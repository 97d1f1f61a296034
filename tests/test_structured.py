"""Structured output in the core: a slow compile does not stall others; matchers roll back rejected
proposals and are not advanced twice by a preemption's recompute."""
from __future__ import annotations

import json
import threading

import llguidance
import torch

from punctual.config import EngineConfig
from punctual.engine.core import EngineCore
from punctual.checkpoints.builtin import builtin_path
from punctual.request import EngineCoreRequest
from punctual.sampling_params import SamplingParams
from punctual.structured.compiler import DEFAULT_TIMEOUT_S, GrammarCompiler
from punctual.structured.guide import Guide
from punctual.structured.spec import StructuredOutput
from punctual.tokenizer import load_tokenizer
from waiting import wait_until

SCHEMA = StructuredOutput.json_schema({"type": "object", "properties": {"k": {"enum": ["v", "w"]}},
                                       "required": ["k"], "additionalProperties": False})


def test_slow_compile_does_not_stall_other_requests(monkeypatch):
    """The grammar's compile is held until the plain request has finished: that can only happen
    if the step loop kept running the plain request while the compile was pending."""
    core = EngineCore(EngineConfig.from_kwargs("builtin-tiny", kv_cache_memory="64MiB"))
    compile_fn = GrammarCompiler._compile
    plain_finished = threading.Event()
    released_by_plain: list[bool] = []

    def held(self, spec):
        # Bounded below the waitlist's compile timeout: a stalled loop fails the assert, not the request.
        released_by_plain.append(plain_finished.wait(timeout=DEFAULT_TIMEOUT_S / 2))
        return compile_fn(self, spec)

    monkeypatch.setattr(GrammarCompiler, "_compile", held)
    core.add_request(EngineCoreRequest("slow", [1, 2, 3], SamplingParams(max_tokens=30, structured=SCHEMA)))
    core.add_request(EngineCoreRequest("plain", [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True)))
    finish_order: list[str] = []
    texts: dict[str, list[int]] = {"slow": [], "plain": []}

    def step() -> bool:
        for out in core.step():
            texts[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finish_order.append(out.request_id)
                if out.request_id == "plain":
                    plain_finished.set()
        return not core.has_unfinished_requests()

    wait_until(step, timeout=60, message=lambda: f"requests still unfinished; finished: {finish_order}",
               interval=0)
    assert released_by_plain == [True], "the compile held the step loop: the plain request could not finish"
    assert finish_order == ["plain", "slow"]
    assert len(texts["plain"]) == 8
    tokenizer = load_tokenizer(core.runner.model_path)
    assert json.loads(tokenizer.decode(texts["slow"], skip_special_tokens=True))["k"] in ("v", "w")


def test_guide_rolls_back_rejected_proposals_and_masks_rows():
    core_tokenizer = load_tokenizer(builtin_path("builtin-tiny"))
    vocab = len(core_tokenizer)
    compiler = GrammarCompiler(lambda: core_tokenizer, vocab, (core_tokenizer.eos_token_id,))
    guide = Guide(vocab)
    guide.start("r", compiler.compile(StructuredOutput("regex", "ab(c|d)e")))
    ids = lambda s: core_tokenizer.encode(s)  # noqa: E731
    a, b, c, x = ids("a")[0], ids("b")[0], ids("c")[0], ids("x")[0]
    # Row 0 before any proposal, row 1 after "a", row 2 after "ab"; "x" is outside the grammar.
    logits = torch.zeros(4, vocab)
    guide.mask(logits, [(0, "r", [a, b, x])])
    assert logits[0, a] == 0 and logits[0, b] == float("-inf")
    assert logits[1, b] == 0 and logits[1, a] == float("-inf")
    assert logits[2, c] == 0 and logits[2, x] == float("-inf")  # the proposal x is rejected by the mask
    assert (logits[3] == 0).all()  # past the refused proposal: untouched (never used)
    guide.advance({"r": [a, b, c]})  # kept: a, b and the token drawn at row 2
    assert guide.matchers["r"].validate_tokens(ids("e")) == 1
    # A recompute after preemption samples only the next token: the matcher sees each token once.
    guide.advance({"r": ids("e")})
    assert guide.matchers["r"].is_accepting()
    guide.forget("r")
    assert not guide.matchers and isinstance(compiler.tokenizer, llguidance.LLTokenizer)
