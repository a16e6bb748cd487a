"""Side by side with selective-optimizers 0.4 (installed at test time), and reading its summaries.

The reference is installed once per session into a temporary folder (the ``reference_0_4``
fixture, with the benchmarks' ``benchmarks.runs.install_reference``); its code is only
imported, never copied. Its package name is ours too, so it is imported with our
``selective_optimizers`` modules set aside and put back afterwards.
"""

import contextlib
import copy
import importlib
import os
import pickle
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from torch_bridge import (  # noqa: E402
    SummaryMismatchError,
    get_selective_optimizer,
    load_summary_from_disk,
    load_weights_from_summary,
    read_legacy_summary,
)


@pytest.fixture(scope="module")
def ref_dir(reference_0_4):
    return reference_0_4


def _ours():
    return {k: v for k, v in sys.modules.items()
            if k == "selective_optimizers" or k.startswith("selective_optimizers.")}


@contextlib.contextmanager
def reference(ref_dir):
    """Imports the 0.4 package as ``selective_optimizers``; restores ours on exit."""
    saved = _ours()
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(ref_dir))
    try:
        wrap = importlib.import_module("selective_optimizers.wrap")
        load_store = importlib.import_module("selective_optimizers.load_store")
        assert Path(wrap.__file__).is_relative_to(ref_dir), wrap.__file__
        yield wrap, load_store
    finally:
        sys.path.remove(str(ref_dir))
        for k in _ours():
            del sys.modules[k]
        sys.modules.update(saved)


def mlp(seed=0):
    torch.manual_seed(seed)  # default Linear init: no two equal magnitudes, so no ties
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def groups(model, choose_all):
    if choose_all:
        return [{"params": list(model[2].parameters()), "choose_all": True},
                {"params": list(model[0].parameters())}]
    return [{"params": list(model.parameters())}]


def ref_masks(opt):
    return [torch.zeros_like(p, dtype=torch.bool) if m is None else m.cpu()
            for g in opt.param_groups for p, m in zip(g["params"], g["chosen_masks"])]


@pytest.mark.parametrize("choose_all", [False, True])
@pytest.mark.parametrize("method,budget", [("pafi", 40), ("bitfit", 5)])  # bitfit: partly
def test_fixed_methods_select_the_same_entries(ref_dir, method, budget, choose_all):
    budget += 27 if choose_all else 0
    ours_model, ref_model = mlp(), mlp()
    ours = get_selective_optimizer(torch.optim.SGD, method)(groups(ours_model, choose_all), lr=0.1, budget=budget)
    with reference(ref_dir) as (wrap, _):
        ref = wrap.get_selective_optimizer(torch.optim.SGD, method)(
            groups(ref_model, choose_all), lr=0.1, budget=budget, verify=False)
    for a, b in zip(ours.get_masks(), ref_masks(ref)):
        assert torch.equal(a, b)
    assert ours.get_budget_used() == ref.get_budget_used() == budget


@pytest.mark.parametrize("choose_all", [False, True])
@pytest.mark.parametrize("exp,eps", [(1.0, 1e-3), (0.0, 1e-8), (-1.0, 1e-3), (2.0, 1e-3)])
def test_id3_matches_when_budget_divides_max_steps(ref_dir, choose_all, exp, eps):
    max_steps, b_eff = 4, 24
    budget = b_eff + (27 if choose_all else 0)
    ours_model, ref_model = mlp(), mlp()
    kw = dict(lr=0.05, budget=budget, max_steps=max_steps, exp=exp, eps=eps)
    ours = get_selective_optimizer(torch.optim.SGD, "id3")(groups(ours_model, choose_all), **kw)
    with reference(ref_dir) as (wrap, _):
        ref = wrap.get_selective_optimizer(torch.optim.SGD, "id3")(groups(ref_model, choose_all),
                                                                   verify=False, **kw)
    g = torch.Generator().manual_seed(1)
    for t in range(max_steps):  # 0.4 never freezes its mask, so compare the first T steps
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            opt.step()
        for a, b in zip(ours.get_masks(), ref_masks(ref)):
            assert torch.equal(a, b), f"step {t}"
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            assert torch.equal(a, b), f"step {t}"
    assert ours.get_budget_used() == ref.get_budget_used() == budget


def bn_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3))


def test_reads_a_0_4_summary(ref_dir, tmp_path):
    model = bn_model()
    path = tmp_path / "summary_04.pt"
    with reference(ref_dir) as (wrap, load_store):
        opt = wrap.get_selective_optimizer(torch.optim.Adam, "pafi")(model.parameters(), lr=0.05,
                                                                     budget=30, verify=False)
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
            opt.step()
        assert load_store.write_summary_to_disk(str(path), opt.get_summary(model))
    legacy = read_legacy_summary(path)
    assert legacy["budget_used"] == 30 and len(legacy["values"]) == 6
    fresh = bn_model()
    load_weights_from_summary(fresh, legacy)
    for (n, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    # load_summary_from_disk reads it too (through the same safe reader), with 0.4's attributes
    again = load_summary_from_disk(path)
    assert again.budget_used == 30 and len(again.values) == len(again.pointers) == 6
    assert again.shapes[0] == model[0].weight.shape and len(again.bn_metadata) == 1
    fresh = bn_model()
    load_weights_from_summary(fresh, again)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values()))
    # a model it does not fit: raises, model untouched
    other = mlp()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(SummaryMismatchError, match="6 parameters, the model 4"):
        load_weights_from_summary(other, legacy)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), before.values()))


def test_legacy_reader_refuses_other_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save([torch.ones(2), Evil()], path)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        read_legacy_summary(path)
    assert not marker.exists()


def test_a_0_4_optimizer_state_is_named_with_how_to_continue(ref_dir):
    model = mlp()
    with reference(ref_dir) as (wrap, _):
        ref = wrap.get_selective_optimizer(torch.optim.Adam, "pafi")(model.parameters(), lr=0.05,
                                                                     budget=10, verify=False)
        model(torch.ones(2, 6)).sum().backward()
        ref.step()
        state = copy.deepcopy(ref.state_dict())
    ours = get_selective_optimizer(torch.optim.Adam, "pafi")(mlp().parameters(), lr=0.05,
                                                             budget=10)
    with pytest.raises(ValueError, match="selective-optimizers 0.4 optimizer state.*build a new "
                                         "selective optimizer"):
        ours.load_state_dict(state)
    assert ours.count == 0 and not ours.state


def _reference_names(ref_dir):
    """0.4's public module-level names (``module.name``) and the attribute and method names
    its optimizers set or define (``optimizer.name``), read from its source with ``ast``."""
    import ast

    names = set()
    for path in sorted(Path(ref_dir, "selective_optimizers").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                names.add(f"module.{node.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id == "self" and isinstance(node.ctx, ast.Store):
                names.add(f"optimizer.{node.attr}")
            if isinstance(node, ast.ClassDef) and node.name != "SelectivePeftSummary":
                names.update(f"optimizer.{f.name}" for f in node.body
                             if isinstance(f, ast.FunctionDef) and not f.name.startswith("_"))
    return names


def test_every_0_4_name_is_provided_or_listed_in_the_migration_guide(ref_dir):
    import selective_optimizers.load_store as load_store
    import selective_optimizers.wrap as wrap

    guide = (Path(__file__).resolve().parents[1] / "docs/guides/migration.md").read_text()
    model = mlp()
    opt = wrap.get_selective_optimizer(torch.optim.AdamW, "id3")(
        model.parameters(), lr=0.1, weight_decay=0.0, budget=20, max_steps=3, verify=True)
    names = _reference_names(ref_dir)
    assert {"optimizer.budget", "optimizer.global_step", "optimizer.max_steps",
            "module.SelectivePeftSummary", "module.get_id3"} <= names  # the reading works
    missing = []
    for name in sorted(names):
        kind, attr = name.split(".")
        there = hasattr(opt, attr) if kind == "optimizer" else any(
            hasattr(m, attr) for m in (wrap, load_store))
        if not there and f"`{attr}" not in guide and f".{attr}" not in guide:
            missing.append(name)
    assert not missing, missing
    # read-only, with 0.4's values
    assert (opt.budget, opt.max_steps, opt.global_step, opt.verify) == (20, 3, 0, True)
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    assert opt.global_step == 1
    with pytest.raises(AttributeError):
        opt.budget = 5
