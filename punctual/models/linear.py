"""The linear layers' weights in the form each kernel reads, and the one `linear` call over them.

bf16 on a CPU with the fused kernels: `FusedWeight` (the small-batch GEMM's packed layout, and
oneDNN's for long prompt chunks); bf16 on a CPU without them: oneDNN's blocked layout
(`pack_weight`); int8/int4: `QuantizedWeight` (model/quant.py); otherwise a plain tensor.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from punctual.kernels.quant import QuantizedWeight
from punctual.kernels.tune_table import KernelTable, kernel_table

# Up to this many rows, a linear over a FusedWeight runs the small-batch kernel (it streams the
# weight once for all rows); more rows (long prompt chunks) go to oneDNN's GEMM. With two output
# blocks per tile above 4 rows, the kernel is as fast as oneDNN or faster on smollm2's shapes up
# to 64 rows, and ~1.2x slower at 512 (BENCHMARKS.md section 11). A chunk of more rows has
# logits that are eager's bit for bit; up to 64 rows they are rounded as the kernel sums.
# That is the AMD EPYC's rule; each CPU takes its kernel table's (kernels/tune_table.py): with AMX,
# oneDNN's tile GEMM wins from far fewer rows.
FUSED_LINEAR_MAX_ROWS = 64


@dataclass
class FusedWeight:
    """A bf16 linear weight for the fused CPU kernels: `packed` in the small-batch kernel's layout,
    `dense` in oneDNN's (for prompt chunks), or plain [out, in] under a weight window (`plain_dense`:
    its layers are cached on disk, and oneDNN's opaque layout cannot be written; F.linear gives the
    packed path's results bit for bit, see packing_is_exact). Both hold the same bf16 values."""

    packed: torch.Tensor
    dense: torch.Tensor | None  # None in batch-invariant mode: every row runs the packed kernel
    out_features: int
    max_rows: float = FUSED_LINEAR_MAX_ROWS  # inf in batch-invariant mode: one summation order for every row

    @classmethod
    def from_weight(cls, weight: torch.Tensor, kernels, batch_invariant: bool,
                    table: KernelTable | None = None, plain_dense: bool = False) -> "FusedWeight | torch.Tensor":
        """`table`: the rule of when oneDNN takes over (default: this CPU's kernel table).
        `plain_dense`: keep `dense` (or a weight the kernel cannot take) as the plain tensor."""
        # Plain where oneDNN cannot pack bf16 (a CPU without AVX-512 BW/VL/DQ or AVX-NE-CONVERT,
        # e.g. AVX2-only: the portable kernel build's CPUs): F.linear then, the same results.
        pack = pack_weight if not plain_dense and bf16_packing_available() else (lambda w: w)  # noqa: E731
        if weight.shape[0] % 16 or weight.shape[1] % 2:  # the kernel's block shape
            if batch_invariant:
                raise ValueError(f"batch_invariant: a weight of shape {tuple(weight.shape)} does not fit the GEMM "
                                 "kernel (out features a multiple of 16, in features even)")
            return pack(weight)
        dense = None if batch_invariant else pack(weight)
        max_rows = math.inf if batch_invariant else (table or kernel_table()).fused_max_rows("bf16")
        return cls(kernels.pack_bf16(weight), dense, weight.shape[0], max_rows)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] <= self.max_rows:
            return torch.ops.punctual.linear_bf16(x, self.packed, bias)
        if not self.dense.is_mkldnn:
            return F.linear(x, self.dense, bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.dense, bias, "none", [], "")


Weight = torch.Tensor | QuantizedWeight | FusedWeight


class LowRankDeltas(Protocol):
    """A step's low-rank terms on top of the base linears (LoRA adapters: lora/weights.LoRAStep)."""

    def add(self, out: torch.Tensor, x: torch.Tensor, layer: int, slot: str) -> torch.Tensor:
        """`out` (the base linear `slot` of layer `layer` applied to x) plus each row's term."""


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias. A weight packed by `pack_weight` goes straight to oneDNN, a quantized
    or fused one to its kernel."""
    if isinstance(weight, (QuantizedWeight, FusedWeight)):
        return weight.linear(x, bias)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
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


@functools.cache
def bf16_packing_available() -> bool:
    """Whether this CPU's oneDNN packs bf16 weights (exactly): see packing_is_exact."""
    return packing_is_exact(torch.bfloat16, torch.device("cpu"))
