"""`max_weight_memory`: a model under a weight budget below its size runs a sliding window of
layers read from the checkpoint, with the same output as the whole model resident."""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil

import pytest

from hf_models import VOCAB, build_hf_checkpoint
from punctual import LLM, SamplingParams
from punctual.checkpoints import layer_cache
from punctual.checkpoints.weight_stream import resident_bytes
from punctual.config import EngineConfig
from punctual.engine_args import add_engine_args, engine_kwargs
from punctual.models.decoder import DecoderModel
from punctual.models.weight_window import WeightWindow

NUM_LAYERS = 5
PROMPTS = [[random.Random(i).randrange(VOCAB) for _ in range(7 + 11 * i)] for i in range(3)]
# A prompt longer than the fused kernel's small-batch limit: its rows go through the plain `dense` weight.
LONG_PROMPT = [random.Random(9).randrange(VOCAB) for _ in range(150)]


@pytest.fixture(autouse=True)
def layer_cache_root(tmp_path, monkeypatch):
    """Each test's finished-layer cache in its own folder (the kernels' cache stays where it is)."""
    root = tmp_path / "layer-cache"
    monkeypatch.setattr(layer_cache, "cache_root", lambda: root)
    return root


@pytest.fixture
def conversions(monkeypatch):
    """Layers finished from the checkpoint (the converter a cached layer skips), by index."""
    calls = []
    convert = DecoderModel.load_layer

    def counted(self, index, weights):
        calls.append(index)
        return convert(self, index, weights)
    monkeypatch.setattr(DecoderModel, "load_layer", counted)
    return calls


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_hf_checkpoint(tmp_path_factory.mktemp("weight_window") / "llama", "llama_gqa",
                               num_hidden_layers=NUM_LAYERS)


def greedy(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def sizes(llm: LLM) -> tuple[int, int]:
    """Bytes of the resident part (embeddings, final norm, head, rotary tables) and of the largest layer."""
    model = llm.engine.core.runner.model
    fixed = resident_bytes([model.embed, model.norm, model.lm_head, model.rope_tables])
    return fixed, max(resident_bytes(layer) for layer in model.layers)


@pytest.mark.parametrize("value, expected", [("2GB", 2_000_000_000), ("512MB", 512_000_000),
                                             ("1.5GiB", 3 * 2**29), ("4096", 4096)])
def test_sizes_parse_from_the_flag(value, expected):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    kwargs = engine_kwargs(parser.parse_args(["--max-weight-memory", value]))
    assert EngineConfig.from_kwargs(**kwargs).model.max_weight_memory == expected


@pytest.mark.parametrize("value", ["2 parsecs", "GB", "-1GB", ""])
def test_a_bad_size_names_the_flag(value, capsys):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-weight-memory", value])
    assert "--max-weight-memory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_weight_memory"):
        EngineConfig.from_kwargs(max_weight_memory=value)


def test_a_window_of_two_layers_gives_the_resident_models_tokens(checkpoint, caplog):
    whole = LLM(str(checkpoint), dtype="float32", num_kv_blocks=64)
    want = greedy(whole)
    fixed, layer = sizes(whole)
    budget = fixed + int(2.5 * layer)  # room for two layers, not three
    with caplog.at_level(logging.INFO, logger="punctual.checkpoints.weight_stream"):
        windowed = LLM(str(checkpoint), dtype="float32", num_kv_blocks=64, max_weight_memory=budget)
    window = windowed.engine.core.runner.model.layers
    assert isinstance(window, WeightWindow) and window.size == 2
    assert f"weight window: 2 of {NUM_LAYERS} layers" in caplog.text
    assert greedy(windowed) == want
    # Every layer was read again on every pass, and never more than the window was alive at once.
    assert window.loads > 2 * NUM_LAYERS
    assert window.max_resident == 2


def two_layer_budget(checkpoint, **options) -> tuple[int, list[list[int]]]:
    """A budget with room for two layers, and the resident model's greedy tokens."""
    whole = LLM(str(checkpoint), num_kv_blocks=64, **options)
    fixed, layer = sizes(whole)
    return fixed + int(2.5 * layer), greedy(whole, PROMPTS + [LONG_PROMPT])


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_a_bf16_window_gives_the_resident_models_tokens(checkpoint, quantization, conversions):
    """bf16 (the fused kernels where they build): cached layers hold the packed weights and a
    plain `dense` one, which computes oneDNN's packed results bit for bit."""
    budget, want = two_layer_budget(checkpoint, dtype="bfloat16", quantization=quantization)
    windowed = LLM(str(checkpoint), dtype="bfloat16", num_kv_blocks=64, quantization=quantization,
                   max_weight_memory=budget)
    assert isinstance(windowed.engine.core.runner.model.layers, WeightWindow)
    assert greedy(windowed, PROMPTS + [LONG_PROMPT]) == want
    assert sorted(conversions) == list(range(NUM_LAYERS))  # each layer finished once, at start-up


def test_the_layer_cache_is_written_once_and_reused(checkpoint, conversions, layer_cache_root, caplog):
    budget, want = two_layer_budget(checkpoint, dtype="float32")
    with caplog.at_level(logging.INFO, logger="punctual.checkpoints.weight_stream"):
        first = LLM(str(checkpoint), dtype="float32", num_kv_blocks=64, max_weight_memory=budget)
    assert sorted(conversions) == list(range(NUM_LAYERS))
    (directory,) = layer_cache_root.iterdir()
    assert len(list(directory.glob("layer-*.safetensors"))) == NUM_LAYERS
    assert f"layer cache: {directory}, {NUM_LAYERS} finished layers" in caplog.text
    assert f"({NUM_LAYERS} written now)" in caplog.text
    assert greedy(first) == want[:len(PROMPTS)]
    assert len(conversions) == NUM_LAYERS  # every pass read the cache, none the checkpoint
    del first
    conversions.clear()
    second = LLM(str(checkpoint), dtype="float32", num_kv_blocks=64, max_weight_memory=budget)
    assert greedy(second) == want[:len(PROMPTS)]
    assert conversions == []


def test_a_changed_checkpoint_is_finished_anew(checkpoint, tmp_path, conversions, layer_cache_root):
    copy = shutil.copytree(checkpoint, tmp_path / "llama")
    budget, want = two_layer_budget(copy, dtype="float32")
    LLM(str(copy), dtype="float32", num_kv_blocks=64, max_weight_memory=budget)
    conversions.clear()
    (weights,) = copy.glob("*.safetensors")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten in place
    again = LLM(str(copy), dtype="float32", num_kv_blocks=64, max_weight_memory=budget)
    assert sorted(conversions) == list(range(NUM_LAYERS))
    assert len(list(layer_cache_root.iterdir())) == 2
    assert greedy(again) == want[:len(PROMPTS)]


def test_a_corrupt_or_missing_cache_file_is_rebuilt_with_a_warning(checkpoint, conversions, layer_cache_root,
                                                                    caplog):
    budget, want = two_layer_budget(checkpoint, dtype="float32")
    llm = LLM(str(checkpoint), dtype="float32", num_kv_blocks=64, max_weight_memory=budget)
    conversions.clear()
    (directory,) = layer_cache_root.iterdir()
    # Past the window's read-ahead (layers 0 and 1): damaged before the window reaches them.
    corrupt, missing = layer_cache.layer_file(directory, 3), layer_cache.layer_file(directory, 4)
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    missing.unlink()
    with caplog.at_level(logging.WARNING, logger="punctual.checkpoints.layer_cache"):
        assert greedy(llm) == want[:len(PROMPTS)]
    assert f"{corrupt} cannot be read" in caplog.text and f"{missing} cannot be read" in caplog.text
    assert sorted(conversions) == [3, 4]  # rebuilt once each, and written again for the next passes
    conversions.clear()
    assert greedy(LLM(str(checkpoint), dtype="float32", num_kv_blocks=64, max_weight_memory=budget)) == \
        want[:len(PROMPTS)]
    assert conversions == []


def test_a_budget_that_fits_the_model_keeps_every_layer(checkpoint):
    llm = LLM(str(checkpoint), dtype="float32", num_kv_blocks=64, max_weight_memory="1GB")
    assert isinstance(llm.engine.core.runner.model.layers, list)


def test_a_budget_below_the_head_and_two_layers_is_refused(checkpoint):
    whole = LLM(str(checkpoint), dtype="float32", num_kv_blocks=64)
    fixed, layer = sizes(whole)
    with pytest.raises(ValueError, match="max_weight_memory .* too small .* at least 2 layers"):
        LLM(str(checkpoint), dtype="float32", num_kv_blocks=64, max_weight_memory=fixed + int(1.5 * layer))


def test_the_window_never_holds_more_than_its_size():
    """The window alone, over stand-in layers: a pass cut short restarts at layer 0, and the
    resident count (layers loading or alive) stays within the window."""
    class Layer:
        def __init__(self, index):
            self.index = index

    window = WeightWindow(6, 3, Layer)
    try:
        for _ in range(3):
            assert [layer.index for layer in window] == list(range(6))
        for layer in window:  # a step that fails in layer 2
            if layer.index == 2:
                break
        del layer
        assert [layer.index for layer in window] == list(range(6))
        assert window.max_resident == 3
    finally:
        window.close()
    with pytest.raises(ValueError, match="2 to 6 layers"):
        WeightWindow(6, 1, Layer)


def test_a_cache_file_rebuilds_only_punctuals_own_classes(tmp_path):
    """The structure is JSON naming a few dataclasses: a file naming any other class is refused
    (then rebuilt from the checkpoint), never imported or called."""
    import json

    import torch
    from safetensors.torch import save_file

    from punctual.models.decoder import LayerWeights
    from punctual.models.linear import FusedWeight

    weight = torch.randn(32, 8)
    layer = LayerWeights(input_norm=torch.ones(8), qkv=weight, qkv_bias=None, o_proj=weight[:8].clone(), o_bias=None,
                         mlp_norm=torch.ones(8), gate_up=FusedWeight(weight, weight, 32, float("inf")),
                         gate_up_bias=None, down=weight[8:16], down_bias=None, window=4)
    file = tmp_path / "layer-0000.safetensors"
    layer_cache.write_layer(file, layer, "key", 0)
    back = layer_cache.read_layer(file, "key", 0, torch.device("cpu"))
    assert torch.equal(back.down, layer.down) and back.gate_up.max_rows == float("inf") and back.window == 4
    assert back.qkv.data_ptr() == back.gate_up.packed.data_ptr()  # one tensor written once, shared again
    with pytest.raises(ValueError, match="not layer 1"):
        layer_cache.read_layer(file, "key", 1, torch.device("cpu"))
    _, tensors = layer_cache._read_safetensors(file)
    tree = {"class": "Popen", "fields": {"args": "true"}}
    save_file({k: v.clone() for k, v in tensors.items()}, str(file),
              metadata={layer_cache.META: json.dumps(tree), "key": "key", "layer": "0"})
    with pytest.raises(KeyError, match="Popen"):
        layer_cache.read_layer(file, "key", 0, torch.device("cpu"))
