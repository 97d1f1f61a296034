"""Multi-LoRA serving, offline: each adapter's float32 greedy tokens are PEFT's merged model's, in
batches mixing adapters and the base model, under chunked prefill, preemption and fewer slots than
adapters; adapters never share prefix-cache blocks; bad adapters are named errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import build_hf_checkpoint, build_peft_adapter, hf_greedy  # noqa: E402

from punctual import LLM, LoRARequest, SamplingParams  # noqa: E402

NEW_TOKENS = 8
PROMPTS = [[5, 17, 99, 3, 250, 1000, 7, 42, 11, 300, 8, 64],
           [900, 12, 13, 14, 400, 2, 77],
           [31, 1500, 600, 8, 9, 10, 2000, 123, 5, 6, 7, 81, 82, 83],
           [44, 45, 46, 47, 48]]
# Targets per adapter: every projection; attention only (rsLoRA); part of the MLP and o.
TARGETS = {
    "llama_gqa": [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  ["q_proj", "v_proj"], ["o_proj", "gate_proj", "down_proj"]],
    "qwen3": [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              ["k_proj", "up_proj"], ["o_proj", "down_proj"]],
    # Phi-3's fused projections
    "phi3_partial_rotary": [["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], ["qkv_proj"], ["gate_up_proj"]],
}


def greedy(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    return hf_greedy(path, prompts, NEW_TOKENS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (base path, [LoRARequest], {None or lora_int_id: PEFT's greedy tokens per prompt})."""
    built = {}
    for arch, target_sets in TARGETS.items():
        root = tmp_path_factory.mktemp(arch)
        base = build_hf_checkpoint(root / "base", arch)
        loras, expected = [], {None: greedy(base, PROMPTS)}
        for i, targets in enumerate(target_sets):
            path = build_peft_adapter(base, root / f"adapter{i}", targets, seed=10 + i, rslora=i == 1)
            lora = LoRARequest(f"{arch}-{i}", i + 1, str(path))
            loras.append(lora)
            expected[lora.lora_int_id] = greedy(path / "merged", PROMPTS)
        built[arch] = (base, loras, expected)
    return built


def run(llm: LLM, loras: list[LoRARequest | None], prompts=PROMPTS) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", list(TARGETS))
def test_mixed_batch_matches_peft_merged(arch, models):
    base, loras, expected = models[arch]
    # Every adapter changes the output, so a match below is not the base model's.
    assert all(expected[lora.lora_int_id] != expected[None] for lora in loras)
    # One step holds the base model and three adapters; prompts are prefilled in chunks of 8 tokens.
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=3, max_lora_rank=8,
              max_num_batched_tokens=8, min_prefill_chunk=1)
    chosen = [None, *loras]
    got = run(llm, chosen)
    assert got == [expected[None if lora is None else lora.lora_int_id][i] for i, lora in enumerate(chosen)]
    llm.engine.core.check_integrity()


def test_preemption_and_more_adapters_than_slots(models):
    base, loras, expected = models["llama_gqa"]
    # One slot for three adapters, a pool too small for every request at once: requests wait for
    # the slot, and running ones are preempted and recomputed under their own adapter.
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=1, max_cpu_loras=2, max_lora_rank=8,
              block_size=4, num_kv_blocks=10, max_num_batched_tokens=16, min_prefill_chunk=1)
    chosen = [loras[0], loras[1], None, loras[2], loras[1], loras[0], None, loras[2]]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(chosen))]
    runner, adapters_per_step = llm.engine.core.runner, []
    lora_step = runner._lora_step

    def counting(ordered):
        step = lora_step(ordered)
        adapters_per_step.append(0 if step is None else len(step.groups))
        return step

    runner._lora_step = counting
    got = run(llm, chosen, prompts)
    want = [expected[None if lora is None else lora.lora_int_id][i % len(PROMPTS)] for i, lora in enumerate(chosen)]
    assert got == want
    core = llm.engine.core
    assert max(adapters_per_step) == 1 and core.scheduler.num_lora_swaps >= 2
    assert core.scheduler.num_preemptions > 0
    assert core.runner.adapters.num_evictions > 0  # three adapters through an LRU of two
    stats = core.stats()  # what /metrics exports
    assert stats.lora_swaps == core.scheduler.num_lora_swaps and stats.lora_loads > 3 and stats.lora_adapters_loaded == 2
    assert stats.lora_running == {} and stats.lora_waiting_for_slot == {}
    core.check_integrity()


def test_adapters_never_share_prefix_cache_blocks(models):
    base, loras, _ = models["llama_gqa"]
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, block_size=4)
    kv = llm.engine.core.kv_manager
    prompt = PROMPTS[2]  # 14 tokens: three full blocks
    run(llm, [loras[0]], [prompt])
    hits = kv.prefix_hits
    run(llm, [loras[1]], [prompt])
    run(llm, [None], [prompt])
    assert kv.prefix_hits == hits  # another adapter, or the base model: nothing shared
    run(llm, [loras[0]], [prompt])
    assert kv.prefix_hits == hits + 12  # the same adapter again: its three full blocks


def test_bad_adapters_are_named_errors(models, tmp_path):
    base, loras, expected = models["llama_gqa"]
    phi3_loras = models["phi3_partial_rotary"][1]
    qwen3_loras = models["qwen3"][1]
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=4)
    with pytest.raises(ValueError, match="rank 8 is above max_lora_rank 4"):
        run(llm, [loras[0]], PROMPTS[:1])
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    assert run(llm, [loras[1]], PROMPTS[:1]) == [expected[loras[1].lora_int_id][0]]
    with pytest.raises(ValueError, match="no adapter_config.json"):
        run(llm, [LoRARequest("missing", 7, str(tmp_path / "nowhere"))], PROMPTS[:1])
    with pytest.raises(ValueError, match="target module 'qkv_proj'"):
        run(llm, [LoRARequest("phi3", 8, phi3_loras[1].lora_path)], PROMPTS[:1])
    with pytest.raises(ValueError, match="does not fit the base model"):  # qwen3's q is 128 wide, llama_gqa's 64
        run(llm, [LoRARequest("qwen3", 9, qwen3_loras[0].lora_path)], PROMPTS[:1])
    broken = Path(shutil.copytree(loras[0].lora_path, tmp_path / "broken"))
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read adapter_model.safetensors"):
        run(llm, [LoRARequest("broken", 10, str(broken))], PROMPTS[:1])
    with pytest.raises(ValueError, match="lora_int_id must be an int >= 1"):
        LoRARequest("zero", 0, loras[0].lora_path)
    with pytest.raises(ValueError, match="got 1 lora_request for 2 prompts"):
        run(llm, [loras[0]], PROMPTS[:2])
    # Nothing loaded was disturbed, and no request was left behind.
    assert run(llm, [loras[1]], PROMPTS[:1]) == [expected[loras[1].lora_int_id][0]]
    assert not llm.engine.has_unfinished_requests()
    plain = LLM(str(base), dtype="float32")
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        run(plain, [loras[0]], PROMPTS[:1])
    with pytest.raises(ValueError, match="max_cpu_loras"):
        LLM(str(base), enable_lora=True, max_loras=3, max_cpu_loras=2)


def test_chat_and_get_tokenizer(models):
    base, loras, _ = models["llama_gqa"]
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_lora_rank=8)
    tokenizer = llm.get_tokenizer()
    conversations = [[{"role": "user", "content": "hello there"}],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    chats = llm.chat(conversations, params, use_tqdm=False, lora_request=loras[0])
    for conversation, out in zip(conversations, chats):
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        assert out.prompt_token_ids == token_ids
        assert out.outputs[0].token_ids == run(llm, [loras[0]], [token_ids])[0]
    single = llm.chat(conversations[0], params, use_tqdm=False)  # one conversation, the base model
    assert len(single) == 1 and single[0].prompt_token_ids == chats[0].prompt_token_ids
    assert json.dumps(single[0].outputs[0].token_ids) != json.dumps(chats[0].outputs[0].token_ids)


def test_scheduler_admits_by_adapter_slot():
    """Pure scheduler: one slot; a request of another adapter waits (the base model does not),
    and takes the slot, a swap, once the first adapter's requests are done."""
    from punctual.config import SchedulerConfig
    from punctual.kv.manager import KVCacheManager
    from punctual.plan import ModelRunnerOutput
    from punctual.request import EngineCoreRequest, Request

    from punctual.sched.scheduler import Scheduler

    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(100, 16), max_loras=1)
    first, second = LoRARequest("a", 1, "/a"), LoRARequest("b", 2, "/b")
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for rid, lora in (("r1", first), ("r2", second), ("r3", None), ("r4", first)):
        sched.add_request(Request(EngineCoreRequest(rid, [1, 2, 3], params, lora_request=lora), 1000), 0.0)

    def step() -> list[str]:
        plan = sched.schedule(0.0)
        sched.update_from_output(plan, ModelRunnerOutput({s.request_id: [7] for s in plan.scheduled if s.samples}), 0.0)
        sched.check_integrity()
        return sorted(s.request_id for s in plan.scheduled)

    assert step() == ["r1", "r3", "r4"]  # r2's adapter has no slot; r4 shares r1's
    assert sched.lora_waiting_for_slot() == {"b": 1} and sched.lora_running_by_name() == {"a": 2}
    assert step() == ["r1", "r3", "r4"]  # each generated its 2 tokens: done
    assert step() == ["r2"] and sched.num_lora_swaps == 1 and sched.lora_slots == [2]
    assert sched.lora_waiting_for_slot() == {}


def test_fused_bf16_path_applies_adapters(tmp_path):
    """bf16 on the fused CPU kernels (layer by layer for a step with adapter rows, the whole-stack
    decode kernel skipped) gives eager's tokens, adapter and base rows in one batch."""
    from punctual.kernels import cpu_kernels

    if cpu_kernels.load() is None:
        pytest.skip(f"fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    base = build_hf_checkpoint(tmp_path / "base", "llama_head64")
    lora = LoRARequest("a", 1, str(build_peft_adapter(base, tmp_path / "a", TARGETS["llama_gqa"][0], seed=1)))
    outs = []
    for eager in (False, True):
        llm = LLM(str(base), dtype="bfloat16", enable_lora=True, enforce_eager=eager, max_lora_rank=8)
        assert (llm.engine.core.runner.model._stack is not None) != eager
        outs.append(run(llm, [lora, None], PROMPTS[:1] * 2))
    assert outs[0] == outs[1] and outs[0][0] != outs[0][1]


def test_the_router_hashes_an_adapters_prompt_as_its_replica_stores_it(models):
    """Cache-aware routing finds a LoRA request's cached prefix: the router's block hashes carry the
    adapter as the KV manager's do (else a replica holding it would never be seen to)."""
    from punctual.cluster.router import prompt_block_hashes

    base, loras, _ = models["llama_gqa"]
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8, block_size=4)
    prompt = PROMPTS[2]  # 14 tokens: three full blocks
    run(llm, [loras[0]], [prompt])
    pool = llm.engine.core.kv_manager.pool
    for adapter_id, found in ((loras[0].adapter_id, True), (loras[1].adapter_id, False), (None, False)):
        hashes = prompt_block_hashes(prompt, 4, None, "sha256", adapter_id)
        assert len(hashes) == 3
        assert all((pool.lookup(h) is not None) == found for h in hashes), adapter_id


def test_a_cold_adapter_is_read_off_the_step_loop(models, tmp_path):
    """In the server's core (background reads on), a request whose adapter is not loaded waits
    while a thread reads it; the base model's requests keep stepping meanwhile and finish first.
    Its tokens are PEFT's; a bad adapter rejects only its own request; a load command is answered
    when its read ends."""
    import threading

    from punctual.request import EngineCoreRequest

    base, loras, expected = models["llama_gqa"]
    llm = LLM(str(base), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
    core = llm.engine.core
    core.background_adapter_loads = True
    release = threading.Event()
    read = core.runner.read_adapter

    def slow_read(request):
        assert release.wait(30), "the test never released the read"
        return read(request)

    core.adapter_loads._read = slow_read
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    core.add_request(EngineCoreRequest("lora", PROMPTS[0], params, lora_request=loras[1]))
    core.add_request(EngineCoreRequest("base", PROMPTS[1], params))
    bad = LoRARequest("missing", 7, str(tmp_path / "nowhere"))
    core.add_request(EngineCoreRequest("bad", PROMPTS[2], params, lora_request=bad))
    assert core.load_lora(loras[2]) is None  # answered later
    tokens: dict[str, list[int]] = {"lora": [], "base": []}
    finished = []
    for _ in range(200):
        for out in core.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finished.append(out.request_id)
        if finished == ["base"]:
            release.set()  # the base request finished while the adapters were still being read
        if len(finished) == 2:
            break
    assert finished == ["base", "lora"]
    assert tokens["base"] == expected[None][1]
    assert tokens["lora"] == expected[loras[1].lora_int_id][0]
    assert "no adapter_config.json" in core.rejections.pop("bad")
    assert [(a.pin_id, a.ok) for a in core.lora_acks] == [(loras[2].lora_name, True)]
    assert loras[2].lora_int_id in core.runner.adapters
    assert not core.has_unfinished_requests()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sgmv_kernel_adds_what_the_pytorch_ops_add(dtype):
    """torch.ops.punctual.lora_sgmv_ (one call per linear for every adapter of the step) against
    the per-adapter PyTorch ops: groups of scattered rows, one group over every row, an adapter
    without the slot, fused parts with their own column and rank ranges, base rows untouched."""
    from punctual.kernels import cpu_kernels
    from punctual.lora.weights import LoRAAdapter, LoRALinear, LoRAStep

    kernels = cpu_kernels.load()
    if kernels is None:
        pytest.skip(f"fused CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    gen = torch.Generator().manual_seed(3)

    def lin(in_features, parts):  # parts: [(col_start, cols, rank)]
        a = torch.randn(sum(r for _, _, r in parts), in_features, generator=gen).to(dtype)
        packed, r0 = [], 0
        for col_start, cols, rank in parts:
            packed.append((col_start, col_start + cols, r0, r0 + rank, torch.randn(rank, cols, generator=gen).to(dtype)))
            r0 += rank
        return LoRALinear(a, packed)

    qkv = [(0, 96, 8), (96, 32, 4), (128, 32, 8)]
    adapters = [LoRAAdapter(None, 8, [{"qkv": lin(48, qkv), "down": lin(80, [(0, 48, 8)])}]),
                LoRAAdapter(None, 4, [{"qkv": lin(48, [(96, 32, 4)])}]),  # no "down": its rows untouched there
                LoRAAdapter(None, 16, [{"qkv": lin(48, [(0, 160, 16)]), "down": lin(80, [(0, 48, 16)])}])]
    rows = [torch.tensor([0, 5, 6]), torch.tensor([2]), torch.tensor([3, 7, 1])]  # row 4: the base model
    for groups in ([(rows[g], adapters[g]) for g in range(3)], [(None, adapters[2])]):
        for slot, in_features, out_features in (("qkv", 48, 160), ("down", 80, 48)):
            x = torch.randn(8, in_features, generator=gen).to(dtype)
            base = torch.randn(8, out_features, generator=gen).to(dtype)
            ref = LoRAStep(groups, 8).add(base.clone(), x, 0, slot)
            got = LoRAStep(groups, 8, kernels).add(base.clone(), x, 0, slot)
            # bf16: the PyTorch ops round each term to bf16 before adding it, the kernel once after
            scale = ref.abs().max().item()
            tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02 * scale, rtol=0.02)
            torch.testing.assert_close(got, ref, **tol)
            if len(groups) == 3:
                assert torch.equal(got[4], base[4])
