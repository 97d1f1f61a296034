"""Built-in checkpoints: Llama-architecture models with deterministic random weights.

`builtin` has the SmolLM-135M shape, so its latency figures are realistic; `builtin-tiny` is a
few small layers for fast tests. Each is written once in Hugging Face format (config.json,
model.safetensors, tokenizer.json) to a cache directory and then loaded by the same loader as
a real checkpoint, so a new user can run everything with no download.
"""
from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

BUILTIN_SHAPES = {
    # SmolLM-135M: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152.
    "builtin": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
                    tie_word_embeddings=True, dtype="bfloat16"),
    # `builtin` cut to its first 4 layers: the weights are drawn in the same order from the same
    # seed, so embeddings, the 4 layers and the tied head are exactly builtin's (an early-exit
    # draft, as in LayerSkip), with the same tokenizer. For speculative decoding demos.
    "builtin-draft": dict(hidden_size=576, num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3,
                          intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
                          tie_word_embeddings=True, dtype="bfloat16"),
    "builtin-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=2048, max_position_embeddings=1024,
                         tie_word_embeddings=True, dtype="float32"),
}
# Bump when the recipe changes, so stale caches are rebuilt rather than reused.
BUILTIN_VERSION = 1
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("PUNCTUAL_CACHE", Path.home() / ".cache" / "punctual"))


def is_builtin(name: str) -> bool:
    return name in BUILTIN_SHAPES


def builtin_path(name: str) -> Path:
    """The directory of a built-in checkpoint, building it on first use."""
    return build_once(cache_root() / f"{name}-v{BUILTIN_VERSION}",
                      lambda scratch: write_checkpoint(scratch, **BUILTIN_SHAPES[name]))


def build_once(target: Path, build) -> Path:
    """`target`, a checkpoint directory in the cache, made by `build(scratch_dir)` unless it exists.

    Built in a scratch directory and renamed: concurrent processes never see half a checkpoint
    (the loser of a race finds the winner's and drops its own)."""
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(scratch)
        try:
            scratch.rename(target)
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def write_checkpoint(path: Path, *, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                     num_key_value_heads: int, intermediate_size: int, vocab_size: int,
                     max_position_embeddings: int, tie_word_embeddings: bool, dtype: str,
                     seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    tokenizer = build_tokenizer(vocab_size)
    eos_id = tokenizer.token_to_id("<|endoftext|>")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads, "intermediate_size": intermediate_size,
        "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": dtype,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}))

    generator = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    head_dim = hidden_size // num_attention_heads

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(torch_dtype)

    weights = {"model.embed_tokens.weight": normal(vocab_size, hidden_size),
               "model.norm.weight": torch.ones(hidden_size, dtype=torch_dtype)}
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = normal(num_attention_heads * head_dim, hidden_size)
        weights[p + "self_attn.k_proj.weight"] = normal(num_key_value_heads * head_dim, hidden_size)
        weights[p + "self_attn.v_proj.weight"] = normal(num_key_value_heads * head_dim, hidden_size)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden_size, num_attention_heads * head_dim)
        weights[p + "mlp.gate_proj.weight"] = normal(intermediate_size, hidden_size)
        weights[p + "mlp.up_proj.weight"] = normal(intermediate_size, hidden_size)
        weights[p + "mlp.down_proj.weight"] = normal(hidden_size, intermediate_size)
        weights[p + "input_layernorm.weight"] = torch.ones(hidden_size, dtype=torch_dtype)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(hidden_size, dtype=torch_dtype)
    if not tie_word_embeddings:
        weights["lm_head.weight"] = normal(vocab_size, hidden_size)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(tokenizer, path)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the Python standard library's source, exactly `vocab_size` ids.

    Byte-level, so every id decodes to bytes; if the corpus yields fewer merges than asked,
    the rest of the vocabulary is filled with reserved special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(budget_chars=3 * vocab_size * 300), trainer)
    missing = vocab_size - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tokenizer.get_vocab_size() == vocab_size, (tokenizer.get_vocab_size(), vocab_size)
    return tokenizer


def _corpus(budget_chars: int):
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for source in sorted(root.rglob("*.py")):
        if total >= budget_chars:
            return
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        total += len(text)
        yield text


def save_tokenizer(tokenizer, path: Path) -> None:
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False, "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
