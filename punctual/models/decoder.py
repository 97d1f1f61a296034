"""The shared decoder stack over the paged KV cache, for every architecture in models/registry.py.

Plain tensors and torch.nn.functional rather than nn.Modules: the step is a straight line of
ops with no module dispatch. Arithmetic follows transformers' order (RMSNorm in float32, RoPE
tables in float32, softmax of router scores in float32) so float32 greedy tokens match it
exactly. What varies between architectures is data in ModelArchConfig (models/config.py) and
weight names (models/spec.py); this file reads both and never an architecture's name.

Three ways through a step, the same arithmetic in each:
- `_forward_eager`: PyTorch ops, every feature; the reference, and the path of fp32 and CUDA.
- `_forward_fused`: bf16 on a CPU with the fused kernels, ~10 kernel calls a layer; features
  the kernels lack (q/k norms, gelu, partial rotary, experts) run as PyTorch ops in between.
- `_run_stack`: Llama's layer, Qwen3's too (ModelArchConfig.in_decode_stack), as one kernel call for decodes.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from punctual.kernels import cpu_kernels, tune_table
from punctual.models.attention import AttentionMetadata, DecodeBucket, LayerKVCache, decode_mask, paged_attention
from punctual.kernels.quant import HEAD_QUANTIZATION, QuantizedWeight, concat_int4, quantize
from punctual.models.collectives import RankGroup
from punctual.models.config import ModelArchConfig
from punctual.models.linear import FusedWeight, LowRankDeltas, Weight, linear, pack_weight, packing_is_exact
from punctual.models.moe_block import MoEWeights, moe_forward
from punctual.models.registry import architecture
from punctual.models.rope import RopeSpec, rope_tables
from punctual.models.spec import WeightNames

logger = logging.getLogger(__name__)

# decode_stack's codes for a linear's kernel (csrc/cpu_kernels.cpp, LinearKind).
STACK_BF16, STACK_INT8, STACK_INT4_Q8, STACK_INT4 = 0, 1, 2, 3


@dataclass(frozen=True)
class KernelChoices:
    """Which fused paths a bf16 CPU model takes: fixed by configuration, never raced at load."""

    # Every token attends through the fused paged-attention kernel (reads K/V through the block
    # table: no gather, no padding, no mask) rather than SDPA over gathered, padded buckets. A
    # 512-token chunk with 50 decodes beside it took 0.20-0.26 s a step against 0.27-0.69 s
    # through SDPA, a fresh 512-token prompt 198 against 287 ms (BENCHMARKS.md).
    fused_attention: bool = True
    # Decode steps run the whole layer stack in one kernel call (decode_stack) where the layer is
    # Llama's; False runs the same kernels layer by layer (to compare).
    decode_stack: bool = True
    # int4's fused kernel quantizes activation rows to int8 (llama.cpp's Q8_0) for integer dot
    # products; False widens the nibbles to bf16 against x as it is (2-3x slower). int8 weights
    # follow it too: where the kernel table says int8_gemm, big batches quantize their rows to
    # int8 for oneDNN's int8 GEMM (AMX-INT8); False dequantizes instead.
    int4_int8_activations: bool = True


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Weight  # q, k and v projections stacked: one GEMM instead of three
    qkv_bias: torch.Tensor | None
    o_proj: Weight
    o_bias: torch.Tensor | None
    mlp_norm: torch.Tensor  # the norm before the MLP (Llama's post_attention_layernorm)
    gate_up: Weight | None  # gate and up stacked; None in a sparse (MoE) layer
    gate_up_bias: torch.Tensor | None
    down: Weight | None
    down_bias: torch.Tensor | None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # Gemma 2/3's sandwich norms
    mlp_out_norm: torch.Tensor | None = None
    moe: MoEWeights | None = None
    window: int | None = None  # sliding attention window (None: full)
    rope: int | None = None  # index into DecoderModel.rope_tables; None: no rotary (NoPE)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalise in float32, round to the model dtype, then scale."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rms_norm_scaled_in_float(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm with its (1 + w) folded into `weight` (float32): scale in float32, then round."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated over its first cos.shape[-1] dims (all of them but with partial rotary)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class DecoderModel:
    def __init__(self, arch: ModelArchConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype, quantization: str = "none", enforce_eager: bool = False,
                 batch_invariant: bool = False, kernel_choices: KernelChoices = KernelChoices(),
                 tensor_parallel: RankGroup | None = None, resident_layers: bool = True):
        """`quantization` (none | int8 | int4): weight-only, for every linear of the layers (experts
        included), and the head as HEAD_QUANTIZATION says (a tied embedding keeps its plain copy for
        lookups). Unless `enforce_eager`, bf16 on CPU runs the fused kernels where they build
        (cpu_kernels): RMSNorm, RoPE and SiLU give eager's results bit for bit; the small-batch GEMM
        rounds its sums once but adds them in another order than oneDNN. `batch_invariant` runs every
        linear and every token's attention through the kernels, whose order of summation per row is fixed.
        `tensor_parallel`: this rank's group, where `weights` is one rank's shard (models/sharding.py):
        the row-parallel linears' outputs are all-reduced and the head's vocabulary slices gathered.
        Without `resident_layers`, no layer is loaded: the owner installs `layers`, a sliding window
        of them (checkpoints/weight_stream.py), and decodes run layer by layer."""
        if quantization != "none" and device.type != "cpu":
            raise ValueError(f"quantization {quantization!r} runs on CPU only (PyTorch's CPU kernels); "
                             f"device is {device.type}")
        if arch.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {arch.hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
        self.arch = arch
        self.quantization = quantization
        self.device = device
        self.dtype = dtype
        self.choices = kernel_choices
        self.act = ACTIVATIONS[arch.hidden_act]
        self.kernels = None
        if not enforce_eager and device.type == "cpu" and dtype == torch.bfloat16:
            self.kernels = cpu_kernels.load()
        self.batch_invariant = batch_invariant
        self.tp = tensor_parallel
        if batch_invariant:
            if device.type != "cpu" or dtype != torch.bfloat16 or quantization != "none":
                raise ValueError("batch_invariant runs on CPU in bfloat16 without weight quantization, got "
                                 f"{device.type}/{str(dtype).removeprefix('torch.')}/quantization {quantization}")
            if self.kernels is None:
                raise ValueError(f"batch_invariant needs the fused CPU kernels: {cpu_kernels.unavailable_reason()}")
            if not arch.in_decode_stack:
                raise ValueError(f"batch_invariant runs Llama- and Qwen3-layer models only; {arch.architecture} is not one")
        self.packed = packing_is_exact(dtype, device)
        self._load(weights, architecture(arch.architecture).names, resident_layers)
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        # The layer stack as one kernel call (decode_stack) where every linear has a fused kernel.
        self._stack = (self._decode_stack_args() if self.kernels is not None and kernel_choices.decode_stack
                       and arch.in_decode_stack and tensor_parallel is None and resident_layers else None)
        if tensor_parallel is not None and self.kernels is not None and kernel_choices.decode_stack:
            logger.info("tensor parallel: the whole-stack decode kernel is off (it cannot all-reduce between "
                        "layers); decode steps run the fused kernels layer by layer")
        # Which tokens attend through the fused kernel (the runner builds their tables): all or none.
        # Soft-capped scores (Gemma 2) are not in the kernel: those models attend through PyTorch.
        fused_attention = self.kernels is not None and (kernel_choices.fused_attention or batch_invariant)
        self.attention_kernel = "all" if fused_attention and arch.attn_softcap is None else "none"
        if self.kernels is not None:
            logger.info("fused CPU kernels: %s", tune_table.summary())
            off = [what for what, on in (("the whole-stack decode kernel", self._stack is not None or not
                                          kernel_choices.decode_stack or not resident_layers),
                                         ("the fused attention kernel", self.attention_kernel == "all" or not
                                          kernel_choices.fused_attention)) if not on]
            if off:
                logger.info("%s: %s off (the kernels do not compute this architecture's layer); the rest fused",
                            arch.architecture, " and ".join(off))

    # ---- weights --------------------------------------------------------------------------
    def _take(self, weights: dict, name: str) -> torch.Tensor | QuantizedWeight:
        if name not in weights:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        weight = weights.pop(name)
        if isinstance(weight, QuantizedWeight):  # a GGUF file's 4-bit matrix (load_weights)
            return weight
        return weight.to(device=self.device, dtype=self.dtype).contiguous()

    def _maybe(self, weights: dict, name: str) -> torch.Tensor | QuantizedWeight | None:
        return self._take(weights, name) if name in weights else None

    def _cat(self, weights: dict, names_: list[str]) -> torch.Tensor | QuantizedWeight | None:
        tensors = [self._maybe(weights, n) for n in names_]
        if all(t is None for t in tensors):
            return None
        if any(t is None for t in tensors):
            raise KeyError(f"checkpoint has only some of {names_}")
        if all(isinstance(t, QuantizedWeight) for t in tensors):
            return concat_int4(tensors)
        # Mixed (say 4-bit q and k, a 6-bit v): dense, as the file's values.
        return torch.cat([t.dequantize(self.dtype) if isinstance(t, QuantizedWeight) else t
                          for t in tensors]).contiguous()

    def _norm_weight(self, weights: dict, name: str | None) -> torch.Tensor | None:
        if name is None or name not in weights:
            return None
        weight = weights.pop(name)
        if not self.arch.norm_plus_one:
            return weight.to(device=self.device, dtype=self.dtype).contiguous()
        # Gemma scales by (1 + w) in float32; the fused kernels take it rounded to bf16.
        plus_one = 1.0 + weight.to(device=self.device, dtype=torch.float32)
        return plus_one.to(self.dtype) if self.kernels is not None else plus_one.contiguous()

    def _load(self, weights: dict[str, torch.Tensor], names: WeightNames, resident_layers: bool = True) -> None:
        """The weights in the form the step reads. Without `resident_layers`, the embeddings, final
        norm and head only: the layers come one at a time from load_layer (checkpoints/weight_stream)."""
        arch, device, dtype = self.arch, self.device, self.dtype
        self.names = names
        self.embed = self._take(weights, names.embed)
        # Every distinct rotary table, in layer order: a layer's index into them needs no weights.
        self._rope_specs: list[RopeSpec] = []
        for i in range(arch.num_layers):
            spec = arch.rope_of(i)
            if spec is not None and spec not in self._rope_specs:
                self._rope_specs.append(spec)
        self.layers: list[LayerWeights] = ([self._build_layer(i, weights) for i in range(arch.num_layers)]
                                           if resident_layers else [])
        self.norm = self._norm_weight(weights, names.final_norm)
        if self.norm is None:
            raise KeyError(f"checkpoint is missing the final norm of layer {arch.num_layers}")
        if names.lm_head in weights and not arch.tie_word_embeddings:
            self.lm_head = self._take(weights, names.lm_head)
        else:
            self.lm_head = self.embed
        # RoPE tables in float32 over all positions, as transformers computes them per step.
        self.rope_tables = [tuple(t.to(device=device, dtype=dtype) for t in rope_tables(spec, arch.max_positions))
                            for spec in self._rope_specs]
        # Llama's callers (decode_stack, decode graphs) read the one table as cos / sin.
        self.cos, self.sin = self.rope_tables[0] if self.rope_tables else (None, None)
        self._finish_linears()

    def load_layer(self, index: int, weights: dict[str, torch.Tensor]) -> LayerWeights:
        """Layer `index` from its checkpoint tensors (popped from `weights`), finished as _load
        finishes every layer but with plain tensors where oneDNN's opaque layout would be (they
        compute the same bits, see packing_is_exact): what a sliding window of layers caches on
        disk (checkpoints/layer_cache.py) and reads in the background."""
        layer = self._build_layer(index, weights)
        self._finish_layer(layer, plain_dense=True)
        return layer

    def _build_layer(self, i: int, weights: dict) -> LayerWeights:
        arch, names = self.arch, self.names
        take = functools.partial(self._take, weights)
        maybe = functools.partial(self._maybe, weights)
        cat = functools.partial(self._cat, weights)
        norm = functools.partial(self._norm_weight, weights)

        def required(tensor, what: str):
            if tensor is None:
                raise KeyError(f"checkpoint is missing the {what} of layer {i}")
            return tensor

        p = names.layer.format(i=i)
        attn = p + names.attn
        if names.qkv is not None and attn + names.qkv + ".weight" in weights:
            qkv, qkv_bias = take(attn + names.qkv + ".weight"), maybe(attn + names.qkv + ".bias")
        else:
            qkv = cat([attn + n + ".weight" for n in (names.q, names.k, names.v)])
            qkv_bias = cat([attn + n + ".bias" for n in (names.q, names.k, names.v)])
        mlp = next((p + prefix for prefix in names.mlp if any(k.startswith(p + prefix) for k in weights)),
                   p + names.mlp[0])
        gate_up = gate_up_bias = down = down_bias = moe = None
        if arch.moe is not None and arch.moe_layers[i]:
            moe = MoEWeights.take(weights, mlp, names, arch.moe, take, maybe, i)
        elif names.gate_up is not None and mlp + names.gate_up + ".weight" in weights:
            gate_up, gate_up_bias = take(mlp + names.gate_up + ".weight"), maybe(mlp + names.gate_up + ".bias")
        else:
            gate_up = cat([mlp + names.gate + ".weight", mlp + names.up + ".weight"])
            gate_up_bias = cat([mlp + names.gate + ".bias", mlp + names.up + ".bias"])
        if moe is None:
            required(gate_up, "MLP gate/up projections")
            down, down_bias = take(mlp + names.down + ".weight"), maybe(mlp + names.down + ".bias")
        spec = arch.rope_of(i)
        layer = LayerWeights(
            input_norm=required(norm(p + names.input_norm + ".weight"), "input norm"),
            qkv=required(qkv, "q/k/v projections"), qkv_bias=qkv_bias,
            o_proj=take(attn + names.o + ".weight"), o_bias=maybe(attn + names.o + ".bias"),
            mlp_norm=required(norm(p + names.mlp_norm + ".weight"), "MLP norm"),
            gate_up=gate_up, gate_up_bias=gate_up_bias, down=down, down_bias=down_bias,
            q_norm=norm(attn + names.q_norm + ".weight") if arch.qk_norm != "none" else None,
            k_norm=norm(attn + names.k_norm + ".weight") if arch.qk_norm != "none" else None,
            attn_out_norm=norm(p + names.attn_out_norm + ".weight") if arch.sandwich_norms else None,
            mlp_out_norm=norm(p + names.mlp_out_norm + ".weight") if arch.sandwich_norms else None,
            moe=moe, window=arch.window_of(i), rope=None if spec is None else self._rope_specs.index(spec))
        if arch.qk_norm != "none" and (layer.q_norm is None or layer.k_norm is None):
            raise KeyError(f"checkpoint is missing the q/k norms of layer {i}")
        if arch.sandwich_norms and (layer.attn_out_norm is None or layer.mlp_out_norm is None):
            raise KeyError(f"checkpoint is missing the attention/MLP output norms of layer {i}")
        return layer

    @staticmethod
    def _linear_slots_of(layer: LayerWeights):
        """(owner, attribute) of every linear weight of a layer, experts included."""
        for name in ("qkv", "o_proj", "gate_up", "down"):
            if getattr(layer, name) is not None:
                yield layer, name
        if layer.moe is not None:
            yield from layer.moe.linear_slots()

    def _finish_linears(self) -> None:
        """Quantize, then put every linear in the form its kernel reads (see models/linear.py).
        A GGUF file's 4-bit layers arrive quantized already and stay as they are."""
        for layer in self.layers:
            self._finish_layer(layer)
        quantization = self.quantization
        if quantization != "none" and HEAD_QUANTIZATION[quantization] != "none":
            self.lm_head = quantize(self.lm_head, HEAD_QUANTIZATION[quantization])
        if self.kernels is not None:  # the fused kernels: int8 / int4 / bf16, small batches
            if isinstance(self.lm_head, QuantizedWeight):
                self.lm_head.attach_fused(self.kernels, self.choices.int4_int8_activations)
            else:
                self.lm_head = FusedWeight.from_weight(self.lm_head, self.kernels, self.batch_invariant)
        elif self.packed:
            # A tied head stays plain for the embedding lookup; the packed copy is the head's.
            if not isinstance(self.lm_head, QuantizedWeight):
                self.lm_head = pack_weight(self.lm_head)

    def _finish_layer(self, layer: LayerWeights, plain_dense: bool = False) -> None:
        quantization = self.quantization
        slots = list(self._linear_slots_of(layer))
        if quantization != "none":
            for owner, name in slots:
                weight = getattr(owner, name)
                if not isinstance(weight, QuantizedWeight):
                    setattr(owner, name, quantize(weight, quantization))
        if self.kernels is not None:
            for owner, name in slots:
                weight = getattr(owner, name)
                if isinstance(weight, QuantizedWeight):
                    weight.attach_fused(self.kernels, self.choices.int4_int8_activations)
                else:
                    setattr(owner, name, FusedWeight.from_weight(weight, self.kernels, self.batch_invariant,
                                                                 plain_dense=plain_dense))
            if layer.moe is not None:  # routers: bf16 always (their logits decide), in the small-batch kernel
                layer.moe.router = FusedWeight.from_weight(layer.moe.router, self.kernels, self.batch_invariant,
                                                           plain_dense=plain_dense)
        elif self.packed and not plain_dense:
            for owner, name in slots:
                if not isinstance(getattr(owner, name), QuantizedWeight):
                    setattr(owner, name, pack_weight(getattr(owner, name)))

    def _decode_stack_args(self) -> tuple | None:
        """decode_stack's weight arguments (per layer the two norms, the q/k norms or None, four slots per linear,
        their kinds and groups) and the most rows every linear's fused kernel takes; None where
        a linear has no fused kernel (then the step runs layer by layer)."""
        slots, kinds, groups, max_rows = [], [], [], math.inf
        for layer in self.layers:
            slots += [layer.input_norm, layer.mlp_norm, layer.q_norm, layer.k_norm]
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
                    max_rows = min(max_rows, weight.max_fused_rows)
                else:
                    return None
        return slots, kinds, groups, max_rows

    # ---- one step ---------------------------------------------------------------------------
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
        # Quest: the kernel picks each sparse decode's blocks per layer from the summaries (quest.h).
        sparse = meta.sparse if kv_caches and kv_caches[0].summaries is not None else None
        sparse_args = (([c.summaries for c in kv_caches], sparse.start, sparse.end, sparse.budget_blocks)
                       if sparse is not None else ([], 0, 0, 0))
        # One positions tensor for RoPE and attention: with every token in the kernel's metadata,
        # its kernel_positions are this tensor (the runner hands the same one to both).
        return self.kernels.decode_stack(
            input_ids, positions, self.embed, self.cos, self.sin, slots, kinds, groups, self.norm,
            [c.k for c in kv_caches], [c.v for c in kv_caches], meta.slot_mapping, meta.kernel_block_tables,
            meta.kernel_seq_of_token, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.rms_norm_eps,
            meta.kernel_window, arch.scale, [c.k_scale for c in kv_caches] if quantized else [],
            [c.v_scale for c in kv_caches] if quantized else [], *sparse_args)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[LayerKVCache], lora: LowRankDeltas | None = None) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final hidden states [T, hidden]. `lora`: the step's
        adapters and their rows (None: every row is the base model's)."""
        if self.kernels is not None:
            # The whole-stack kernel has no place for low-rank terms: a step with an adapter row
            # runs layer by layer (steps of base-model rows only still take it).
            if self._stack is not None and lora is None:
                hidden = self._run_stack(input_ids, positions, meta, kv_caches)
                if hidden is not None:
                    if meta.filled_blocks is not None:  # the kernel wrote the keys; summaries after
                        for cache in kv_caches:
                            cache.summarize(meta.filled_blocks)
                    return hidden
            return self._forward_fused(input_ids, positions, meta, kv_caches, lora)
        return self._forward_eager(input_ids, positions, meta, kv_caches, lora)

    @torch.inference_mode()
    def decode_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor,
                      kv_caches: list[LayerKVCache]) -> torch.Tensor:
        """A decode step whose every shape is fixed by its arguments (what a CUDA graph captures, see
        decode_graphs): token i (one per sequence) writes its K/V at slots[i] and attends over its
        first context_lens[i] keys, read through block_tables[i] ([n, blocks], padded with any
        block) and masked past that length. The PyTorch ops of forward(). Returns logits [n, vocab]."""
        num_tokens = input_ids.shape[0]
        ctx = block_tables.shape[1] * kv_caches[0].k.shape[1]

        def metadata(window: int | None) -> AttentionMetadata:
            mask = decode_mask(context_lens, ctx, window)
            return AttentionMetadata(slot_mapping=slots, num_decode_tokens=num_tokens,
                                     decode_buckets=[DecodeBucket(0, num_tokens, block_tables, lambda: mask)],
                                     prefill_block_tables=None, prefill_mask=None, prefill_pad_index=None,
                                     prefill_max_q=0, prefill_fresh_causal=False, window=window)

        windows = self.arch.attention_windows
        meta = metadata(windows[0])
        if len(windows) > 1:
            meta.local = metadata(windows[1])
        return self.logits(self._forward_eager(input_ids, positions, meta, kv_caches))

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = F.embedding(input_ids, self.embed)
        if self.arch.embed_scale is not None:
            hidden = hidden * self.arch.embed_scale
        return hidden

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.arch.norm_plus_one and weight.dtype == torch.float32:
            return rms_norm_scaled_in_float(x, weight, self.arch.rms_norm_eps)
        return rms_norm(x, weight, self.arch.rms_norm_eps)

    def _qk_normed(self, layer: LayerWeights, q: torch.Tensor, k: torch.Tensor):
        """q [T, q_size], k [T, kv_size] after the architecture's q/k norms and clipping."""
        arch = self.arch
        if arch.qk_norm == "full":  # OLMoE: over all heads at once
            q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
        elif arch.qk_norm == "head":
            tokens = q.shape[0]
            q = self._norm(q.reshape(tokens, -1, arch.head_dim), layer.q_norm).reshape(tokens, -1)
            k = self._norm(k.reshape(tokens, -1, arch.head_dim), layer.k_norm).reshape(tokens, -1)
        return q, k

    def _step_tables(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each rotary table's cos and sin at the step's positions ([T, rotary_dim] each), once a step."""
        return [(cos[positions], sin[positions]) for cos, sin in self.rope_tables]

    def _attention_inputs(self, layer: LayerWeights, qkv: torch.Tensor,
                          tables: list[tuple[torch.Tensor, torch.Tensor]]):
        """q [T, H, D], k and v [T, KVH, D] from the stacked projection, normed and rotated (PyTorch ops)."""
        arch = self.arch
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if arch.qk_norm != "none":
            q, k = self._qk_normed(layer, q, k)
        if arch.clip_qkv is not None:
            q, k, v = (t.clamp(-arch.clip_qkv, arch.clip_qkv) for t in (q, k, v))
        q = q.reshape(num_tokens, arch.num_heads, arch.head_dim)
        k = k.reshape(num_tokens, arch.num_kv_heads, arch.head_dim)
        v = v.reshape(num_tokens, arch.num_kv_heads, arch.head_dim)
        if layer.rope is not None:
            cos, sin = (t.unsqueeze(1) for t in tables[layer.rope])  # [T, 1, rotary_dim]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _attend(self, layer: LayerWeights, q, k, v, cache: LayerKVCache, meta: AttentionMetadata) -> torch.Tensor:
        cache.write(k, v, meta.slot_mapping)
        if meta.filled_blocks is not None:
            cache.summarize(meta.filled_blocks)
        return paged_attention(q, k, v, cache, meta.for_window(layer.window), self.arch.scale, self.arch.attn_softcap)

    def _mlp(self, layer: LayerWeights, x: torch.Tensor, lora: LowRankDeltas | None = None,
             index: int = 0) -> torch.Tensor:
        if layer.moe is not None:
            return moe_forward(x, layer.moe, self.arch.moe, self._dense_mlp)
        out = self._dense_mlp(x, layer.gate_up, layer.gate_up_bias, layer.down, layer.down_bias, lora, index)
        return out if self.tp is None else self.tp.all_reduce(out)  # each rank's columns: a partial sum

    def _dense_mlp(self, x: torch.Tensor, gate_up: Weight, gate_up_bias, down: Weight, down_bias,
                   lora: LowRankDeltas | None = None, index: int = 0) -> torch.Tensor:
        h = linear(x, gate_up, gate_up_bias)
        if lora is not None:
            lora.add(h, x, index, "gate_up")
        if self.kernels is not None and self.arch.hidden_act == "silu" and h.dtype == torch.bfloat16:
            h = self.kernels.silu_mul(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        out = linear(h, down, down_bias)
        return out if lora is None else lora.add(out, h, index, "down")

    @staticmethod
    def _linear(x: torch.Tensor, weight: Weight, bias, lora: LowRankDeltas | None, index: int, slot: str) -> torch.Tensor:
        """The base linear, plus the step's adapters' low-rank terms on their rows."""
        out = linear(x, weight, bias)
        return out if lora is None else lora.add(out, x, index, slot)

    def _forward_eager(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[LayerKVCache], lora: LowRankDeltas | None = None) -> torch.Tensor:
        """forward() in PyTorch ops: the reference the tests compare with, and the path of fp32 and CUDA."""
        arch = self.arch
        scale_residual = arch.residual_multiplier != 1.0
        hidden = self._embed(input_ids)
        tables = self._step_tables(positions)  # gathered once, not per layer
        # enumerate over the layers alone: zip's first result tuple would keep layer 0 alive all
        # pass, one layer more than a sliding window of layers (models/weight_window.py) allows.
        for index, layer in enumerate(self.layers):
            cache = kv_caches[index]
            residual = hidden
            x = self._norm(hidden, layer.input_norm)
            qkv = self._linear(x, layer.qkv, layer.qkv_bias, lora, index, "qkv")
            q, k, v = self._attention_inputs(layer, qkv, tables)
            out = self._linear(self._attend(layer, q, k, v, cache, meta), layer.o_proj, layer.o_bias, lora, index,
                               "o_proj")
            if self.tp is not None:  # each rank's heads give a partial sum of the projection
                out = self.tp.all_reduce(out)
            if layer.attn_out_norm is not None:
                out = self._norm(out, layer.attn_out_norm)
            hidden = residual + (out * arch.residual_multiplier if scale_residual else out)
            residual = hidden
            out = self._mlp(layer, self._norm(hidden, layer.mlp_norm), lora, index)
            if layer.mlp_out_norm is not None:
                out = self._norm(out, layer.mlp_out_norm)
            hidden = residual + (out * arch.residual_multiplier if scale_residual else out)
        return self._norm(hidden, self.norm)

    def _forward_fused(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                       kv_caches: list[LayerKVCache], lora: LowRankDeltas | None = None) -> torch.Tensor:
        """forward() in ~10 kernel calls a layer instead of ~75 eager ops: each residual add is
        fused into the RMSNorm that follows it, RoPE rotates q and k in place inside qkv, and
        SiLU * up is one pass. What the kernels lack runs as PyTorch ops in between."""
        arch, ops = self.arch, self.kernels
        num_tokens, eps = input_ids.shape[0], arch.rms_norm_eps
        q_size, kv_size, head_dim = self.q_size, self.kv_size, arch.head_dim
        rotated_heads = arch.num_heads + arch.num_kv_heads
        # RoPE in place inside qkv by the kernel (after per-head q/k norms, also kernels): full rotary only.
        in_kernel_rope = arch.qk_norm in ("none", "head") and arch.clip_qkv is None and arch.rotary_dim == head_dim
        residual = self._embed(input_ids)
        tables = self._step_tables(positions)
        scale = arch.residual_multiplier
        delta = None  # what the last sublayer adds to the residual stream
        for index, layer in enumerate(self.layers):  # not zip: see _forward_eager
            cache = kv_caches[index]
            x = ops.rms_norm(residual if delta is None else delta, layer.input_norm, eps,
                             None if delta is None else residual)
            qkv = self._linear(x, layer.qkv, layer.qkv_bias, lora, index, "qkv")  # adapters before RoPE
            if in_kernel_rope:
                if layer.q_norm is not None:  # eager's per-head RMSNorm, bit for bit, then back into qkv
                    for offset, heads, weight in ((0, arch.num_heads, layer.q_norm),
                                                  (q_size, arch.num_kv_heads, layer.k_norm)):
                        part = qkv[:, offset:offset + heads * head_dim]
                        part.copy_(ops.rms_norm(part.reshape(-1, head_dim), weight, eps, None).view(num_tokens, -1))
                if layer.rope is not None:
                    ops.rope_(qkv, *tables[layer.rope], rotated_heads, head_dim)
                q = qkv[:, :q_size].view(num_tokens, arch.num_heads, head_dim)
                k = qkv[:, q_size:q_size + kv_size].view(num_tokens, arch.num_kv_heads, head_dim)
                v = qkv[:, q_size + kv_size:].view(num_tokens, arch.num_kv_heads, head_dim)
            else:
                q, k, v = self._attention_inputs(layer, qkv, tables)
            out = self._linear(self._attend(layer, q, k, v, cache, meta), layer.o_proj, layer.o_bias, lora, index,
                               "o_proj")
            if self.tp is not None:  # each rank's heads give a partial sum of the projection
                out = self.tp.all_reduce(out)
            if layer.attn_out_norm is not None:
                out = ops.rms_norm(out, layer.attn_out_norm, eps, None)
            if scale != 1.0:
                out = out * scale
            x = ops.rms_norm(out, layer.mlp_norm, eps, residual)
            delta = self._mlp(layer, x, lora, index)
            if layer.mlp_out_norm is not None:
                delta = ops.rms_norm(delta, layer.mlp_out_norm, eps, None)
            if scale != 1.0:
                delta = delta * scale
        return ops.rms_norm(delta, self.norm, eps, residual)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] float32."""
        logits = linear(hidden, self.lm_head)
        if self.tp is not None:  # each rank's slice of the vocabulary, padded to equal slices
            logits = self.tp.all_gather_columns(logits)[:, :self.arch.vocab_size]
        if self.arch.logits_divisor != 1.0:
            logits = logits / self.arch.logits_divisor
        if self.arch.final_softcap is not None:
            cap = self.arch.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
