"""Print the import graph of punctual's packages and top-level modules: each unit's layer, the
imports that point up a layer, and the cycles.

    python tools/import_graph.py [PACKAGE_DIR]      (default: ./punctual)

A unit is a subpackage (punctual/sched/) or a top-level module (punctual/config.py). Every import
counts, also one inside a function (a lazy import is still a dependency: the code breaks without
it). Imports point down: a unit may import units of lower layers, and units of its own layer as
long as no cycle forms. LAYERS below is the intended order, top first.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Top first. Why this order:
# - cli: the `punctual` command wires every subcommand's parser; nothing imports it.
# - server, sim, bench: front ends and tools. The server drives the engine (or a cluster) over
#   HTTP; the simulator runs the shipped scheduler and router in virtual time and starts real
#   servers to validate against (as subprocesses, never by import); bench is the load generator
#   both use. They sit beside each other: sim imports bench, bench imports neither.
#   cluster/serve.py is the Ray Serve entry point: it builds the server's app, so it is a front
#   end like the server (nothing in cluster imports it).
# - cluster, llm: the two users of one engine core each (many replicas behind a router; the
#   offline LLM(...) API). `punctual` (the package's __init__, which re-exports LLM) sits with llm.
# - engine: the core's step loop, its process and the client that talks to it.
# - spec_decode, runner, structured: what the engine steps: proposers (a draft model has a runner
#   of its own), the model runner (plan -> tensors -> tokens; sampler, KV copies), grammars.
# - lora: LoRA adapters' weights (read against the model's shapes) and the loaded-adapter cache;
#   lora/request.py, what a request names (vLLM's LoRARequest), is plain data.
# - checkpoints: HF directories, GGUF conversion, built-ins -> weight tensors (it checks a GGUF
#   file's rope factors with models' RoPE, hence above models).
# - models: the network (one decoder stack, an architecture per file, attention over the paged cache).
# - kernels: the fused CPU kernels and quantized weights, chosen by CPU features.
# - sched, kv: pure Python mechanism (no torch), which the simulator imports unchanged.
# - plain data: configs, requests, plans, outputs, the tokenizer loader, limits; and
#   structured/spec.py, the structured-output request field (a dataclass SamplingParams holds);
#   wire/, the data-only codec, framing and handshake every process boundary uses (pure Python
#   and msgpack: STYLE's "a tool a lower layer needs lives at or below that layer").
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("server", "cluster.serve", "sim", "bench"),
    ("cluster", "llm", "punctual"),
    ("engine",),
    ("spec_decode",),
    ("runner", "structured"),
    ("lora",),
    ("checkpoints",),
    ("models",),
    ("kernels",),
    ("sched", "kv"),
    ("config", "engine_args", "request", "sampling_params", "plan", "outputs", "validation", "tokenizer",
     "structured.spec", "lora.request", "chat_template", "wire"),
]
# Modules placed apart from their package (the longest dotted prefix wins).
SPLIT_UNITS = ("structured.spec", "cluster.serve", "lora.request")


@dataclass
class Graph:
    units: set[str] = field(default_factory=set)
    # (importer unit, imported unit) -> the importing modules and their line numbers
    edges: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def unit_of(module: str) -> str | None:
    """'punctual.sim.trace' -> 'sim'; 'punctual.config' -> 'config'; 'punctual' -> 'punctual'."""
    if module == "punctual":
        return "punctual"
    if not module.startswith("punctual."):
        return None
    rest = module[len("punctual."):]
    for split in SPLIT_UNITS:
        if rest == split or rest.startswith(split + "."):
            return split
    return rest.split(".")[0]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]):
    """(imported module, line) for every import in the file, relative ones resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                # `from punctual import outputs` imports a module; `from punctual import LLM` a name.
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in known else base), node.lineno


def build(root: Path) -> Graph:
    files = sorted(p for p in root.rglob("*.py") if "csrc" not in p.parts)
    known = {module_name(root, p) for p in files}
    graph = Graph()
    for path in files:
        module = module_name(root, path)
        source_unit = unit_of(module)
        graph.units.add(source_unit)
        tree = ast.parse(path.read_text(), str(path))
        for target, line in imported_modules(tree, module, path.name == "__init__.py", known):
            target_unit = unit_of(target)
            if target_unit is None or target_unit == source_unit:
                continue
            graph.units.add(target_unit)
            where = graph.edges.setdefault((source_unit, target_unit), [])
            if f"{module}:{line} -> {target}" not in where:
                where.append(f"{module}:{line} -> {target}")
    return graph


def layer_index(unit: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    return None


def upward_imports(graph: Graph) -> list[tuple[str, str, list[str]]]:
    """Edges from a unit to one in a higher layer (a smaller index), or to/from an unplaced unit."""
    up = []
    for (source, target), where in sorted(graph.edges.items()):
        s, t = layer_index(source), layer_index(target)
        if s is None or t is None or t < s:
            up.append((source, target, where))
    return up


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan), each sorted."""
    adjacency: dict[str, list[str]] = {u: [] for u in graph.units}
    for source, target in graph.edges:
        adjacency[source].append(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(unit: str) -> None:
        index[unit] = low[unit] = len(index)
        stack.append(unit)
        on_stack.add(unit)
        for nxt in adjacency[unit]:
            if nxt not in index:
                visit(nxt)
                low[unit] = min(low[unit], low[nxt])
            elif nxt in on_stack:
                low[unit] = min(low[unit], index[nxt])
        if low[unit] == index[unit]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == unit:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for unit in sorted(graph.units):
        if unit not in index:
            visit(unit)
    return sorted(found)


def module_cycles(root: Path, package: str) -> list[list[str]]:
    """Cycles between the modules of one package (e.g. 'model': gguf <-> loader)."""
    files = sorted((root / package).rglob("*.py"))
    known = {module_name(root, p) for p in files}
    graph = Graph()
    for path in files:
        module = module_name(root, path)
        graph.units.add(module)
        tree = ast.parse(path.read_text(), str(path))
        for target, line in imported_modules(tree, module, path.name == "__init__.py", known):
            if target in known and target != module:
                graph.units.add(target)
                graph.edges.setdefault((module, target), []).append(f"{module}:{line}")
    return cycles(graph)


def report(root: Path) -> str:
    graph = build(root)
    lines = ["layers (top first; a unit may import only its own layer or lower):"]
    for i, layer in enumerate(LAYERS):
        present = [u for u in layer if u in graph.units]
        lines.append(f"  {len(LAYERS) - i}: {', '.join(present)}")
    unplaced = sorted(u for u in graph.units if layer_index(u) is None)
    if unplaced:
        lines.append(f"  unplaced: {', '.join(unplaced)}")
    lines.append("imports:")
    for unit in sorted(graph.units, key=lambda u: (layer_index(u) if layer_index(u) is not None else -1, u)):
        targets = sorted({t for (s, t) in graph.edges if s == unit})
        lines.append(f"  {unit} -> {', '.join(targets) or '-'}")
    up = upward_imports(graph)
    lines.append(f"upward imports: {len(up)}")
    for source, target, where in up:
        lines.append(f"  {source} -> {target}: {'; '.join(where)}")
    found = cycles(graph)
    lines.append(f"cycles between units: {len(found)}")
    for component in found:
        lines.append(f"  {' <-> '.join(component)}")
    inner = [(p.name, c) for p in sorted(root.iterdir()) if p.is_dir() and (p / "__init__.py").exists()
             for c in module_cycles(root, p.name)]
    lines.append(f"cycles between modules of one package: {len(inner)}")
    for package, component in inner:
        lines.append(f"  {package}: {' <-> '.join(component)}")
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "punctual").resolve()
    print(report(root))
