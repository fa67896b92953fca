"""No import circle between the workbench's modules, counting imports inside functions (only
`if TYPE_CHECKING:` blocks are exempt): docs/architecture.md says so, this keeps it true."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for f in (ROOT / "workbench").rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(tree: ast.AST, mods: dict[str, Path]) -> set[str]:
    """Modules `tree` imports (`from pkg import sub` names the submodule), outside `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_import_circle_between_modules() -> None:
    mods = _modules()
    graph = {m: {d for d in _imports(ast.parse(f.read_text()), mods) if d in mods and d != m} for m, f in mods.items()}
    circles = []
    for start in graph:  # a circle through `start`: a path from one of its imports back to it
        seen, stack = set(), [(d, [start, d]) for d in graph[start]]
        while stack:
            node, path = stack.pop()
            if node == start:
                circles.append(" -> ".join(path))
                break
            if node in seen:
                continue
            seen.add(node)
            stack.extend((d, [*path, d]) for d in graph[node])
    assert not circles, "import circles:\n" + "\n".join(sorted(circles))
