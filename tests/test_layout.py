"""The package's shape, checked: no import cycle (function-level imports count; TYPE_CHECKING ones do not),
and the layering docs/architecture.md states (run/ never imports tools/; stages/ import neither)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "m3t_gen"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_layers():
    for name, deps in _graph().items():
        if name.startswith("m3t_gen.run."):
            assert not {d for d in deps if d.startswith("m3t_gen.tools")}, name
        if name.startswith("m3t_gen.stages."):
            assert not {d for d in deps if d.startswith(("m3t_gen.tools", "m3t_gen.run"))}, name


def test_at_most_ten_modules_at_the_package_top():
    """Modules are grouped by what they serve (text/, scoring/, stages/, run/, ...): the top stays short."""
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(flat) <= 10, flat


def test_the_change_table_names_files_that_exist():
    """docs/architecture.md's "Where a change goes" names real files (a rename that forgets it fails here)."""
    import re

    root = PACKAGE.parent
    doc = (root / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## Where a change goes"):]
    paths = set(re.findall(r"`((?:m3t_gen|schemas|docs)/[\w/.]+\.(?:py|json|md))`", section))
    assert len(paths) >= 10
    missing = sorted(p for p in paths if not (root / p).is_file())
    assert not missing, missing
