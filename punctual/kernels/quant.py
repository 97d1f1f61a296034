"""Weight-only quantization of the linear layers: int8 per output channel, int4 in groups.

Through PyTorch's own CPU kernels (torchao calls the same ones on CPU): `_weight_int8pack_mm`
(int8 weights, one scale per output row) and `_weight_int4pack_mm_for_cpu` (4-bit weights in
groups along the input dimension, a scale and a zero point per group, asymmetric like
llama.cpp's Q4_1). Measured on the AMD EPYC of PERFORMANCE.md, one thread (us per call,
bf16 packed oneDNN / int8 / int4):

    rows   qkv 960x576    gate_up 3072x576   down 576x1536   lm_head 49152x576
    1      27 / 16 / 18   59 / 47 / 52       34 / 23 / 27    1605 / 1665 / 1081
    8      38 / 63 / 58   88 / 201 / 181     50 / 89 / 89
    32     94 / 247 / 224 276 / 804 / 717    141 / 348 / 356 6564 / 17281 / 23435

The kernels are GEMV loops: they read half or a quarter of the bytes at one row and lose by
2.5-3x from 8 rows on, since they do not reuse a dequantized weight across rows. So beyond
`dequantize_above_rows` rows (prompt chunks) a linear dequantizes its weight to the model dtype
and runs one GEMM (4.7 against 13.2 ms for 512 rows of gate_up in int8), with the same
quantized values; only the rounding of the product changes with the path.

With the fused kernels, which path runs for how many rows is the CPU's kernel table's rule
(kernels/tune_table.py); the constants below are the rule measured on the AMD EPYC. On a CPU with
AMX-INT8 (or VNNI) the table may send int8's big batches through `int8_gemm`: each row of x
quantized to int8 (absmax per row, llama.cpp's Q8 activations) and an int8 x int8 -> int32 GEMM
in oneDNN on tiles, scaled by row scale x weight scale (the quantizing and the scaling one C++ pass
each: csrc/gemm_prep.h's linear_int8_gemm); and int4's prompt chunks may dequantize in one C++ pass
(dequantize_int4) for oneDNN's bf16 GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from punctual.kernels.tune_table import KernelTable, kernel_table

NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8)  # a byte's low nibble first, then its high one
INT4_GROUP_SIZE = 32  # llama.cpp's Q4_0 / Q4_1 block: a dequantized Q4_1 checkpoint re-quantizes exactly
# The head's quantization for each: int4 keeps an int8 head, as llama.cpp's quantizer keeps the
# output tensor at 6-8 bits (on smollm2 an int4 head cost 6.5% perplexity, an int8 one 0.1%: BENCHMARKS.md).
HEAD_QUANTIZATION = {"int8": "int8", "int4": "int8"}
# The thresholds below were measured on the AMD EPYC; with the fused kernels they are its rule in
# tune_table.AVX512_RULES (a test keeps the two equal), and each CPU runs its own table's rule.
# Above this many rows the GEMV kernels lose to dequantize-then-GEMM (gate_up, 1 thread, us:
# int8 kernel 414 / 822 / 3254 against 438 / 616 / 1339 at 16 / 32 / 128 rows; int4's
# dequantization alone takes 2.0 ms, so its kernel wins up to ~128 rows: 2899 against 3165).
INT8_DEQUANTIZE_ABOVE = 24
FUSED_MAX_ROWS = 16  # int4's bf16-widening kernel (linear_int4, without int8 activations)
# int8's kernel shares the bf16 kernel's tiles (two output blocks per tile above 4 rows). It beats
# dequantize-then-GEMM up to this many rows: smollm2 decode steps 1.21-1.23x faster at 24 and 32
# streams, but 0.85x at 64, where widening each int8 weight to bf16 in registers costs more than
# one dequantization shared by all rows (BENCHMARKS.md section 11).
INT8_FUSED_MAX_ROWS = 32
# linear_int4_q8 (int8 activations) up to this many rows: it beat torch's int4pack kernel 2x on
# 24-96-row prompt chunks (smollm2 prompt steps 11.5 / 18.5 / 33.8 ms against 21.1 / 37.2 / 71.2)
# and dequantize-then-GEMM on 192-512 rows (71 / 93 / 208 ms against 162 / 188 / 298), and decode
# steps of 24 and 64 streams took 0.65x the time (BENCHMARKS.md section 11).
INT4_Q8_FUSED_MAX_ROWS = 512
INT4_DEQUANTIZE_ABOVE = 128  # without the fused kernels: torch's int4pack kernel up to here


def fused_max_rows(kind: str, int8_activations: bool = True, table: KernelTable | None = None) -> int:
    """Up to how many rows a quantized linear of `kind` runs its fused kernel (int4: the kernel
    with int8 activations, or the bf16-widening one), by `table` (default: this CPU's)."""
    table = table or kernel_table()
    most = table.fused_max_rows(kind)
    return most if kind == "int8" or int8_activations else min(most, FUSED_MAX_ROWS)


@dataclass
class QuantizedWeight:
    """A linear weight [out_features, in_features] in int8 or int4, with what its kernel needs.

    int8: `data` int8 [N, K], `scales` [N] in the activation dtype; W = data * scales[:, None].
    int4: `data` is the kernel's packed layout, `nibbles` the same 4-bit values plainly (uint8
    [N, K/2], low nibble first) for dequantizing, `scales` [K/g, N, 2] (scale, zero) in the
    activation dtype, or float32 where they came exact from a GGUF file; W = (q - 8) * scale +
    zero per group of g inputs.
    """

    kind: str
    data: torch.Tensor
    scales: torch.Tensor
    out_features: int
    in_features: int
    group_size: int = 0
    nibbles: torch.Tensor | None = None
    # With the fused CPU kernels, up to fused_max_rows(kind, int8_activations) rows run torch.ops.punctual.linear_int8 or
    # linear_int4_q8, reading a half / a quarter of bf16's bytes. int8: `data` again in the block
    # layout, and fp32 scales. int4: `nibbles` as [N/16, K/8, 16, 4] bytes (linear_int4_q8's
    # layout; [N/16, K/2, 16] for linear_int4 without int8 activations), scales and zeros as
    # [N/16, K/g, 16] fp32.
    fused: torch.Tensor | None = None
    fused_scales: torch.Tensor | None = None
    fused_zeros: torch.Tensor | None = None

    # int4: which fused kernel `fused` is packed for; int8: whether big batches may run int8_gemm.
    int8_activations: bool = True
    # The rule of which path runs for how many rows (set with the fused kernels: this CPU's table).
    table: KernelTable | None = None
    # int8_gemm's weight: `data` prepacked by oneDNN (qlinear_prepack), where the rule uses it
    # (None until the first big batch where the layer came from a weight window's cache).
    gemm: torch.Tensor | None = None
    gemm_zero_points: torch.Tensor | None = None

    def attach_fused(self, kernels, int8_activations: bool = True, table: KernelTable | None = None) -> None:
        """Pack for the fused kernels and the paths `table` (default: this CPU's) sends rows to.
        int4 with `int8_activations` runs linear_int4_q8 (each row quantized to int8 per group,
        integer dot products: 2-3x faster at one row), else linear_int4 (the nibbles widened to
        bf16, x as it is). int8 with `int8_activations` may run big batches through int8_gemm."""
        n, k = self.out_features, self.in_features
        if n % 16 or k % 2:
            return
        self.table = table or kernel_table()
        self.int8_activations = int8_activations
        if self.kind == "int8":
            self.fused = kernels.pack_int8(self.data)
            self.fused_scales = self.scales.float().contiguous()
            if int8_activations and any(path == "int8_gemm" for _, path in self.table.int8):
                self.gemm = torch.ops.onednn.qlinear_prepack(self.data, None)
                self.gemm_zero_points = torch.zeros(n, dtype=torch.int64)
            return
        if int8_activations:
            # Byte j of each output's 4 per 8 inputs: input j in the low nibble, input 4 + j in the high.
            q = torch.stack((self.nibbles & 15, self.nibbles >> 4), dim=-1).view(n // 16, 16, k // 8, 2, 4)
            self.fused = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()
        else:
            self.fused = self.nibbles.view(n // 16, 16, k // 2).permute(0, 2, 1).contiguous()
        per_block = lambda t: t.t().float().reshape(n // 16, 16, -1).permute(0, 2, 1).contiguous()  # noqa: E731
        self.fused_scales, self.fused_zeros = per_block(self.scales[..., 0]), per_block(self.scales[..., 1])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def max_fused_rows(self) -> int:
        """Up to how many rows this weight runs its fused kernel (0 without one)."""
        return 0 if self.fused is None else fused_max_rows(self.kind, self.int8_activations, self.table)

    @property
    def nbytes(self) -> int:
        extra = sum(t.nbytes for t in (self.nibbles, self.fused, self.fused_scales, self.fused_zeros, self.gemm)
                    if t is not None)
        return self.data.nbytes + self.scales.nbytes + extra

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the kernels multiply by, [N, K], in `dtype` (default: the scales' dtype)."""
        dtype = dtype or self.scales.dtype
        if self.kind == "int8":
            return (self.data.to(dtype) * self.scales.to(dtype)[:, None])
        n, k, g = self.out_features, self.in_features, self.group_size
        # Low nibble then high, each step in place: the same roundings as out of place, fewer
        # passes over N x K (the big-batch path pays this on every call).
        q = torch.bitwise_right_shift(self.nibbles.unsqueeze(-1), NIBBLE_SHIFTS).bitwise_and_(15).view(n, k // g, g)
        scale = self.scales[..., 0].t().to(dtype)[:, :, None]  # [N, K/g, 1]
        zero = self.scales[..., 1].t().to(dtype)[:, :, None]
        return q.to(dtype).sub_(8).mul_(scale).add_(zero).view(n, k)

    def path(self, rows: int) -> str:
        """Which path a linear of `rows` rows takes (tune_table.PATHS): the table's rule with the
        fused kernels; without them torch's kernel up to the *_DEQUANTIZE_ABOVE constants."""
        if self.fused is None:
            above = INT8_DEQUANTIZE_ABOVE if self.kind == "int8" else INT4_DEQUANTIZE_ABOVE
            return "dequantize" if rows > above else f"{self.kind}pack"
        if rows <= self.max_fused_rows:
            return "fused"
        path = self.table.path(self.kind, rows)
        if path == "fused":  # int4's bf16-widening kernel stops before the rule's range: as without it
            path = "dequantize" if rows > INT4_DEQUANTIZE_ABOVE else "int4pack"
        if path == "int8_gemm" and not self.int8_activations:
            path = "dequantize"
        return path

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, K] @ W.T (+ bias) -> [T, N] in x's dtype."""
        return self.run(self.path(x.shape[0]), x, bias)

    def run(self, path: str, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`linear` through `path` (one of self.path's answers; benchmarks/tune_kernels.py times each)."""
        if path == "fused":
            if self.kind == "int8":
                return torch.ops.punctual.linear_int8(x, self.fused, self.fused_scales, bias)
            int4 = torch.ops.punctual.linear_int4_q8 if self.int8_activations else torch.ops.punctual.linear_int4
            return int4(x, self.fused, self.fused_scales, self.fused_zeros, self.group_size, bias)
        if path == "int8_gemm":
            return self.linear_int8_gemm(x, bias)
        if path == "int8pack":
            out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.data, self.scales)
        elif path == "int4pack":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.data, self.group_size,
                                                             self.scales.to(x.dtype))  # GGUF's may be float32
        elif self.kind == "int8":  # dequantize
            out = F.linear(x, self.data.to(x.dtype)) * self.scales
        elif x.dtype == torch.bfloat16 and hasattr(torch.ops.punctual, "dequantize_int4"):
            # QuantizedWeight.dequantize's roundings in one C++ pass (3-14x faster than its ops): the
            # bf16 weight is a scratch that oneDNN's GEMM reads at once.
            out = F.linear(x, torch.ops.punctual.dequantize_int4(self.nibbles, self.scales, self.group_size))
        else:
            out = F.linear(x, self.dequantize(x.dtype))
        return out if bias is None else out + bias

    def linear_int8_gemm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """int8 weights against x quantized per row: d = max|x| / 127 and q = round_half_even(x * (1 / d)),
        as the int4 kernel quantizes (quantize_rows_int8, with the row for group); then the exact int32
        sums of q * data (oneDNN: AMX-INT8 tiles or VNNI), times the weight's scale and d in fp32,
        plus the bias, rounded once to x's dtype (as linear_int8 rounds)."""
        if self.gemm is None:  # a layer read from the weight window's cache, which cannot hold oneDNN's layout
            self.gemm = torch.ops.onednn.qlinear_prepack(self.data, None)
        if x.dtype == torch.bfloat16 and hasattr(torch.ops.punctual, "linear_int8_gemm"):
            # The same steps in C++ (csrc/gemm_prep.h), bit for bit: one pass to quantize x, one to scale
            # the GEMM's fp32 out, in place of ~8 PyTorch ops over the whole tensor (a 512-row chunk
            # of smollm2's linears ran 2.5-4x faster, as fast as oneDNN's bf16 GEMM).
            return torch.ops.punctual.linear_int8_gemm(x, self.gemm, self.fused_scales, self.gemm_zero_points, bias)
        return int8_gemm_torch(x, self.gemm, self.fused_scales, self.gemm_zero_points, bias)


def int8_gemm_torch(x: torch.Tensor, gemm: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """QuantizedWeight.linear_int8_gemm in PyTorch ops (where the kernels' op is missing, and what it
    is checked against): `gemm` the int8 weight prepacked by oneDNN, `scales` its fp32 scales."""
    d = x.abs().amax(dim=1, keepdim=True).float() / 127  # [T, 1]
    inv = torch.where(d > 0, d.reciprocal(), 0.0)  # an all-zero row quantizes to zeros
    xq = (x * inv).round_().to(torch.int8)  # [T, K]; x * inv in fp32 (type promotion)
    out = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, gemm, scales, zero_points,
                                             None, 1.0, 0, torch.float32, "none", [], "")  # [T, N] fp32
    out.mul_(d)
    if bias is not None:
        out.add_(bias)
    return out.to(x.dtype)


def can_quantize(weight: torch.Tensor, kind: str, group_size: int = INT4_GROUP_SIZE) -> bool:
    """The CPU kernels' shape rules: int4 needs whole groups along K and N a multiple of 16."""
    if kind == "int8":
        return True
    return weight.shape[1] % group_size == 0 and weight.shape[0] % 16 == 0


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8 per output channel: scale = absmax / 127 of each row."""
    w32 = weight.float()
    scale = w32.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    data = torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return QuantizedWeight("int8", data, scale.to(weight.dtype), weight.shape[0], weight.shape[1])


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> QuantizedWeight:
    """Asymmetric 4-bit in groups of `group_size` inputs: min and max of each group map to 0 and 15."""
    n, k = weight.shape
    groups = weight.float().view(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    # The kernel computes (q - 8) * scale + zero, so the zero point is the value of q = 8.
    scale_d, zero_d = scale.to(weight.dtype), (low + 8 * scale).to(weight.dtype)
    # Rounded against the scale and zero as stored, so the stored grid is the one searched.
    q = torch.round((groups - (zero_d.float() - 8 * scale_d.float())) / scale_d.float()).clamp(0, 15)
    return int4_weight(q.to(torch.uint8).view(n, k), scale_d.view(n, -1), zero_d.view(n, -1))


def int4_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> QuantizedWeight:
    """The int4 weight of values q [N, K] in 0..15 with W = (q - 8) * scale + zero, scale and zero
    [N, K/g] in the dtype they are kept in (the model's, or float32 for GGUF's exact fp16 scales)."""
    n, k = q.shape
    group_size = k // scale.shape[1]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()
    scales = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()
    return QuantizedWeight("int4", packed, scales, n, k, group_size, nibbles)


def concat_int4(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """int4 weights stacked along the outputs (q, k, v into qkv), as one weight."""
    def values(w: QuantizedWeight) -> torch.Tensor:
        return torch.stack((w.nibbles & 15, w.nibbles >> 4), dim=-1).view(w.out_features, w.in_features)

    q = torch.cat([values(w) for w in weights])
    scale = torch.cat([w.scales[..., 0].t() for w in weights])
    zero = torch.cat([w.scales[..., 1].t() for w in weights])
    return int4_weight(q, scale.contiguous(), zero.contiguous())


def quantize(weight: torch.Tensor, kind: str) -> torch.Tensor | QuantizedWeight:
    """`weight` quantized by `kind` (int8 | int4); a weight the int4 kernel cannot take goes int8."""
    if kind == "int4" and not can_quantize(weight, "int4"):
        kind = "int8"
    return quantize_int4(weight) if kind == "int4" else quantize_int8(weight)

