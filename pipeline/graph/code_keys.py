"""The code a stage depends on, computed instead of listed by hand: the project's source files that
the module of the stage's action imports, transitively (imports inside functions included), plus
the sibling scripts a module names (e.g. pipeline/toolchain/process.py runs worker.py).

A hand-kept list goes stale the day someone adds an import; this cannot. The files are doit
file_deps, so editing any of them reruns exactly the stages that load it.
"""
import ast
from functools import cache
from pathlib import Path

from .. import PROJECT_ROOT

PACKAGES = ("pipeline", "runtime")  # the project's own code; anything else is a pinned dependency


def module_path(name: str) -> Path | None:
    """pipeline.toolchain.tools -> pipeline/toolchain/tools.py (or the package's __init__.py)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module an import statement may load, absolute names ("from . import x" may be a module)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@cache
def direct_dependencies(path: Path) -> frozenset[Path]:
    """The project files `path` imports (and their parent packages), and sibling scripts it names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for imported in _imported_names(tree, package):
        sibling = path.parent / f"{imported}.py"  # a script's own folder is on its sys.path
        if "." not in imported and sibling.is_file():
            found.add(sibling)
        parts = imported.split(".")
        for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            if (file := module_path(".".join(parts[:k]))) is not None:
                found.add(file)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py") \
                and "/" not in node.value and (path.parent / node.value).is_file():
            found.add(path.parent / node.value)
    found.discard(path)
    return frozenset(found)


def source_files(*modules: str) -> list[Path]:
    """The modules' own files and everything they load, transitively; paths relative to the project."""
    todo = [module_path(m) for m in modules]
    if None in todo:
        raise ValueError(f"not a project module: {modules[todo.index(None)]}")
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(direct_dependencies(path))
    return sorted(p.relative_to(PROJECT_ROOT) for p in seen)
