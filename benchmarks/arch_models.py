"""Random-weight checkpoints with the shapes of real models of the new architectures, for speed runs.

    python benchmarks/arch_models.py OUT_DIR [--only qwen3-0.6b,gemma3-1b,qwen3moe-16x]

Each is written with transformers' own class (bf16 safetensors) and SmolLM2's tokenizer (the
`builtin` model's, 49,152 tokens: smaller embeddings than the real models' 151k / 262k
vocabularies, so the head costs less than theirs; the layers are the real shapes). Their text is
noise; their speed is what a real checkpoint of that shape gets. llama.cpp's own converter reads
them (`punctual bench compare --model OUT_DIR/NAME --systems punctual,llama.cpp`).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SHAPES = {
    # Qwen3-0.6B: 28 layers, 16 query / 8 KV heads of 128, q/k norms.
    "qwen3-0.6b": ("Qwen3Config", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                       max_position_embeddings=4096, tie_word_embeddings=True)),
    # Gemma-3-1B (text): 26 layers, 4 query / 1 KV head of 256, 5 local (window 512) to 1 global.
    "gemma3-1b": ("Gemma3TextConfig", dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                            num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                            query_pre_attn_scalar=256, sliding_window=512,
                                            max_position_embeddings=4096)),
    # A small mixture of experts: 16 experts, top 2, ~0.5B parameters, ~0.1B active per token.
    "qwen3moe-16x": ("Qwen3MoeConfig", dict(hidden_size=768, intermediate_size=2048, moe_intermediate_size=1024,
                                            num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                            head_dim=64, num_experts=16, num_experts_per_tok=2,
                                            norm_topk_prob=True, max_position_embeddings=4096)),
}


def write(out: Path, name: str) -> Path:
    import torch
    import transformers

    from punctual.checkpoints.builtin import builtin_path

    path = out / name
    if (path / "config.json").exists():
        return path
    config_cls, shape = SHAPES[name]
    tokenizer_dir = builtin_path("builtin")
    vocab = 49152
    config = getattr(transformers, config_cls)(vocab_size=vocab, initializer_range=0.02, bos_token_id=1,
                                               eos_token_id=2, pad_token_id=None, **shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    for file in tokenizer_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(file, path / file.name)
    total = sum(p.numel() for p in model.parameters())
    print(f"{name}: {total / 1e6:.0f}M parameters -> {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", default=",".join(SHAPES))
    args = parser.parse_args()
    for name in args.only.split(","):
        write(args.out, name)


if __name__ == "__main__":
    main()
