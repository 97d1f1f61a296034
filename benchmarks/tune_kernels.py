"""Measure which kernel path wins at how many rows on this CPU, and write the rule to the kernel table.

Per weight kind (bf16, int8, int4) and row count, every candidate path of punctual/kernels/tune_table.py
on smollm2-shaped linears (576x576, 1536x576, 576x1536 and the 49152x576 head; int4 models keep an
int8 head, so int4 is timed on the layers only), best of --repeats batches of calls. A step's time is
the layers' sum times --layers plus the head's; per row count the fastest path wins, and the rule is
those winners in ranges (the fused kernel only as the first). A small-batch kernel slower than 4x
the best at one row count is not timed at larger ones (its time grows with every row).

    python benchmarks/tune_kernels.py                      # print the table and the rule for this CPU
    python benchmarks/tune_kernels.py --write              # and store the rule in punctual/kernels/kernel_table.json
    python benchmarks/tune_kernels.py --rows 1,16 --iters 2 --kinds bf16   # a quick check that it runs

Run it on a quiet machine with the thread count you serve with (--threads, default torch's).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import time

import torch

from punctual.kernels import cpu_kernels, tune_table
from punctual.kernels.quant import quantize_int4, quantize_int8
from punctual.kernels.tune_table import PATHS, KernelTable
from punctual.models.linear import bf16_packing_available, pack_weight

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LAYER_SHAPES = ((576, 576), (1536, 576), (576, 1536))  # (out, in)
HEAD_SHAPE = (49152, 576)
GIVE_UP_RATIO = 4.0
# The kernels whose time grows with every row (they reuse no weight across rows' tiles): once 4x
# behind, they stay behind. The GEMMs' fixed costs (a dequantization, a quantization) shrink per row.
PER_ROW_PATHS = {"fused", "int8pack", "int4pack"}
# Attached so that every int8 path is built (int8_gemm's prepacked weight too), whatever this CPU's table says.
EVERY_PATH = KernelTable(bf16=((1, "fused"), (None, "onednn")), int8=((1, "fused"), (None, "int8_gemm")),
                         int4=((1, "fused"), (None, "dequantize")), source="tune_kernels.py")


def cpu_line() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    except (OSError, subprocess.TimeoutExpired):
        model = "?"
    cpu = tune_table.cpu_info()
    return f"lscpu model name: {model}; table key: {cpu.key!r}"


def best_us(fn, iters: int, repeats: int) -> float:
    """Best per-call time of `repeats` batches of at least `iters` calls (more for fast calls: ~2 ms a batch)."""
    start = time.perf_counter()
    fn()
    calls = max(iters, min(200, math.ceil(2e-3 / max(time.perf_counter() - start, 1e-7))))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def candidates(kind: str, n: int, k: int, ops) -> dict:
    """path -> fn(x) for one weight of `kind` and shape [n, k]."""
    weight = (torch.randn(n, k) * 0.05).bfloat16()
    if kind == "bf16":
        packed = ops.pack_bf16(weight)
        if not bf16_packing_available():  # as FusedWeight does: a plain weight through F.linear
            return {"fused": lambda x: ops.linear_bf16(x, packed, None),
                    "onednn": lambda x: torch.nn.functional.linear(x, weight)}
        dense = pack_weight(weight)
        return {"fused": lambda x: ops.linear_bf16(x, packed, None),
                "onednn": lambda x: torch.ops.mkldnn._linear_pointwise(x, dense, None, "none", [], "")}
    q = quantize_int8(weight) if kind == "int8" else quantize_int4(weight)
    q.attach_fused(ops, table=EVERY_PATH)
    paths = [p for p in PATHS[kind] if not (p == "int8_gemm" and q.gemm is None)]
    return {p: (lambda x, p=p: q.run(p, x)) for p in paths}


def measure(kind: str, rows_list, args, ops) -> dict[str, dict[int, float]]:
    """path -> rows -> the step's us (layers x --layers + head); inf where given up."""
    shapes = [(s, args.layers) for s in LAYER_SHAPES] + ([(HEAD_SHAPE, 1)] if kind != "int4" else [])
    totals: dict[str, dict[int, float]] = {}
    for (n, k), weight_count in shapes:
        paths = candidates(kind, n, k, ops)
        alive = set(paths)
        for rows in rows_list:
            x = torch.randn(rows, k).bfloat16()
            times = {p: best_us(lambda: paths[p](x), args.iters, args.repeats) for p in sorted(alive)}
            fastest = min(times.values())
            for p in paths:
                step = totals.setdefault(p, {}).setdefault(rows, 0.0)
                totals[p][rows] = step + weight_count * times.get(p, math.inf)
            alive = {p for p in alive if p not in PER_ROW_PATHS or times[p] <= GIVE_UP_RATIO * fastest}
    return totals


def rule_from(totals: dict[str, dict[int, float]], rows_list) -> list[list]:
    """Ranges of rows and the fastest path in each; the fused kernel only as the first range."""
    winners, fused_open = [], True
    for rows in rows_list:
        ranked = sorted(totals, key=lambda p: totals[p][rows])
        best = ranked[0]
        if best == "fused" and not fused_open:
            best = ranked[1]
        fused_open = fused_open and best == "fused"
        winners.append((rows, best))
    rule: list[list] = []
    for rows, path in winners:
        if rule and rule[-1][1] == path:
            rule[-1][0] = rows
        else:
            rule.append([rows, path])
    rule[-1][0] = None  # the last winner takes every larger batch
    return rule


def table_json(table: dict) -> str:
    """The table file's text: one line per rule, so a diff shows which rule changed."""
    lines = ["{", f'  "about": {json.dumps(table["about"])},', '  "cpus": {']
    cpus = list(table["cpus"].items())
    for i, (key, entry) in enumerate(cpus):
        fields = [f"      {json.dumps(name)}: {json.dumps(value)}" for name, value in entry.items()]
        lines += [f"    {json.dumps(key)}: {{", ",\n".join(fields), "    }" + ("," if i < len(cpus) - 1 else "")]
    return "\n".join(lines + ["  }", "}"]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts, comma-separated")
    parser.add_argument("--kinds", default="bf16,int8,int4", help="weight kinds to tune, comma-separated")
    parser.add_argument("--iters", type=int, default=5, help="calls per timed batch, at least")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per measurement (best one counts)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--layers", type=int, default=30, help="layers per head in a step's time (smollm2: 30)")
    parser.add_argument("--write", action="store_true", help="store the rule for this CPU in the kernel table")
    args = parser.parse_args()
    rows_list = sorted({int(r) for r in args.rows.split(",")})
    kinds = args.kinds.split(",")
    if unknown := [k for k in kinds if k not in PATHS]:
        parser.error(f"--kinds: unknown {', '.join(unknown)} (known: {', '.join(PATHS)})")
    if rows_list[0] < 1:
        parser.error("--rows: row counts start at 1")
    ops = cpu_kernels.load()
    if ops is None:
        raise SystemExit(f"the fused CPU kernels do not load here ({cpu_kernels.unavailable_reason()}): "
                         "every linear runs eager, there is nothing to tune")
    torch.set_num_threads(args.threads)
    print(cpu_line())
    print(f"torch {torch.__version__}, {args.threads} threads; table in use now: {tune_table.kernel_table().describe()}")
    rules = {}
    for kind in kinds:
        totals = measure(kind, rows_list, args, ops)
        paths = sorted(totals)
        print(f"\n{kind}: a step's linears, us (layers x {args.layers}{' + head' if kind != 'int4' else ''})")
        print("| rows | " + " | ".join(paths) + " | fastest |\n|---|" + "---|" * (len(paths) + 1))
        for rows in rows_list:
            cells = [f"{totals[p][rows]:.0f}" if totals[p][rows] < math.inf else "-" for p in paths]
            print(f"| {rows} | " + " | ".join(cells) + f" | {min(paths, key=lambda p: totals[p][rows])} |")
        rules[kind] = rule_from(totals, rows_list)
        print(f"rule: {rules[kind]}")
    if args.write:
        path = tune_table.TABLE_PATH
        table = json.loads(path.read_text())
        key = tune_table.cpu_info().key
        entry = table["cpus"].get(key, {})
        entry.update(rules)
        missing = [kind for kind in PATHS if kind not in entry]
        if missing:
            raise SystemExit(f"--write: no rule yet for {', '.join(missing)} on this CPU; tune every kind once")
        for kind in PATHS:
            tune_table.validate(kind, entry[kind])
        entry["measured"] = (f"benchmarks/tune_kernels.py, threads {args.threads}, rows {args.rows}, "
                             f"torch {torch.__version__}, {datetime.date.today()}")
        table["cpus"][key] = entry
        path.write_text(table_json(table))
        print(f"\nwrote the rule for {key!r} to {path}")


if __name__ == "__main__":
    main()
