"""glip_fusion's modules import each other without a circle.

The graph is built from the source with ``ast``: every ``import`` / ``from ... import`` anywhere in a module (also
inside functions, where lazy imports hide circles until a call runs them) and every
``importlib.import_module("glip_fusion...")`` with a literal name. Importing ``a.b.c`` also runs the ``__init__`` of
every package on the way that is not already an ancestor of the importer, so those packages are edges too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "glip_fusion"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def _module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__.py``)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve(importer: str, is_package: bool, level: int, target: str | None) -> str:
    """Absolute name of ``from <level dots><target>`` written in module ``importer``."""
    if level == 0:
        return target or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]  # a package's own __init__ is level 1's anchor
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imported(importer: str, is_package: bool, tree: ast.AST, modules: set[str]) -> set[str]:
    """The package modules ``importer`` names in any import statement or literal ``import_module`` call."""
    found: set[str] = set()

    def add(name: str) -> None:
        # the longest known module prefix: "pkg.mod.attr" names pkg.mod
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in modules:
                found.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, is_package, node.level, node.module)
            for alias in node.names:  # "from pkg import sub" imports the submodule pkg.sub
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "import_module":
                add(node.args[0].value)
    return found


def import_graph(root: Path = SOURCE) -> dict[str, set[str]]:
    """Module -> the package modules importing it runs (the named module and the packages on its way)."""
    files = _module_names(root)
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        targets = _imported(name, is_package, ast.parse(path.read_text(), str(path)), modules)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):
                step = ".".join(parts[:end])
                # packages that are ancestors of the importer are already (being) imported: no edge
                if step in modules and not (name == step or name.startswith(step + ".")):
                    edges.add(step)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_glip_fusion_has_no_import_cycle():
    graph = import_graph()
    assert "glip_fusion.triton.function" in graph and "glip_fusion.attention" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_shared_validation_is_a_leaf_that_attention_and_the_kernel_import():
    """The checks every backend shares live in one module that imports nothing else of glip_fusion, so the Triton
    package validates like the other backends without importing glip_fusion.attention."""
    graph = import_graph()
    assert graph["glip_fusion._validation"] == set()
    for importer in ("glip_fusion.attention", "glip_fusion.triton", "glip_fusion.triton.function"):
        assert "glip_fusion._validation" in graph[importer], importer
    assert not any("glip_fusion.attention" in graph[m] for m in graph if m.startswith("glip_fusion.triton"))


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / PACKAGE


@pytest.mark.parametrize("files,cycle", [
    # a lazy import inside a function closes the circle
    ({"__init__.py": "", "a.py": "from .b import x\n", "b.py": "def f():\n    from .a import y\n"},
     ["glip_fusion.a", "glip_fusion.b", "glip_fusion.a"]),
    # importlib with a literal name, and a subpackage importing its parent's module
    ({"__init__.py": "", "a.py": "import importlib\nm = importlib.import_module('glip_fusion.sub')\n",
      "sub/__init__.py": "def g():\n    from ..a import z\n"},
     ["glip_fusion.a", "glip_fusion.sub", "glip_fusion.a"]),
    # importing a submodule runs its package's __init__, which imports the importer
    ({"__init__.py": "", "c.py": "from .sub.leaf import v\n", "sub/__init__.py": "from .mid import w\n",
      "sub/leaf.py": "", "sub/mid.py": "from ..c import u\n"},
     ["glip_fusion.c", "glip_fusion.sub", "glip_fusion.sub.mid", "glip_fusion.c"]),
    # "from . import sub" names the submodule; no circle through an ancestor package
    ({"__init__.py": "from .sub import leaf\n", "sub/__init__.py": "from . import leaf\n",
      "sub/leaf.py": "from .. import other\n", "other.py": ""}, None),
])
def test_cycle_finder_sees_lazy_dynamic_and_package_imports(tmp_path, files, cycle):
    assert find_cycle(import_graph(_write(tmp_path, files))) == cycle
