"""Tiny random Hugging Face checkpoints written with transformers, and transformers' greedy reference."""
from __future__ import annotations

import shutil
from pathlib import Path

VOCAB = 2048  # the builtin-tiny tokenizer's size, reused by every test checkpoint

ARCHS = {
    "llama_gqa": dict(cls="LlamaConfig", num_attention_heads=4, num_key_value_heads=2),
    "llama_mqa_untied": dict(cls="LlamaConfig", num_attention_heads=4, num_key_value_heads=1,
                             tie_word_embeddings=False),
    "llama3_rope": dict(cls="LlamaConfig", num_attention_heads=4, num_key_value_heads=2,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                        rope_theta=500000.0),
    "mistral": dict(cls="MistralConfig", num_attention_heads=4, num_key_value_heads=2, sliding_window=4096),
    "qwen2_bias": dict(cls="Qwen2Config", num_attention_heads=4, num_key_value_heads=2),
    # smollm2's head dim: the fused attention kernel's specialised loops (and its int8 cache reads)
    "llama_head64": dict(cls="LlamaConfig", num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    # The architectures of the model registry beyond Llama's: each departs from it in one or more ways.
    "qwen3": dict(cls="Qwen3Config", num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gemma2": dict(cls="Gemma2Config", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=24, sliding_window=8),
    "gemma3": dict(cls="Gemma3TextConfig", num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=24, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 100000.0}}),
    "phi3_partial_rotary": dict(cls="Phi3Config", num_attention_heads=4, num_key_value_heads=2,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5}),
    # Long-context rotary scalings. The parity prompts are 3-58 tokens and generate 12 more: Phi-3's
    # sequences stay within its original context (past it, transformers' Phi-3 generate re-rotates
    # the whole cache with the long factors, which a paged cache does not; models/rope.py), the
    # dynamic model's prompts fit max_position_embeddings and some generate past it (exact there too).
    "llama_yarn": dict(cls="LlamaConfig", num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "phi3_longrope": dict(cls="Phi3Config", num_attention_heads=4, num_key_value_heads=2,
                          original_max_position_embeddings=72,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.75,
                                           "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                           "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}),
    # 59, not 58: transformers' dynamic rope keeps a grown base for a prompt of exactly
    # max_position_embeddings tokens after a longer sequence (its reset needs seq_len < max).
    "llama_dynamic": dict(cls="LlamaConfig", num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=59,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "smollm3_nope": dict(cls="SmolLM3Config", num_attention_heads=4, num_key_value_heads=2, no_rope_layers=[1, 0]),
    "granite": dict(cls="GraniteConfig", num_attention_heads=4, num_key_value_heads=2, embedding_multiplier=6.0,
                    attention_multiplier=0.08, residual_multiplier=0.4, logits_scaling=4.0),
    "mixtral": dict(cls="MixtralConfig", num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen2_moe_shared": dict(cls="Qwen2MoeConfig", num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                             mlp_only_layers=[1]),
    "qwen3_moe": dict(cls="Qwen3MoeConfig", num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "olmoe": dict(cls="OlmoeConfig", num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                  num_experts_per_tok=2, clip_qkv=4.0),
}


def build_hf_checkpoint(path: Path, name: str, seed: int = 0, **overrides) -> Path:
    """`overrides`: config fields to change from ARCHS[name] (the GGUF tests need llama.cpp's fixed layouts)."""
    import torch
    import transformers

    from punctual.checkpoints.builtin import builtin_path

    spec = {**ARCHS[name], **overrides}
    config_cls = getattr(transformers, spec.pop("cls"))
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=VOCAB,
                 max_position_embeddings=512, initializer_range=0.05, eos_token_id=None, bos_token_id=None,
                 pad_token_id=None)
    config = config_cls(**{**shape, **spec})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer_dir = builtin_path("builtin-tiny")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / file, path / file)
    return path


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (no padding)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(prompt):].tolist())
    return outs


def build_peft_adapter(base: Path, out: Path, targets: list[str], seed: int, rank: int = 8,
                       rslora: bool = False) -> Path:
    """A random PEFT LoRA adapter of `base` (B not zero) saved at `out`, and PEFT's merged model
    (merge_and_unload) at `out`/merged, the reference its greedy tokens are checked against."""
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                             use_rslora=rslora)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():  # PEFT's random B is large next to the tiny model's weights: keep it a nudge
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)
    model.save_pretrained(out)
    model.merge_and_unload().save_pretrained(out / "merged")
    return out
