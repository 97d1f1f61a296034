"""The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2) over the paged KV cache.

Plain tensors and torch.nn.functional rather than nn.Modules: the step is a straight line of
ops with no module dispatch. Arithmetic follows transformers' order (RMSNorm in float32, RoPE
tables in float32) so greedy tokens match it exactly.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from punctual.model import cpu_kernels, quant
from punctual.model.attention import AttentionMetadata, DecodeBucket, LayerKVCache, decode_mask, paged_attention
from punctual.model.loader import ModelArchConfig, inv_freq_for
from punctual.model.quant import HEAD_QUANTIZATION, QuantizedWeight, concat_int4, quantize


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


# Every token attends through the fused paged-attention kernel (reads K/V through the block table:
# no gather, no padding, no mask) rather than SDPA over gathered, padded buckets. Prompt chunks
# too: a 512-token chunk with 50 decodes beside it took 0.20-0.26 s a step against 0.27-0.69 s
# through SDPA (whose CPU flash kernel, given a mask, computes the masked blocks), and a fresh
# 512-token prompt 198 against 287 ms with SDPA's causal path (BENCHMARKS.md section 11).
FUSED_ATTENTION = True

# Up to this many rows, a linear over a FusedWeight runs the small-batch kernel (it streams the
# weight once for all rows); more rows (long prompt chunks) go to oneDNN's GEMM. With two output
# blocks per tile above 4 rows, the kernel is as fast as oneDNN or faster on smollm2's shapes up
# to 64 rows, and ~1.2x slower at 512 (BENCHMARKS.md section 11). A chunk of more rows has
# logits that are eager's bit for bit; up to 64 rows they are rounded as the kernel sums.
FUSED_LINEAR_MAX_ROWS = 64


# Steps whose every token attends through the fused kernel (decodes) run the whole layer stack in
# one kernel call (decode_stack): the same kernels in the same order as _forward_fused, without
# ~10 Python-dispatched calls per layer. False runs them layer by layer (to compare).
USE_DECODE_STACK = True
# decode_stack's codes for a linear's kernel (csrc/cpu_kernels.cpp, LinearKind).
STACK_BF16, STACK_INT8, STACK_INT4_Q8, STACK_INT4 = 0, 1, 2, 3


@dataclass
class FusedWeight:
    """A bf16 linear weight for the fused CPU kernels: `packed` in the small-batch kernel's layout,
    `dense` in oneDNN's (for prompt chunks). Both hold the same bf16 values."""

    packed: torch.Tensor
    dense: torch.Tensor
    out_features: int
    max_rows: float = FUSED_LINEAR_MAX_ROWS  # inf in batch-invariant mode: one summation order for every row

    @classmethod
    def from_weight(cls, weight: torch.Tensor, kernels, batch_invariant: bool) -> "FusedWeight | torch.Tensor":
        if weight.shape[0] % 16 or weight.shape[1] % 2:  # the kernel's block shape
            if batch_invariant:
                raise ValueError(f"batch_invariant: a weight of shape {tuple(weight.shape)} does not fit the GEMM "
                                 "kernel (out features a multiple of 16, in features even)")
            return pack_weight(weight)
        dense = None if batch_invariant else pack_weight(weight)
        return cls(kernels.pack_bf16(weight), dense, weight.shape[0], math.inf if batch_invariant else FUSED_LINEAR_MAX_ROWS)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] <= self.max_rows:
            return torch.ops.punctual.linear_bf16(x, self.packed, bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.dense, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight | FusedWeight, bias: torch.Tensor | None = None,
           single_row_mv: bool = False) -> torch.Tensor:
    """x @ weight.T + bias. A weight packed by `pack_weight` goes straight to oneDNN, a quantized
    or fused one to its kernel; with `single_row_mv`, one row goes through torch.mv instead of GEMM."""
    if isinstance(weight, (QuantizedWeight, FusedWeight)):
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
                 dtype: torch.dtype, quantization: str = "none", enforce_eager: bool = False,
                 batch_invariant: bool = False):
        """`quantization` (none | int8 | int4): weight-only, for every linear of the layers, and
        the head as HEAD_QUANTIZATION says (a tied embedding keeps its plain copy for lookups).
        Unless `enforce_eager`, bf16 on CPU runs the fused kernels where they build (cpu_kernels):
        RMSNorm, RoPE and SiLU give eager's results bit for bit; the small-batch GEMM rounds its
        sums once but adds them in another order than oneDNN. `batch_invariant` runs every linear
        and every token's attention through the kernels, whose order of summation per row is fixed."""
        if quantization != "none" and device.type != "cpu":
            raise ValueError(f"quantization {quantization!r} runs on CPU only (PyTorch's CPU kernels); "
                             f"device is {device.type}")
        self.arch = arch
        self.quantization = quantization
        self.device = device
        self.dtype = dtype

        def take(name: str) -> torch.Tensor | QuantizedWeight:
            if name not in weights:
                raise KeyError(f"checkpoint is missing tensor {name!r}")
            weight = weights.pop(name)
            if isinstance(weight, QuantizedWeight):  # a GGUF file's 4-bit matrix (load_weights)
                return weight
            return weight.to(device=device, dtype=dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | QuantizedWeight | None:
            return take(name) if name in weights else None

        def cat(names: list[str]) -> torch.Tensor | QuantizedWeight | None:
            tensors = [maybe(n) for n in names]
            if all(t is None for t in tensors):
                return None
            if any(t is None for t in tensors):
                raise KeyError(f"checkpoint has only some of {names}")
            if all(isinstance(t, QuantizedWeight) for t in tensors):
                return concat_int4(tensors)
            # Mixed (say 4-bit q and k, a 6-bit v): dense, as the file's values.
            return torch.cat([t.dequantize(dtype) if isinstance(t, QuantizedWeight) else t for t in tensors]).contiguous()

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
        self.kernels = None
        if not enforce_eager and device.type == "cpu" and dtype == torch.bfloat16:
            self.kernels = cpu_kernels.load()
        self.batch_invariant = batch_invariant
        if batch_invariant:
            if device.type != "cpu" or dtype != torch.bfloat16 or quantization != "none":
                raise ValueError("batch_invariant runs on CPU in bfloat16 without weight quantization, got "
                                 f"{device.type}/{str(dtype).removeprefix('torch.')}/quantization {quantization}")
            if self.kernels is None:
                raise ValueError(f"batch_invariant needs the fused CPU kernels: {cpu_kernels.unavailable_reason()}")
        # A GGUF file's 4-bit layers arrive quantized already and stay as they are.
        if quantization != "none":
            for layer in self.layers:
                for name in ("qkv", "o_proj", "gate_up", "down"):
                    weight = getattr(layer, name)
                    if not isinstance(weight, QuantizedWeight):
                        setattr(layer, name, quantize(weight, quantization))
            head = HEAD_QUANTIZATION[quantization]
            if head != "none":
                self.lm_head = quantize(self.lm_head, head)
        if self.kernels is not None:  # the fused kernels: int8 / int4 / bf16, small batches
            for layer in self.layers:
                for name in ("qkv", "o_proj", "gate_up", "down"):
                    weight = getattr(layer, name)
                    if isinstance(weight, QuantizedWeight):
                        weight.attach_fused(self.kernels, quant.INT4_INT8_ACTIVATIONS)
                    else:
                        setattr(layer, name, FusedWeight.from_weight(weight, self.kernels, batch_invariant))
            if isinstance(self.lm_head, QuantizedWeight):
                self.lm_head.attach_fused(self.kernels)
            else:
                self.lm_head = FusedWeight.from_weight(self.lm_head, self.kernels, batch_invariant)
        elif self.packed:
            for layer in self.layers:
                for name in ("qkv", "o_proj", "gate_up", "down"):
                    if not isinstance(getattr(layer, name), QuantizedWeight):
                        setattr(layer, name, pack_weight(getattr(layer, name)))
            # A tied head stays plain for the embedding lookup; the packed copy is the head's.
            if not isinstance(self.lm_head, QuantizedWeight):
                self.lm_head = pack_weight(self.lm_head)
        # The layer stack as one kernel call (decode_stack) where every linear has a fused kernel.
        self._stack = self._decode_stack_args() if self.kernels is not None else None
        # Which tokens attend through the fused kernel (the runner builds their tables): all or none.
        self.attention_kernel = "all" if batch_invariant or (self.kernels is not None and FUSED_ATTENTION) else "none"
        # Single-token steps (one decode) are weight-read bound: where weights are not packed,
        # take whichever single-row path reads faster here.
        self.single_row_mv = (not self.packed and quantization == "none" and device.type == "cpu"
                              and dtype == torch.bfloat16 and mv_is_faster(self.lm_head))

    def _decode_stack_args(self) -> tuple | None:
        """decode_stack's weight arguments (per layer the two norms and four slots per linear,
        their kinds and groups) and the most rows every linear's fused kernel takes; None where
        a linear has no fused kernel (then the step runs layer by layer)."""
        slots, kinds, groups, max_rows = [], [], [], math.inf
        for layer in self.layers:
            slots += [layer.input_norm, layer.post_norm]
            for weight, bias in ((layer.qkv, layer.qkv_bias), (layer.o_proj, layer.o_bias),
                                 (layer.gate_up, layer.gate_up_bias), (layer.down, layer.down_bias)):
                if isinstance(weight, FusedWeight):
                    slots += [weight.packed, None, None, bias]
                    kinds.append(STACK_BF16)
                    groups.append(0)
                    max_rows = min(max_rows, weight.max_rows)
                elif isinstance(weight, QuantizedWeight) and weight.fused is not None:
                    int4_kind = STACK_INT4_Q8 if weight.int8_activations else STACK_INT4
                    slots += [weight.fused, weight.fused_scales, weight.fused_zeros, bias]
                    kinds.append(STACK_INT8 if weight.kind == "int8" else int4_kind)
                    groups.append(weight.group_size)
                    max_rows = min(max_rows, quant.fused_max_rows(weight.kind, weight.int8_activations))
                else:
                    return None
        return slots, kinds, groups, max_rows

    def _run_stack(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                   kv_caches: list[LayerKVCache]) -> torch.Tensor | None:
        """The step through decode_stack when it can take it: every token attends through the
        fused kernel, no more rows than the linears' kernels take. Else None."""
        slots, kinds, groups, max_rows = self._stack
        num_tokens = input_ids.shape[0]
        if meta.kernel_tokens != num_tokens or num_tokens > max_rows:
            return None
        quantized = bool(kv_caches) and kv_caches[0].quantized  # int8 caches: their scales too
        arch = self.arch
        # One positions tensor for RoPE and attention: with every token in the kernel's metadata,
        # its kernel_positions are this tensor (the runner hands the same one to both).
        return self.kernels.decode_stack(
            input_ids, positions, self.embed, self.cos, self.sin, slots, kinds, groups, self.norm,
            [c.k for c in kv_caches], [c.v for c in kv_caches], meta.slot_mapping, meta.kernel_block_tables,
            meta.kernel_seq_of_token, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.rms_norm_eps,
            meta.kernel_window, arch.head_dim ** -0.5, [c.k_scale for c in kv_caches] if quantized else [],
            [c.v_scale for c in kv_caches] if quantized else [])

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[LayerKVCache]) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final hidden states [T, hidden]."""
        if self.kernels is not None:
            if self._stack is not None and USE_DECODE_STACK:
                hidden = self._run_stack(input_ids, positions, meta, kv_caches)
                if hidden is not None:
                    return hidden
            return self._forward_fused(input_ids, positions, meta, kv_caches)
        return self._forward_eager(input_ids, positions, meta, kv_caches)

    @torch.inference_mode()
    def decode_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor,
                      kv_caches: list[LayerKVCache]) -> torch.Tensor:
        """A decode step whose every shape is fixed by its arguments (what a CUDA graph captures, see
        decode_graphs): token i (one per sequence) writes its K/V at slots[i] and attends over its
        first context_lens[i] keys, read through block_tables[i] ([n, blocks], padded with any
        block) and masked past that length. The PyTorch ops of forward(). Returns logits [n, vocab]."""
        num_tokens = input_ids.shape[0]
        mask = decode_mask(context_lens, block_tables.shape[1] * kv_caches[0].k.shape[1], self.arch.sliding_window)
        meta = AttentionMetadata(slot_mapping=slots, num_decode_tokens=num_tokens,
                                 decode_buckets=[DecodeBucket(0, num_tokens, block_tables, lambda: mask)],
                                 prefill_block_tables=None, prefill_mask=None, prefill_pad_index=None,
                                 prefill_max_q=0, prefill_fresh_causal=False)
        return self.logits(self._forward_eager(input_ids, positions, meta, kv_caches))

    def _forward_eager(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[LayerKVCache]) -> torch.Tensor:
        """forward() in PyTorch ops: the reference the tests compare with, and the path of fp32 and CUDA."""
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

    def _forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[LayerKVCache]) -> torch.Tensor:
        """forward() in ~10 kernel calls a layer instead of ~75 eager ops: each residual add is
        fused into the RMSNorm that follows it, RoPE rotates q and k in place inside qkv, and
        SiLU * up is one pass."""
        arch, ops = self.arch, self.kernels
        num_tokens, eps = input_ids.shape[0], arch.rms_norm_eps
        q_size, kv_size, head_dim = self.q_size, self.kv_size, arch.head_dim
        rotated_heads = arch.num_heads + arch.num_kv_heads
        residual = F.embedding(input_ids, self.embed)
        cos, sin = self.cos[positions], self.sin[positions]  # [T, D]
        delta = None  # what the last sublayer adds to the residual stream
        for layer, cache in zip(self.layers, kv_caches):
            x = ops.rms_norm(residual if delta is None else delta, layer.input_norm, eps,
                             None if delta is None else residual)
            qkv = linear(x, layer.qkv, layer.qkv_bias)
            ops.rope_(qkv, cos, sin, rotated_heads, head_dim)
            q = qkv[:, :q_size].view(num_tokens, arch.num_heads, head_dim)
            k = qkv[:, q_size:q_size + kv_size].view(num_tokens, arch.num_kv_heads, head_dim)
            v = qkv[:, q_size + kv_size:].view(num_tokens, arch.num_kv_heads, head_dim)
            cache.write(k, v, meta.slot_mapping)
            attn = paged_attention(q, k, v, cache, meta)
            x = ops.rms_norm(linear(attn, layer.o_proj, layer.o_bias), layer.post_norm, eps, residual)
            delta = linear(ops.silu_mul(linear(x, layer.gate_up, layer.gate_up_bias)), layer.down, layer.down_bias)
        return ops.rms_norm(delta, self.norm, eps, residual)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] float32."""
        return linear(hidden, self.lm_head, single_row_mv=self.single_row_mv).float()
