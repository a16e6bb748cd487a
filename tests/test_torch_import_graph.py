"""The torch bridge's import graph: no cycles, no private names crossing modules.

Read with ``ast`` (nothing is imported), over ``torch_bridge/`` and ``selective_optimizers/``.
Imports inside functions count: a lazy import still ties two modules together.

* An edge ``a -> b`` is any import of project module ``b`` in ``a`` (``from pkg import sub``
  is an edge to ``pkg.sub`` when ``sub`` is a module). The graph must have no cycle.
* A private name is one that starts with one underscore (``__dunder__`` names are not). A
  module may use its own private names and, inside its own package, private modules
  (``torch_bridge._errors``); it may not import another module's private name, import a
  private module of another package (``optax_selective._tree``), or read a private
  attribute of anything but ``self``/``cls``: ``other._x``, ``Class._x``, ``self._x._y``,
  ``getattr(obj, "_x")``. Private attributes of third-party modules (``torch.nn...``) are
  torch's business, not this check's.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch_bridge", "selective_optimizers")
PROJECT = (*PACKAGES, "optax_selective")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p))
            for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _package(name: str) -> str:
    """The package module ``name`` is in (a package is in itself)."""
    path = ROOT.joinpath(*name.split("."))
    return name if (path / "__init__.py").is_file() else name.rpartition(".")[0]


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(tree: ast.Module, package: str = "") -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) for every import of a project module, lazy ones included;
    ``package`` resolves relative imports (the package the module is in)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([source] if source else []))
            for a in node.names:
                sub = f"{source}.{a.name}"
                out.append((sub, None, node.lineno) if _is_module(sub)
                           else (source, a.name, node.lineno))
    return [(m, n, line) for m, n, line in out if m.split(".")[0] in PROJECT]


def _third_party_roots(tree: ast.Module) -> set[str]:
    """Names bound to imports of modules outside the project (``torch``, ``jax``, ...)."""
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) or isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for a in node.names:
                source = module or a.name
                if source.split(".")[0] not in PROJECT:
                    roots.add((a.asname or a.name).split(".")[0])
    return roots


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_the_torch_bridge_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: {m for m, _, _ in _imports(tree, _package(name)) if m in modules and m != name}
             for name, tree in modules.items()}
    assert not _cycles(graph), _cycles(graph)


def _private_uses(name: str, tree: ast.Module) -> list[str]:
    """Where module ``name`` uses a private name of another module or object."""
    found = []
    package = name.split(".")[0]
    where = f"{name.replace('.', '/')}.py"
    for module, imported, line in _imports(tree, _package(name)):
        parts = module.split(".")
        if module != name and imported is not None and _private(imported):
            found.append(f"{where}:{line}: imports {module}.{imported}")
        if parts[0] != package and any(_private(p) for p in parts):
            found.append(f"{where}:{line}: imports the private module {module}")
    third_party = _third_party_roots(tree)
    for node in ast.walk(tree):
        attr, obj = None, None
        if isinstance(node, ast.Attribute) and _private(node.attr):
            attr, obj = node.attr, node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
            attr, obj = node.args[1].value, node.args[0]
        if attr is None or isinstance(obj, ast.Name) and obj.id in ("self", "cls"):
            continue
        root = _root(obj)
        if isinstance(root, ast.Name) and root.id in third_party:
            continue
        found.append(f"{where}:{node.lineno}: reads {ast.unparse(obj)}.{attr}")
    return found


def test_no_private_names_cross_torch_bridge_modules():
    found = [f for name, tree in _modules().items() for f in _private_uses(name, tree)]
    assert not found, "\n".join(found)


def test_the_check_sees_what_it_forbids():
    """The two checks above on small sources: each kind of violation is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse(
        "import torch\n"
        "from torch_bridge.safety import restore_scope\n"
        "def f(opt):\n"
        "    from torch_bridge.summary import make_summary\n"
        "    return opt._budget, getattr(opt, '_count'), torch.nn.modules.batchnorm._BatchNorm\n"
    )
    assert [(m, n) for m, n, _ in _imports(tree)] == [
        ("torch_bridge.safety", "restore_scope"), ("torch_bridge.summary", "make_summary")]
    assert _third_party_roots(tree) == {"torch"}
    relative = ast.parse("from . import names\nfrom .summary import make_summary\n")
    assert _third_party_roots(relative) == set()
    assert [(m, n) for m, n, _ in _imports(relative, "torch_bridge")] == [
        ("torch_bridge.names", None), ("torch_bridge.summary", "make_summary")]
    assert _private_uses("torch_bridge.x", tree) == [
        "torch_bridge/x.py:5: reads opt._budget", "torch_bridge/x.py:5: reads opt._count"]
    tree = ast.parse(
        "from optax_selective._tree import LeafLayout\n"
        "from torch_bridge.summary import _dtype_name\n"
        "from torch_bridge._errors import SummaryMismatchError\n"
        "def g(self):\n"
        "    return self._compact._key_of, self._ok, Runner._like\n"
    )
    assert _private_uses("torch_bridge.x", tree) == [
        "torch_bridge/x.py:1: imports the private module optax_selective._tree",
        "torch_bridge/x.py:2: imports torch_bridge.summary._dtype_name",
        "torch_bridge/x.py:5: reads self._compact._key_of",
        "torch_bridge/x.py:5: reads Runner._like",
    ]
    assert _private("_x") and not _private("__init__") and not _private("x")
