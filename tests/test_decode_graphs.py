"""The static, bucketed decode step that CUDA graphs capture (punctual/runner/decode_graphs.py).

Here it runs without the capture (the recording is CUDA's): the same padded batches, padded
contexts and scratch-block writes, checked against transformers' greedy tokens."""
from __future__ import annotations

import pytest
import torch

from hf_models import hf_greedy
from punctual import LLM, SamplingParams
from punctual.runner.decode_graphs import DecodeGraphs, capture_batch_sizes, capture_context_blocks
from test_exact_to_transformers import MAX_NEW, PROMPTS


def test_bucket_ladders():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(6) == [1, 2, 4, 6]
    assert capture_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    # 256 tokens of 16-token blocks first, doubling, and the model's whole length last
    assert capture_context_blocks(2048, 16) == [16, 32, 64, 128]
    assert capture_context_blocks(1000, 16) == [16, 32, 63]
    assert capture_context_blocks(100, 16) == [7]


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: hf_greedy(checkpoints[name], PROMPTS, MAX_NEW) for name in ("llama_gqa", "mistral", "qwen2_bias")}


@pytest.mark.parametrize("arch", ["llama_gqa", "mistral", "qwen2_bias"])
def test_bucketed_decode_steps_give_transformers_tokens(arch, checkpoints, references):
    # 10 requests a step at most, buckets up to 8: the first ten decode eagerly (no bucket holds
    # them), the last six in the bucket of 8 with two padded rows; every context is padded to the
    # first context bucket (64 blocks of 4 tokens).
    llm = LLM(str(checkpoints[arch]), num_kv_blocks=256, block_size=4, max_num_batched_tokens=2048,
              max_num_seqs=10)
    runner = llm.engine.core.runner
    graphs = runner.use_decode_graphs(8, capture=False)
    assert graphs.batch_sizes == [1, 2, 4, 8] and graphs.context_blocks == [64, 128]
    calls = []
    run = graphs.run
    graphs.run = lambda ids, *rest: calls.append(len(ids)) or run(ids, *rest)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == references[arch]
    assert graphs.replays > 0 and 6 in calls  # the last six decoded through the bucket of 8
    llm.engine.core.check_integrity()
    assert llm.engine.stats().kv_blocks_used == 0
    # The padded rows wrote to the scratch block, which the KV manager never hands out.
    assert runner.scratch_block == llm.engine.core.kv_manager.num_blocks
    assert runner.kv_caches[0].k[runner.scratch_block].abs().sum() > 0


def test_steps_no_bucket_holds_run_eagerly(checkpoints):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=256, block_size=4)
    graphs = llm.engine.core.runner.use_decode_graphs(4, capture=False)
    assert graphs.bucket(4, 300).batch == 4 and graphs.bucket(4, 300).blocks == 128
    assert graphs.bucket(3, 10).batch == 4 and graphs.bucket(3, 10).blocks == 64
    assert graphs.bucket(5, 10) is None  # more requests than the largest bucket
    assert graphs.bucket(1, 513) is None  # past max_model_len (512)
    # Prompt chunks, speculated tokens and prompt logprobs never go through a bucket.
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)
    assert graphs.replays == 3  # the three decodes after the prompt's step


def test_capture_needs_cuda_and_plain_ops(checkpoints):
    llm = LLM(str(checkpoints["llama_gqa"]), num_kv_blocks=64)
    runner = llm.engine.core.runner
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine captures for real (benchmarks/gpu_check.sh)")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeGraphs(runner.model, runner.kv_caches, 16, runner.scratch_block, 4, 512, capture=True)
    assert runner.decode_graphs is None  # CPU: no capture unless asked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("arch", ["llama_gqa", "mistral", "qwen2_bias"])
def test_captured_cuda_graphs_give_transformers_tokens(arch, checkpoints, references):
    llm = LLM(str(checkpoints[arch]), device="cuda", num_kv_blocks=256, block_size=4, max_num_batched_tokens=2048,
              max_num_seqs=10, cuda_graph_max_batch_size=8)
    graphs = llm.engine.core.runner.decode_graphs
    assert graphs is not None and graphs.capture and len(graphs.steps) == 8  # 4 batch sizes x 2 contexts
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == references[arch]
    assert graphs.replays > 0
    llm.engine.core.check_integrity()
    assert llm.engine.stats().kv_blocks_used == 0
    eager = LLM(str(checkpoints[arch]), device="cuda", num_kv_blocks=256, enforce_eager=True)
    assert eager.engine.core.runner.decode_graphs is None
