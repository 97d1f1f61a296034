"""Which kernel runs a linear of how many rows: a rule per CPU, read from a committed table.

The table (kernel_table.json beside this file) is written by `benchmarks/tune_kernels.py --write`,
measured once per CPU model and feature set; a CPU not in it gets a rule derived from its
features alone (`default_rules`). Nothing is timed at load: the same CPU always takes the same
paths, so its numerics do not depend on a race.

A rule is, per weight kind (bf16 | int8 | int4), ranges of rows and the path each takes:
((8, "fused"), (None, "onednn")) runs up to 8 rows in the small-batch kernel, more through
oneDNN. Paths per kind:
  bf16: fused (the small-batch kernel) | onednn (oneDNN's GEMM on its packed weight; AMX where present)
  int8: fused (int8 weights widened to bf16 in registers) | int8pack (torch's int8 GEMV kernel)
        | dequantize (to bf16, one GEMM) | int8_gemm (rows quantized to int8 in C++, int8 x int8 -> int32
        GEMM in oneDNN: AMX-INT8 or VNNI, scaled to bf16 in C++; csrc/gemm_prep.h)
  int4: fused (int8 activations, or bf16 without them) | int4pack (torch's int4 kernel)
        | dequantize (to bf16 in one C++ pass, then oneDNN's bf16 GEMM: AMX where present)
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

TABLE_PATH = Path(__file__).parent / "kernel_table.json"
# The features that decide a rule; a table entry is keyed by the CPU model and those it has.
FEATURES = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx2")
PATHS = {
    "bf16": ("fused", "onednn"),
    "int8": ("fused", "int8pack", "dequantize", "int8_gemm"),
    "int4": ("fused", "int4pack", "dequantize"),
}

Rule = tuple[tuple[int | None, str], ...]  # (most rows or None for any, path), by increasing rows

# The rules measured on the AMD EPYC with AVX-512 BF16 and no AMX (BENCHMARKS.md section 11):
# the small-batch kernels win there up to 64 (bf16), 32 (int8) and 512 (int4, int8 activations)
# rows, dequantize-then-GEMM above (see the constants of models/linear.py and kernels/quant.py).
AVX512_RULES: dict[str, Rule] = {
    "bf16": ((64, "fused"), (None, "onednn")),
    "int8": ((32, "fused"), (None, "dequantize")),
    "int4": ((512, "fused"), (None, "dequantize")),
}
# With AMX, oneDNN's tile GEMMs overtake the bf16 and int8 small-batch kernels after a handful of
# rows (the kernels' time grows with every row past 4; a tile takes 16 rows per instruction): on
# an AMX Xeon VM, one thread, gate_up 3072x576, rough timings under load, the kernels led at 4 rows
# and lost at 8. int4 has no tile path of its own (oneDNN's int8 GEMM has no per-group scales along
# K): its kernel with int8 activations up to 64 rows, then the weight dequantized in one C++ pass
# (dequantize_int4) for oneDNN's bf16 tiles, which led from ~128 rows on that VM (one thread, under
# load). tune_kernels.py replaces these with measured rules per CPU model.
AMX_RULES: dict[str, Rule] = {
    "bf16": ((4, "fused"), (None, "onednn")),
    "int8": ((4, "fused"), (None, "int8_gemm")),
    "int4": ((64, "fused"), (None, "dequantize")),
}

# Without AVX-512 BF16 (the portable kernel build: AVX2, NEON), measured on the AMX Xeon with the
# AVX2 build forced and oneDNN held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2; BENCHMARKS.md, this round):
# oneDNN's bf16 GEMM without AVX-512 is slower than the portable kernel at every row count
# (a 512-token prompt 110 against 385 tok/s), int8 goes through torch's int8pack kernel up to 64 rows
# and the int8 GEMM above, int4 through torch's int4pack kernel.
PORTABLE_RULES: dict[str, Rule] = {
    "bf16": ((None, "fused"),),
    "int8": ((64, "int8pack"), (None, "int8_gemm")),
    "int4": ((None, "int4pack"),),
}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    features: frozenset[str] = field(default_factory=frozenset)

    @property
    def key(self) -> str:
        """The table's key: model name and the features of FEATURES it has, sorted."""
        return f"{self.model} | {' '.join(sorted(self.features))}"


def read_cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """This CPU's model name and which of FEATURES it has (from /proc/cpuinfo; empty where unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "unknown", set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and model == "unknown":
            model = value.strip()
        elif name == "flags" and not flags:
            flags = set(value.split())
    return CpuInfo(model, frozenset(f for f in FEATURES if f in flags))


@dataclass(frozen=True)
class KernelTable:
    """The rule for each weight kind on one CPU, and where it came from."""

    bf16: Rule
    int8: Rule
    int4: Rule
    source: str  # "measured: ..." from the table file, or "default for <features>"

    def rule(self, kind: str) -> Rule:
        return getattr(self, kind)

    def path(self, kind: str, rows: int) -> str:
        """The path a linear of `kind` takes for `rows` rows."""
        for most, path in self.rule(kind):
            if most is None or rows <= most:
                return path
        raise AssertionError(f"rule for {kind} has no open last range")  # validate() refuses such rules

    def fused_max_rows(self, kind: str) -> int:
        """Up to how many rows the small-batch kernel runs (0: never); it is only ever the first range."""
        most, path = self.rule(kind)[0]
        return (most if most is not None else 1 << 62) if path == "fused" else 0

    def describe(self) -> str:
        def one(rule: Rule) -> str:
            if len(rule) == 1:
                return f"{rule[0][1]} at any rows"
            return ", ".join(f"{path} up to {most}" if most is not None else f"{path} above" for most, path in rule)
        return "; ".join(f"{kind}: {one(self.rule(kind))}" for kind in PATHS) + f" ({self.source})"


def validate(kind: str, rule) -> Rule:
    """A rule from the table file as a tuple, or ValueError naming what is wrong with it."""
    if kind not in PATHS:
        raise ValueError(f"kernel table: unknown weight kind {kind!r} (known: {', '.join(PATHS)})")
    ranges = tuple((most, path) for most, path in rule)
    if not ranges or ranges[-1][0] is not None:
        raise ValueError(f"kernel table: the {kind} rule must end with an open range [null, path], got {rule}")
    bounds = [most for most, _ in ranges[:-1]]
    if any(not isinstance(b, int) or b < 0 for b in bounds) or bounds != sorted(set(bounds)):
        raise ValueError(f"kernel table: the {kind} rule's row bounds must be increasing integers, got {rule}")
    for i, (_, path) in enumerate(ranges):
        if path not in PATHS[kind]:
            raise ValueError(f"kernel table: unknown {kind} path {path!r} (known: {', '.join(PATHS[kind])})")
        if path == "fused" and i:
            raise ValueError(f"kernel table: the {kind} rule may run the fused kernel in its first range only")
    return ranges


def default_rules(features: frozenset[str]) -> KernelTable:
    """The rule for a CPU not in the table, from its features alone."""
    rules = dict(AVX512_RULES if "avx512_bf16" in features else PORTABLE_RULES)
    if "amx_bf16" in features:
        rules.update(bf16=AMX_RULES["bf16"], int4=AMX_RULES["int4"])
    if "amx_int8" in features:
        rules["int8"] = AMX_RULES["int8"]
    return KernelTable(**rules, source=f"default for {' '.join(sorted(features)) or 'no listed features'}")


def load_table(cpu: CpuInfo, path: Path = TABLE_PATH) -> KernelTable:
    """The table's entry for `cpu` (model and features), else the default for its features."""
    entries = json.loads(path.read_text())["cpus"] if path.exists() else {}
    entry = entries.get(cpu.key)
    if entry is None:
        return default_rules(cpu.features)
    for kind in entry.keys() - {"measured"}:
        validate(kind, entry[kind])  # an unknown kind is refused by name too
    missing = [kind for kind in PATHS if kind not in entry]
    if missing:
        raise ValueError(f"kernel table {path}: the entry for {cpu.key!r} has no rule for {', '.join(missing)}")
    rules = {kind: validate(kind, entry[kind]) for kind in PATHS}
    return KernelTable(**rules, source=f"measured: {entry.get('measured', 'tune_kernels.py')}")


# Features a portable kernel build cannot use: with PUNCTUAL_KERNELS_ISA=avx2 (or neon) forced on a
# CPU that has them, the table is that of the CPU without them (with ONEDNN_MAX_CPU_ISA=AVX2 too,
# oneDNN's GEMMs match: how an AVX2-only machine is emulated and tuned on an AVX-512 one).
BEYOND_PORTABLE = frozenset({"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni"})


@functools.cache
def cpu_info() -> CpuInfo:
    """This CPU's model and features (read once per process), less those a forced portable
    kernel build leaves unused."""
    cpu = read_cpu_info()
    if os.environ.get("PUNCTUAL_KERNELS_ISA", "").lower() in ("avx2", "neon"):
        return CpuInfo(cpu.model, cpu.features - BEYOND_PORTABLE)
    return cpu


NAMED_RULES = {"avx512": AVX512_RULES, "amx": AMX_RULES, "portable": PORTABLE_RULES}


@functools.cache
def kernel_table() -> KernelTable:
    """This CPU's kernel table (read once per process), or the named rule PUNCTUAL_KERNEL_RULES
    asks for (avx512 | amx | portable: to compare rules, or to pin one, as the kernel tests do)."""
    forced = os.environ.get("PUNCTUAL_KERNEL_RULES", "")
    if forced:
        if forced not in NAMED_RULES:
            raise ValueError(f"PUNCTUAL_KERNEL_RULES must be one of {', '.join(NAMED_RULES)}, got {forced!r}")
        return KernelTable(**NAMED_RULES[forced], source=f"PUNCTUAL_KERNEL_RULES={forced}")
    return load_table(cpu_info())


def summary() -> str:
    """One line for the logs: this CPU, its features and the kernel table in use."""
    cpu = cpu_info()
    return (f"CPU {cpu.model!r}, features {' '.join(sorted(cpu.features)) or 'none of ' + ' '.join(FEATURES)}; "
            f"kernel table: {kernel_table().describe()}")
