"""The import graph of the shipped packages: no cycles, no private names crossing modules.

Every module of ``optax_selective``, ``torch_bridge`` and ``selective_optimizers`` is parsed
with ``ast`` (nothing is imported). Imports inside functions count, since a lazy import that
closes a cycle still ties the two modules together. A name starting with ``_`` belongs to the
module that defines it: another module may neither import it (``from x import _name``) nor
read it (``x._name``, ``SomeClass._name`` for a class imported from another module). Allowed:
dunders, NamedTuple's ``_replace`` / ``_fields`` / ``_asdict`` / ``_make``, and importing a
private *module* (``optax_selective._tree``) from inside its own top-level package, as long as
the names used from it are public.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("optax_selective", "torch_bridge", "selective_optimizers")
NAMEDTUPLE_API = {"_replace", "_fields", "_asdict", "_make", "_field_defaults"}

def _modules() -> dict[str, str]:
    """Module name -> file path for every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
            for f in sorted(filenames):
                if f.endswith(".py"):
                    name = rel if f == "__init__.py" else f"{rel}.{f[:-3]}"
                    out[name] = os.path.join(dirpath, f)
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Scan(ast.NodeVisitor):
    """Imports and private-name uses of one module."""

    def __init__(self, name: str, is_package: bool, modules: set[str]):
        self.name, self.modules = name, modules
        self.package = name if is_package else name.rpartition(".")[0]
        self.edges: set[str] = set()
        self.uses: set[str] = set()  # "owner._name" read from another module
        self.bound: dict[str, str] = {}  # local name -> dotted module / object it refers to

    def _resolve(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.package.split(".")
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def _check_package(self, module: str) -> None:
        """A private module (``pkg._tree``) is for its own top-level package only."""
        if module.split(".")[0] != self.name.split(".")[0] and any(map(_private, module.split("."))):
            self.uses.add(f"private module {module}")

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.split(".")[0] not in PACKAGES:
                continue
            self.edges.add(alias.name)
            self._check_package(alias.name)
            if alias.asname:
                self.bound[alias.asname] = alias.name
            else:
                self.bound[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node):
        src = self._resolve(node)
        if src.split(".")[0] not in PACKAGES:
            return
        for alias in node.names:
            full = f"{src}.{alias.name}"
            if full in self.modules:  # a submodule
                self.edges.add(full)
                self._check_package(full)
            else:
                self.edges.add(src)
                self._check_package(src)
                if _private(alias.name):
                    self.uses.add(full)
            self.bound[alias.asname or alias.name] = full

    def visit_Attribute(self, node):
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in self.bound:
            parts = [self.bound[base.id]] + chain[::-1]
            for i in range(1, len(parts)):
                if _private(parts[i]) and parts[i] not in NAMEDTUPLE_API:
                    owner = ".".join(parts[:i])
                    if owner != self.name and not owner.startswith(self.name + "."):
                        self.uses.add(".".join(parts[: i + 1]))
                    break
            return  # the chain is handled whole
        self.generic_visit(node)


def _scan_all():
    modules = _modules()
    names = set(modules)
    scans = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        scan = _Scan(name, path.endswith("__init__.py"), names)
        scan.visit(tree)
        scan.edges = {e for e in scan.edges if e in names and e != name}
        scans[name] = scan
    return scans


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _violations(scans) -> set[str]:
    found = {f"cycle: {', '.join(c)}" for c in _cycles({n: s.edges for n, s in scans.items()})}
    for name, scan in scans.items():
        for use in scan.uses:
            found.add(f"{name} uses {use}")
    return found


def test_scanner_finds_cycles_and_private_names():
    """The checks themselves: a cycle through a lazy import and each kind of private use."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [("a", "b", "c")]
    src = (
        "import optax_selective.selection as sel\n"
        "from optax_selective import summary\n"
        "from optax_selective.compact import CompactInner, _groups\n"
        "def f(s):\n"
        "    from optax_selective.methods import _base\n"
        "    return sel._x, summary._y(), CompactInner._z, s._replace(), _base.Method\n"
    )
    scan = _Scan("optax_selective.transform", False, set(_modules()))
    scan.visit(ast.parse(src))
    assert scan.uses == {
        "optax_selective.compact._groups",
        "optax_selective.selection._x",
        "optax_selective.summary._y",
        "optax_selective.compact.CompactInner._z",
    }
    assert "optax_selective.methods._base" in scan.edges
    outside = _Scan("torch_bridge.methods", False, set(_modules()))
    outside.visit(ast.parse("from optax_selective.methods import _base\n"))
    assert outside.uses == {"private module optax_selective.methods._base"}
    outside.visit(ast.parse("from optax_selective._tree import LeafLayout\n"))
    assert "private module optax_selective._tree" in outside.uses


def test_no_cycles_and_no_private_names_across_modules():
    found = sorted(_violations(_scan_all()))
    assert not found, "import cycles or private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_package_is_scanned(pkg):
    assert any(name == pkg for name in _modules())
