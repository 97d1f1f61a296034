"""The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2) over the paged KV cache.

Plain tensors and torch.nn.functional rather than nn.Modules: the step is a straight line of
ops with no module dispatch. Arithmetic follows transformers' order (RMSNorm in float32, RoPE
tables in float32) so greedy tokens match it exactly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from punctual.model.attention import AttentionMetadata, LayerKVCache, paged_attention
from punctual.model.loader import ModelArchConfig, inv_freq_for
from punctual.model.quant import HEAD_QUANTIZATION, QuantizedWeight, quantize


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections stacked: one GEMM instead of three
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # gate and up stacked
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None,
           single_row_mv: bool = False) -> torch.Tensor:
    """x @ weight.T + bias. A weight packed by `pack_weight` goes straight to oneDNN, a quantized
    one to its kernel; with `single_row_mv`, one row goes through torch.mv instead of GEMM."""
    if isinstance(weight, QuantizedWeight):
        return weight.linear(x, bias)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    if single_row_mv and x.shape[0] == 1:
        out = torch.mv(weight, x[0]).unsqueeze(0)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout, for `linear`.

    On CPU, F.linear in bf16 runs oneDNN, which reorders the plain [out, in] weight into its
    blocked layout on every call: for one row that reorder is most of the work (the lm_head took
    2.0 ms a row, 0.6 ms packed; a decode layer's GEMMs about half). Packing once at load gives
    bitwise the same results at every batch size (checked against F.linear when the model
    loads, see packing_is_exact), so greedy output does not change.
    """
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def packing_is_exact(dtype: torch.dtype, device: torch.device) -> bool:
    """True where packed weights are available and give exactly F.linear's results (bf16 on a
    CPU build with oneDNN); else the model keeps plain weights."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(96, 64, generator=gen).to(dtype)
        bias = torch.randn(96, generator=gen).to(dtype)
        packed = pack_weight(weight)
        for rows in (1, 5, 33):
            x = torch.randn(rows, 64, generator=gen).to(dtype)
            if not torch.equal(linear(x, packed, bias), F.linear(x, weight, bias)):
                return False
        return True
    except (RuntimeError, AttributeError):  # no oneDNN in this build
        return False


def mv_is_faster(weight: torch.Tensor, repeats: int = 20) -> bool:
    """Time one row through mv and through GEMM on `weight`. Which wins depends on the CPU: mv
    read bf16 weights 1.4x faster on the Xeon of an earlier session, and took 2x longer than
    GEMM on the lm_head of the AMD EPYC (AVX-512 bf16) that BENCHMARKS.md was last run on."""
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)

    def best_of(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    return best_of(lambda: torch.mv(weight, x[0])) < best_of(lambda: F.linear(x, weight))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaModel:
    def __init__(self, arch: ModelArchConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, quantization: str = "none"):
        """`quantization` (none | int8 | int4): weight-only, for every linear of the layers, and
        the head as HEAD_QUANTIZATION says (a tied embedding keeps its plain copy for lookups)."""
        if quantization != "none" and device.type != "cpu":
            raise ValueError(f"quantization {quantization!r} runs on CPU only (PyTorch's CPU kernels); "
                             f"device is {device.type}")
        self.arch = arch
        self.quantization = quantization
        self.device = device
        self.dtype = dtype

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise KeyError(f"checkpoint is missing tensor {name!r}")
            return weights.pop(name).to(device=device, dtype=dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in weights else None

        def cat(names: list[str]) -> torch.Tensor | None:
            tensors = [maybe(n) for n in names]
            if all(t is None for t in tensors):
                return None
            if any(t is None for t in tensors):
                raise KeyError(f"checkpoint has only some of {names}")
            return torch.cat(tensors).contiguous()

        self.embed = take("model.embed_tokens.weight")
        self.layers = []
        for i in range(arch.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            self.layers.append(LayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=cat([attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"]),
                qkv_bias=cat([attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"]),
                o_proj=take(attn + "o_proj.weight"),
                o_bias=maybe(attn + "o_proj.bias"),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=cat([mlp + "gate_proj.weight", mlp + "up_proj.weight"]),
                gate_up_bias=cat([mlp + "gate_proj.bias", mlp + "up_proj.bias"]),
                down=take(mlp + "down_proj.weight"),
                down_bias=maybe(mlp + "down_proj.bias"),
            ))
            if self.layers[-1].qkv is None or self.layers[-1].gate_up is None:
                raise KeyError(f"checkpoint is missing attention or MLP weights of layer {i}")
        self.norm = take("model.norm.weight")
        if "lm_head.weight" in weights and not arch.tie_word_embeddings:
            self.lm_head = take("lm_head.weight")
        else:
            self.lm_head = self.embed
        # RoPE tables in float32 over all positions, as transformers computes them per step.
        positions = torch.arange(arch.max_position_embeddings, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq_for(arch)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        self.packed = packing_is_exact(dtype, device)
        if quantization != "none":
            for layer in self.layers:
                for name in ("qkv", "o_proj", "gate_up", "down"):
                    setattr(layer, name, quantize(getattr(layer, name), quantization))
            head = HEAD_QUANTIZATION[quantization]
            if head != "none":
                self.lm_head = quantize(self.lm_head, head)
            elif self.packed:
                self.lm_head = pack_weight(self.lm_head)
        elif self.packed:
            for layer in self.layers:
                for name in ("qkv", "o_proj", "gate_up", "down"):
                    setattr(layer, name, pack_weight(getattr(layer, name)))
            # A tied head stays plain for the embedding lookup; the packed copy is the head's.
            self.lm_head = pack_weight(self.lm_head)
        # Single-token steps (one decode) are weight-read bound: where weights are not packed,
        # take whichever single-row path reads faster here.
        self.single_row_mv = (not self.packed and quantization == "none" and device.type == "cpu"
                              and dtype == torch.bfloat16 and mv_is_faster(self.lm_head))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[LayerKVCache]) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final hidden states [T, hidden]."""
        arch = self.arch
        num_tokens = input_ids.shape[0]
        mv = self.single_row_mv
        hidden = F.embedding(input_ids, self.embed)
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)
        for layer, cache in zip(self.layers, kv_caches):
            residual = hidden
            x = rms_norm(hidden, layer.input_norm, arch.rms_norm_eps)
            qkv = linear(x, layer.qkv, layer.qkv_bias, mv)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(num_tokens, arch.num_heads, arch.head_dim)
            k = k.view(num_tokens, arch.num_kv_heads, arch.head_dim)
            v = v.view(num_tokens, arch.num_kv_heads, arch.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            cache.write(k, v, meta.slot_mapping)
            attn = paged_attention(q, k, v, cache, meta)
            hidden = residual + linear(attn, layer.o_proj, layer.o_bias, mv)
            residual = hidden
            x = rms_norm(hidden, layer.post_norm, arch.rms_norm_eps)
            gate, up = linear(x, layer.gate_up, layer.gate_up_bias, mv).chunk(2, dim=-1)
            hidden = residual + linear(F.silu(gate) * up, layer.down, layer.down_bias, mv)
        return rms_norm(hidden, self.norm, arch.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] float32."""
        return linear(hidden, self.lm_head, single_row_mv=self.single_row_mv).float()
