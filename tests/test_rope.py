"""Rotary tables equal transformers' in float32, scaling type by type, read from the config.json
transformers writes; and the rule for positions past the original context (models/rope.py)."""
from __future__ import annotations

import pytest
import torch

from punctual.models.registry import load_arch_config
from punctual.models.rope import RopeSpec, inv_freq_for, max_positions, rope_tables

SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             num_hidden_layers=1, vocab_size=100, eos_token_id=None, bos_token_id=None, pad_token_id=None)
LONG = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0]
SHORT = [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.8]

CONFIGS = {
    "default": ("LlamaConfig", dict(max_position_embeddings=64)),
    "default_partial": ("Phi3Config", dict(max_position_embeddings=64, partial_rotary_factor=0.5)),
    "linear": ("LlamaConfig", dict(max_position_embeddings=64, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama3": ("LlamaConfig", dict(max_position_embeddings=64, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "yarn": ("LlamaConfig", dict(max_position_embeddings=128, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    # DeepSeek-style attention factor from mscale / mscale_all_dim, no truncation (gpt-oss), partial rotary
    "yarn_mscale": ("LlamaConfig", dict(max_position_embeddings=96, rope_parameters={
        "rope_type": "yarn", "rope_theta": 50000.0, "factor": 3.0, "original_max_position_embeddings": 32,
        "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False,
        "partial_rotary_factor": 0.5})),
    "yarn_attention_factor": ("LlamaConfig", dict(max_position_embeddings=64, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "attention_factor": 0.8})),
    "dynamic": ("LlamaConfig", dict(max_position_embeddings=40, rope_scaling={"type": "dynamic", "factor": 2.0})),
    # a real head's width: the grown frequencies fill PyTorch's vector lanes (rope._dynamic_ntk_grown)
    "dynamic_head128": ("LlamaConfig", dict(max_position_embeddings=40, head_dim=128, rope_theta=500000.0,
                                            rope_scaling={"rope_type": "dynamic", "factor": 8.0})),
    "longrope": ("Phi3Config", dict(max_position_embeddings=160, original_max_position_embeddings=40,
                                    rope_scaling={"rope_type": "longrope", "short_factor": SHORT,
                                                  "long_factor": LONG})),
    # Phi-4-mini's shape: partial rotary, the factors for the rotated dims only; transformers 5.x's
    # rope_parameters layout, and the early "su" name
    "longrope_partial": ("Phi3Config", dict(max_position_embeddings=160, original_max_position_embeddings=40,
                                            rope_parameters={"rope_type": "su", "rope_theta": 20000.0,
                                                             "partial_rotary_factor": 0.75, "short_factor": SHORT[:6],
                                                             "long_factor": LONG[:6]})),
}


def hf_config(name: str):
    import transformers

    cls, extra = CONFIGS[name]
    return getattr(transformers, cls)(architectures=[cls.replace("Config", "ForCausalLM")], **SHAPE, **extra)


def hf_rotary(config):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    return (Phi3RotaryEmbedding if config.model_type == "phi3" else LlamaRotaryEmbedding)(config)


@pytest.fixture
def spec_of(tmp_path):
    """Our RopeSpec, parsed from the config.json transformers saves for the config."""
    def parse(config) -> RopeSpec:
        path = tmp_path / "ckpt"
        config.save_pretrained(path)
        return load_arch_config(path).rope_of(0)
    return parse


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inv_freq_and_attention_factor_equal_transformers(name, spec_of):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_config(name)
    spec = spec_of(config)
    kind = config.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(kind) or hf_rotary(config).compute_default_rope_parameters
    # At load (seq_len None), and for a sequence past the original context as the dynamic update asks.
    expected, factor = init(config)
    ours, our_factor = inv_freq_for(spec)
    assert torch.equal(ours, expected) and our_factor == factor
    past = config.rope_parameters.get("original_max_position_embeddings", config.max_position_embeddings) + 5
    expected, factor = init(config, seq_len=torch.tensor(past) if kind == "dynamic" else past)
    ours, our_factor = inv_freq_for(spec, past)
    assert torch.equal(ours, expected) and our_factor == factor


@pytest.mark.parametrize("name", list(CONFIGS))
def test_row_p_is_what_transformers_rotates_the_last_of_p_plus_one_tokens_with(name, spec_of):
    config = hf_config(name)
    spec = spec_of(config)
    cos, sin = rope_tables(spec, max_positions(spec))
    rotary = hf_rotary(config)  # stateful for dynamic: the lengths grow, as in a cached generate
    x = torch.zeros(1, dtype=torch.float32)
    for position in range(0, cos.shape[0], 3):
        expected_cos, expected_sin = rotary(x, torch.arange(position + 1)[None])
        assert torch.equal(cos[position], expected_cos[0, -1]), position
        assert torch.equal(sin[position], expected_sin[0, -1]), position


def test_longrope_switches_factors_at_the_original_context(spec_of):
    spec = spec_of(hf_config("longrope"))
    cos, _ = rope_tables(spec, 160)
    short, factor = inv_freq_for(spec, 40)
    long, _ = inv_freq_for(spec, 41)
    assert not torch.equal(short, long)
    assert torch.equal(cos[39, :8], torch.cos(39 * short) * factor)
    assert torch.equal(cos[40, :8], torch.cos(40 * long) * factor)


def test_scalings_stretch_the_served_length_as_vllm(spec_of):
    assert max_positions(spec_of(hf_config("dynamic"))) == 80  # 40 * factor 2
    assert max_positions(spec_of(hf_config("yarn"))) == 128  # original 32 * factor 4
    assert max_positions(spec_of(hf_config("longrope"))) == 160  # already the stretched length
    assert max_positions(spec_of(hf_config("llama3"))) == 64


def test_phi3_top_level_original_length_wins_as_in_transformers(spec_of):
    config = hf_config("longrope")
    config.rope_parameters["original_max_position_embeddings"] = 1000  # transformers ignores it
    spec = spec_of(config)
    assert spec.scaling["original_max_position_embeddings"] == 40
    assert spec.rotary_dim == 16


def test_bad_scalings_are_refused_by_name():
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'proportional'"):
        inv_freq_for(RopeSpec(10000.0, 16, 64, {"rope_type": "proportional", "factor": 2.0}))
    with pytest.raises(ValueError, match="long_factor has 3 values; the rotary dim 16 needs 8"):
        inv_freq_for(RopeSpec(10000.0, 16, 64, {"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                 "long_factor": [1.0] * 3, "original_max_position_embeddings": 32}),
                     seq_len=40)
    with pytest.raises(ValueError, match="'yarn' needs 'original_max_position_embeddings'"):
        inv_freq_for(RopeSpec(10000.0, 16, 64, {"rope_type": "yarn", "factor": 2.0}))
