"""The package layout keeps its promises: no import cycle (at any level, lazy imports included), the run does
not depend on the tools over its output, stages depend on neither."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "m3t_gen"


def _imports() -> dict[str, set[str]]:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = {n.module for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("m3t_gen.")}
    return out


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep in graph and not state.get(dep):
                visit(dep, path + [dep])
        state[node] = 2

    for module in graph:
        if not state.get(module):
            visit(module, [module])


def test_layers():
    for module, deps in _imports().items():
        if module.startswith(("m3t_gen.run", "m3t_gen.stages", "m3t_gen.storage", "m3t_gen.backends")):
            assert not [d for d in deps if d.startswith("m3t_gen.tools")], module
        if module.startswith(("m3t_gen.stages", "m3t_gen.storage", "m3t_gen.backends")):
            assert not [d for d in deps if d.startswith("m3t_gen.run")], module
