"""Tiny random GGUF files written with gguf.GGUFWriter, and transformers' own GGUF loading as the reference."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Q and K rows of a llama checkpoint."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama_cpp_rope_factors(scaling: dict, theta: float) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf for llama3 rope scaling: one divisor per rotary frequency."""
    freqs = 1.0 / (theta ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_tiny_gguf(path: Path, qtype: str = "F32", arch: str = "llama", seed: int = 0,
                    sampling: dict | None = None, originals: dict | None = None, rope_theta: float = 10000.0,
                    llama3_rope: dict | None = None) -> Path:
    """A 2-layer model with the builtin-tiny tokenizer; matrices stored as `qtype`, norms in F32.

    `sampling`: general.sampling.* metadata (temp, top_k, ...). `originals`, when given, receives
    each weight as a Hugging Face checkpoint would hold it (before llama.cpp's Q/K permutation).
    `llama3_rope`: transformers' llama3 rope_scaling, written as llama.cpp does (rope_freqs.weight).
    """
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    vocab_size = add_tokenizer(writer)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(rope_theta)
    if arch == "llama":
        writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(vocab_size)
    for key, value in (sampling or {}).items():
        getattr(writer, f"add_sampling_{key}")(value)  # general.sampling.temp, .top_k, ...

    rng = np.random.default_rng(seed)

    def add(name: str, shape: tuple[int, ...], std: float = 0.05, matrix: bool = True) -> None:
        value = (rng.standard_normal(shape) * std).astype(np.float32) if matrix else \
            (1.0 + rng.standard_normal(shape) * 0.1).astype(np.float32)
        if originals is not None:
            originals[_hf_name(name)] = value
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            value = llama_cpp_permute(value, HEADS if "attn_q" in name else KV_HEADS)
        if not matrix or qtype == "F32":
            writer.add_tensor(name, value)
        elif qtype == "F16":
            writer.add_tensor(name, value.astype(np.float16))
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)

    if llama3_rope is not None:
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(llama3_rope, rope_theta))
    add("token_embd.weight", (vocab_size, HIDDEN))
    add("output_norm.weight", (HIDDEN,), matrix=False)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), matrix=False)
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), matrix=False)
        add(f"blk.{i}.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN))
        add(f"blk.{i}.attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN))
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN))
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM))
        add(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN))
        if arch == "qwen2":
            add(f"blk.{i}.attn_q.bias", (HEADS * HEAD_DIM,), matrix=False)
            add(f"blk.{i}.attn_k.bias", (KV_HEADS * HEAD_DIM,), matrix=False)
            add(f"blk.{i}.attn_v.bias", (KV_HEADS * HEAD_DIM,), matrix=False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tokenizer(writer) -> int:
    """The builtin-tiny tokenizer (byte-level BPE) as llama.cpp writes a gpt2 vocabulary; its size."""
    from punctual.checkpoints.builtin import builtin_path

    tokenizer = json.loads((builtin_path("builtin-tiny") / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    tokens = [None] * (len(vocab) + len([t for t in special if t not in vocab]))
    for text, token_id in {**vocab, **special}.items():
        tokens[token_id] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(special["<|endoftext|>"])
    writer.add_eos_token_id(special["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    return len(tokens)


# The tiny Hugging Face checkpoints (tests/hf_models.py) each GGUF architecture is written from,
# with the config changes llama.cpp's fixed layouts need: it keeps no query_pre_attn_scalar
# (head_dim's, below 27B), Gemma 3's every-sixth-layer-global pattern, SmolLM3's every-fourth-
# layer-without-rotary. Gemma 3 also soft-caps its logits here, to carry that key.
GGUF_ARCHS = {
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16)),
    "gemma3": ("gemma3", dict(query_pre_attn_scalar=16, num_hidden_layers=6, layer_types=None,
                              final_logit_softcapping=20.0)),
    "phi3": ("phi3_partial_rotary", {}),
    "smollm3": ("smollm3_nope", dict(num_hidden_layers=4, no_rope_layers=None)),
    "granite": ("granite", {}),
}
PHI3_LONGROPE = dict(max_position_embeddings=1024, original_max_position_embeddings=256, rope_parameters={
    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
    "long_factor": [1.0, 1.5, 3.25, 6.0], "short_factor": [1.0, 1.125, 1.5, 2.0]})


def hf_checkpoint_for_gguf(path: Path, arch: str, **overrides) -> Path:
    """The tiny Hugging Face checkpoint of a GGUF architecture, its norm weights made random
    (transformers initialises them to 0 or 1, which would hide a norm written wrongly)."""
    import torch
    from safetensors.torch import load_file, save_file

    from hf_models import build_hf_checkpoint

    name, changes = GGUF_ARCHS[arch]
    build_hf_checkpoint(path, name, **{**changes, **overrides})
    weights = load_file(str(path / "model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    for key, value in weights.items():
        if key.endswith("norm.weight"):
            weights[key] = value + torch.randn(value.shape, generator=generator) * 0.2
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def gguf_from_hf(hf_dir: Path, path: Path, arch: str, qtype: str = "F32") -> Path:
    """A Hugging Face checkpoint written as llama.cpp's convert_hf_to_gguf writes `arch`: its
    metadata keys, gguf-py's tensor names (the map the converter itself uses), Q/K rows permuted
    where the converter is its LlamaModel (SmolLM3, Granite), Gemma's norms stored as 1 + w,
    Phi-3's fused qkv and gate/up as they are, with LongRoPE factors as two tensors."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(str(hf_dir / "model.safetensors"))
    rope = config.get("rope_parameters") or {}
    global_rope = rope.get("full_attention", rope)
    layers, heads, kv_heads = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]

    writer = gguf.GGUFWriter(str(path), arch)
    add_tokenizer(writer)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(global_rope["rope_theta"])
    if "sliding_attention" in rope:
        writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    if config.get("head_dim") and arch != "granite":  # Granite's converter drops head_dim
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch in ("smollm3", "granite"):  # LlamaModel's keys
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(hidden // heads)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
    if arch == "gemma3":
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
    if arch == "granite":
        writer.add_attention_scale(config["attention_multiplier"])
        writer.add_embedding_scale(config["embedding_multiplier"])
        writer.add_residual_scale(config["residual_multiplier"])
        writer.add_logit_scale(config["logits_scaling"])
    if arch == "phi3":
        rotary_dims = int(rope.get("partial_rotary_factor", 1.0) * hidden) // heads
        original = config["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_dimension_count(rotary_dims)
        writer.add_sliding_window(config.get("sliding_window") or 0)
        if rope.get("rope_type") == "longrope":
            scale = config["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
            writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
            writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    for hf_name, value in weights.items():
        if arch.startswith("gemma") and hf_name == "lm_head.weight":
            continue  # the Gemma converters skip it: tied to the embeddings
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if arch in ("smollm3", "granite") and name.endswith(("attn_q.weight", "attn_k.weight")):
            value = llama_cpp_permute(value, heads if "attn_q" in name else kv_heads)
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            value = value + np.float32(1)
        if value.ndim == 1 or qtype == "F32":
            writer.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hf_name(gguf_name: str) -> str:
    from punctual.checkpoints.gguf import _hf_name

    return _hf_name(gguf_name)


def hf_gguf_model(gguf_path: Path):
    """transformers' model of a GGUF file, in float32.

    `from_pretrained(..., gguf_file=...)` insists on accelerate, which Punctual does not need, so
    this makes the calls it makes, once: transformers' own `load_gguf_checkpoint` reads the file's
    config and dequantizes, un-permutes and names its tensors. That call wants a model only for
    the parameter names of the architecture; a skeleton from Punctual's converted config.json
    gives those, and the reference model itself is built from transformers' parse of the file.
    """
    import torch
    import transformers
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from punctual.checkpoints.loader import resolve_model_path

    def skeleton(config):
        with no_init_weights():
            return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    names = skeleton(transformers.AutoConfig.from_pretrained(resolve_model_path(str(gguf_path))))
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=names)
    config = transformers.CONFIG_MAPPING[parsed["config"]["model_type"]].from_dict(parsed["config"])
    model = skeleton(config)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_token_id=None) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_greedy_choices(model, prompt: list[int], continuation: list[int]) -> list[int]:
    """transformers' greedy pick after the prompt and after each token of `continuation`, in one forward.

    Equal to `continuation` exactly when transformers' greedy decoding produces it (by induction
    over the positions), at the cost of one pass instead of one per token.
    """
    import torch

    ids = torch.tensor([prompt + continuation[:-1]])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:]
    return logits.argmax(-1).tolist()
