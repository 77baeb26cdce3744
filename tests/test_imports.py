"""The project's own imports form no loop: every import, a function's too (the lazy ones tie
modules as much as the top-level ones), read from the source of pipeline/, runtime/, benchmarks/
and dodo.py."""
import ast
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.fast
PACKAGES = ("pipeline", "runtime", "benchmarks")


def project_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the project's packages and dodo.py."""
    modules = {"dodo": ROOT / "dodo.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(name: str, path: Path, modules: dict) -> set[str]:
    """The project's modules that `name` (at `path`) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from package import module` imports that module; `from module import name`, the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, loops, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


def test_the_projects_imports_form_no_loop():
    modules = project_modules()
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    assert graph["pipeline.graph.tasks"] and graph["dodo"], "the walk found the imports"
    loops = import_loops(graph)
    assert not loops, "import loops:\n" + "\n".join(
        " <-> ".join(loop) + ": " + "; ".join(f"{a} imports {sorted(graph[a] & set(loop))}" for a in loop)
        for loop in loops)


def test_the_loop_finder_finds_a_loop_through_a_functions_import(tmp_path):
    """The check above can fail: two modules that import each other, one inside a function."""
    (tmp_path / "a.py").write_text("from b import x\n")
    (tmp_path / "b.py").write_text("def x():\n    from a import y\n")
    modules = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    assert graph == {"a": {"b"}, "b": {"a"}} and import_loops(graph) == [["a", "b"]]
