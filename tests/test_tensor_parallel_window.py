"""Tensor parallelism under `max_weight_memory`: the budget is per rank; each rank keeps a sliding
window of its own shard's layers, in a layer cache of its own, with the whole model's tokens."""
from __future__ import annotations

import logging
import math
import os
import re
import threading
from pathlib import Path

import pytest
import torch

from hf_models import build_hf_checkpoint
from test_exact_to_transformers import make_prompts
from punctual import LLM, SamplingParams
from punctual.checkpoints.loader import load_shard
from punctual.checkpoints.weight_stream import resident_bytes
from punctual.models.decoder import DecoderModel
from punctual.models.registry import architecture, load_arch_config
from punctual.models.weight_window import WeightWindow

NUM_LAYERS = 5
SIZE = 2
PROMPTS = make_prompts(4, seed=5)
ENGINE = dict(dtype="float32", num_kv_blocks=96, block_size=4, max_num_batched_tokens=24, max_num_seqs=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_window")
    return {
        "gqa": build_hf_checkpoint(root / "gqa", "llama_gqa", num_hidden_layers=NUM_LAYERS),  # 2 KV heads: split
        # 1 KV head, replicated on both ranks; an untied head (its own vocabulary slice per rank)
        "mqa": build_hf_checkpoint(root / "mqa", "llama_mqa_untied", num_hidden_layers=NUM_LAYERS),
    }


@pytest.fixture(autouse=True)
def layer_cache_root(tmp_path, monkeypatch):
    """Every rank's finished-layer cache under this test's folder: the other ranks are processes
    of their own, so the place goes through the environment they inherit. The kernels' builds stay
    shared (a fresh folder would compile them again, for a minute)."""
    kernels = Path(os.environ["PUNCTUAL_CACHE"]) / "kernels"  # conftest sets it
    kernels.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels").symlink_to(kernels, target_is_directory=True)
    monkeypatch.setenv("PUNCTUAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "layers"


def shard_sizes(path) -> tuple[int, int]:
    """Bytes of a rank's resident part (embedding, final norm, its head slice, rotary tables) and
    of its largest layer, the larger over the ranks: what a per-rank budget must hold."""
    arch = load_arch_config(path)
    fixed = layer = 0
    for rank in range(SIZE):
        shard_arch, weights = load_shard(path, torch.float32, arch, architecture(arch.architecture).names, rank, SIZE)
        model = DecoderModel(shard_arch, weights, torch.device("cpu"), torch.float32)
        fixed = max(fixed, resident_bytes([model.embed, model.norm, model.lm_head, model.rope_tables]))
        layer = max([layer] + [resident_bytes(each) for each in model.layers])
    return fixed, layer


def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("name", ["gqa", pytest.param("mqa", marks=pytest.mark.slow)])
def test_a_split_model_under_a_per_rank_budget_gives_the_whole_models_tokens(models, name, layer_cache_root,
                                                                             caplog, capfd):
    path = models[name]
    whole = LLM(str(path), **ENGINE)
    try:
        want = greedy(whole)
    finally:
        whole.engine.core.close()
    fixed, layer = shard_sizes(path)
    budget = fixed + int(2.5 * layer)  # per rank: two of its layers, not three, and far below its shard
    assert budget < fixed + NUM_LAYERS * layer
    with caplog.at_level(logging.INFO, logger="punctual.checkpoints.weight_stream"):
        llm = LLM(str(path), tensor_parallel_size=SIZE, max_weight_memory=budget, **ENGINE)
    try:
        window = llm.engine.core.runner.model.layers
        assert isinstance(window, WeightWindow) and window.size == 2
        assert greedy(llm) == want
        llm.engine.core.check_integrity()
        assert window.loads > 2 * NUM_LAYERS and window.max_resident == 2  # read again every pass, 2 at most
    finally:
        llm.engine.core.close()
    # Each rank logs its own window at start-up (rank 1 on its process's stderr).
    assert f"tensor-parallel rank 0 of 2: weight window: 2 of {NUM_LAYERS} layers" in caplog.text
    assert f"tensor-parallel rank 1 of 2: weight window: 2 of {NUM_LAYERS} layers" in capfd.readouterr().err
    # Each rank's shard finished into a folder of its own, every layer whole.
    folders = sorted(layer_cache_root.iterdir())
    assert [re.search(r"-tp(\d)of2-", f.name).group(1) for f in folders] == ["0", "1"]
    for folder in folders:
        assert len(list(folder.glob("layer-*.safetensors"))) == NUM_LAYERS
        assert not list(folder.glob(".*.tmp"))


def smallest_budget(path, **engine) -> int:
    """The per-rank budget named by the refusal of one far too small."""
    with pytest.raises(ValueError, match="too small for rank 0's shard") as refused:
        LLM(str(path), tensor_parallel_size=SIZE, max_weight_memory=1000, **engine)
    return int(float(re.search(r"give at least ([0-9.]+) MB per rank", str(refused.value)).group(1)) * 1e6)


def test_a_per_rank_budget_below_a_shards_head_and_two_layers_is_refused(models):
    fixed, layer = shard_sizes(models["gqa"])
    smallest = f"{math.ceil((fixed + 2 * layer) / 1e5) / 10:.1f} MB per rank"  # rounded up: a budget that fits
    with pytest.raises(ValueError, match=rf"max_weight_memory of .* too small for rank 0's shard .*per rank"
                                         rf".*give at least {re.escape(smallest)}"):
        LLM(str(models["gqa"]), tensor_parallel_size=SIZE, max_weight_memory=fixed + int(1.5 * layer), **ENGINE)
    # The budget it names starts, with a window of the shard's layers.
    llm = LLM(str(models["gqa"]), tensor_parallel_size=SIZE, max_weight_memory=smallest_budget(models["gqa"], **ENGINE),
              **ENGINE)
    try:
        assert isinstance(llm.engine.core.runner.model.layers, WeightWindow)
    finally:
        llm.engine.core.close()


@pytest.mark.slow
def test_a_bf16_int8_split_window_gives_the_split_resident_models_tokens(models):
    """bf16 with the fused kernels and int8 linears: each rank's cached layers compute what its
    resident shard computes (a 150-token prompt takes the plain weights a cached layer keeps)."""
    engine = {**ENGINE, "dtype": "bfloat16", "quantization": "int8"}
    prompts = PROMPTS + [[(7 * i) % 2000 + 3 for i in range(150)]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = []
    for budget in (None, smallest_budget(models["gqa"], **engine)):
        llm = LLM(str(models["gqa"]), tensor_parallel_size=SIZE, max_weight_memory=budget, **engine)
        try:
            assert isinstance(llm.engine.core.runner.model.layers, list if budget is None else WeightWindow)
            tokens.append([o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                          params, use_tqdm=False)])
        finally:
            llm.engine.core.close()
    assert tokens[0] == tokens[1]


def test_writers_of_one_layer_file_at_once_each_leave_it_whole(tmp_path, monkeypatch):
    """Two writers of the same layer (two engines starting together on one cache) are both inside
    the write before either renames: each writes a file of its own, and the file read back is whole."""
    from safetensors import torch as safetensors_torch

    from punctual.checkpoints import layer_cache
    from punctual.models.decoder import LayerWeights

    both_writing = threading.Barrier(2, timeout=30)
    save_file = safetensors_torch.save_file

    def save_then_wait(*args, **kwargs):
        save_file(*args, **kwargs)
        both_writing.wait()
    monkeypatch.setattr(safetensors_torch, "save_file", save_then_wait)
    weight = torch.randn(16, 8)
    layer = LayerWeights(input_norm=torch.ones(8), qkv=weight, qkv_bias=None, o_proj=weight[:8].clone(), o_bias=None,
                         mlp_norm=torch.ones(8), gate_up=weight, gate_up_bias=None, down=weight[:8].clone(),
                         down_bias=None)
    file = tmp_path / "layers" / "layer-0000.safetensors"
    errors = []

    def write():
        try:
            layer_cache.write_layer(file, layer, "key", 0)
        except Exception as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)
    writers = [threading.Thread(target=write) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert errors == []
    assert torch.equal(layer_cache.read_layer(file, "key", 0, torch.device("cpu")).qkv, weight)
    assert [f.name for f in file.parent.iterdir()] == [file.name]  # no partial file left
