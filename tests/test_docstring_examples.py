"""Every public function and class in the API reference has a runnable example in its docstring.

The public names are the ones ``docs/api/*.md`` renders: the ``__all__`` of the public modules
(as ``tests/test_docs_api.py`` lists them) and every object a ``::: path`` directive names,
directly or through its ``members:`` list. The examples themselves run as doctests
(``--doctest-modules`` in the pytest config); this test makes sure there is one to run.
"""

import doctest
import importlib
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_PAGES = ROOT / "docs" / "api"
PUBLIC_MODULES = ("optax_selective", "optax_selective.methods", "torch_bridge",
                  "selective_optimizers.wrap", "selective_optimizers.load_store")

_DIRECTIVE = re.compile(r"^:::\s*([\w.]+)\s*$")


def _resolve(path: str):
    """The object at a dotted ``path``: a module, or an attribute of the longest module prefix."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def _module_members(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:  # no __all__: the public names the module itself defines
        names = [n for n, v in vars(module).items()
                 if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__]
    return [n for n in names if not n.startswith("_")]


def _directives() -> list[tuple[str, list[str] | bool | None]]:
    """``(path, members)`` for every ``::: path`` in docs/api/*.md (members: a list, False, or
    None when the directive does not restrict them)."""
    found = []
    for page in sorted(API_PAGES.glob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            m = _DIRECTIVE.match(line)
            if not m:
                continue
            members: list[str] | bool | None = None
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                opt = lines[j].strip()
                if opt == "members: false":
                    members = False
                elif opt == "members:":
                    members = []
                elif isinstance(members, list) and opt.startswith("- "):
                    members.append(opt[2:].strip())
                j += 1
            found.append((m.group(1), members))
    return found


def documented_names() -> dict[str, object]:
    """Every public name the API reference renders, mapped to its object."""
    names: dict[str, object] = {}
    for mod in PUBLIC_MODULES:
        module = importlib.import_module(mod)
        for n in _module_members(module):
            names[f"{mod}.{n}"] = getattr(module, n)
    for path, members in _directives():
        obj = _resolve(path)
        if not inspect.ismodule(obj):
            names[path] = obj
        elif members is not False:
            for n in members if members is not None else _module_members(obj):
                names[f"{path}.{n}"] = getattr(obj, n)
    return names


def _has_example(obj) -> bool:
    doc = inspect.getdoc(obj) or ""
    return bool(doctest.DocTestParser().get_examples(doc))


def _needs_example(obj) -> bool:
    return inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)


def test_the_api_reference_lists_the_known_public_names():
    names = documented_names()
    # spot checks that the enumeration reads both __all__ and the pages' directives
    for name in ("optax_selective.selective_id3", "optax_selective.methods.ID3",
                 "torch_bridge.SelectiveOptimizer", "optax_selective.verify.verify",
                 "torch_bridge.distributed.ShardedMethodRunner", "optax_selective.testing.Report",
                 "selective_optimizers.wrap.get_selective_optimizer"):
        assert name in names, name
    assert len(names) > 50


def test_every_public_function_and_class_has_a_docstring_example():
    missing = sorted(name for name, obj in documented_names().items()
                     if _needs_example(obj) and not _has_example(obj))
    assert not missing, (
        f"{len(missing)} public names have no `>>>` example in their docstring: {missing}")
