"""`max_weight_memory`: a model under a weight budget below its size runs a sliding window of
layers read from the checkpoint, with the same output as the whole model resident."""
from __future__ import annotations

import argparse
import logging
import random

import pytest

from hf_models import VOCAB, build_hf_checkpoint
from punctual import LLM, SamplingParams
from punctual.checkpoints.weight_stream import resident_bytes
from punctual.config import EngineConfig
from punctual.engine_args import add_engine_args, engine_kwargs
from punctual.models.weight_window import WeightWindow

NUM_LAYERS = 5
PROMPTS = [[random.Random(i).randrange(VOCAB) for _ in range(7 + 11 * i)] for i in range(3)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_hf_checkpoint(tmp_path_factory.mktemp("weight_window") / "llama", "llama_gqa",
                               num_hidden_layers=NUM_LAYERS)


def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
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
