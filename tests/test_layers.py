"""Imports point down (tools/import_graph.py holds the layer order and says why): no unit imports
a higher layer, no two units import each other, however indirectly, and no package's modules form
a cycle. No exceptions."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def test_every_unit_has_a_layer_and_none_imports_upward():
    graph_tool = import_graph()
    graph = graph_tool.build(ROOT / "punctual")
    assert not [u for u in graph.units if graph_tool.layer_index(u) is None], "a unit with no layer in LAYERS"
    upward = {(source, target): where for source, target, where in graph_tool.upward_imports(graph)}
    assert not upward, f"imports that point up a layer: {upward}"


def test_no_import_cycles():
    graph_tool = import_graph()
    graph = graph_tool.build(ROOT / "punctual")
    assert graph_tool.cycles(graph) == []
    found = {(package.name, tuple(component)) for package in (ROOT / "punctual").iterdir()
             if (package / "__init__.py").exists()
             for component in graph_tool.module_cycles(ROOT / "punctual", package.name)}
    assert not found, f"modules of one package that import each other: {found}"


def test_the_tool_sees_an_upward_import_and_a_cycle(tmp_path):
    """The checks above can fail: a lower layer importing a higher one shows as both."""
    package = tmp_path / "punctual"
    for name, source in {"__init__.py": "", "config.py": "from punctual.engine import core\n",
                         "engine/__init__.py": "", "engine/core.py": "import punctual.config\n"}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(source)
    graph_tool = import_graph()
    graph = graph_tool.build(package)
    assert [(s, t) for s, t, _ in graph_tool.upward_imports(graph)] == [("config", "engine")]
    assert graph_tool.cycles(graph) == [["config", "engine"]]
