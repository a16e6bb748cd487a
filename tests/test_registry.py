"""The method registry, the Method protocol, and the conformance helper on the built-ins."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_selective as osel
from optax_selective import methods
from optax_selective.testing import ConformanceError, check_method
from torch_bridge.methods import split_kwargs

BUILTIN_ARGS = {
    "id3": dict(budget=20, max_steps=3),
    "pafi": dict(budget=20),
    "bitfit": dict(budget=6),  # of the 8 bias entries
    "fish": dict(budget=20, fish_steps=2),
    "random": dict(budget=20, seed=5),
    "fft": dict(),
}


def test_builtins_are_registered_and_are_methods():
    assert set(BUILTIN_ARGS) <= set(methods.names())
    for name, kwargs in BUILTIN_ARGS.items():
        m = methods.get(name.upper())(**kwargs)  # names are case-insensitive
        assert isinstance(m, methods.Method) and isinstance(m, methods.ShardedMethod)
        assert m.name == name
        assert m.budget == kwargs.get("budget")  # fft: None, every entry


def test_unknown_names_and_arguments_say_what_exists():
    with pytest.raises(ValueError, match="Unsupported PEFT method: 'lora'.*'id3'.*register"):
        methods.get("lora")
    with pytest.raises(TypeError, match="takes no argument 'fish_steps'; it takes 'budget', 'max_steps'"):
        osel.selective("id3", budget=3, max_steps=2, fish_steps=2)
    with pytest.raises(ValueError, match="method 'id3' needs max_steps="):
        osel.selective("id3", budget=3)
    with pytest.raises(TypeError, match="with a method object"):
        osel.selective(methods.PaFI(budget=2), budget=3)
    with pytest.raises(TypeError, match="must be a registered name or a Method"):
        osel.selective(object())


def test_register_refuses_duplicates_and_unnamed_keyword_arguments():
    with pytest.raises(ValueError, match="'pafi' is already registered; pass replace=True"):
        methods.register("pafi", lambda *, budget: methods.PaFI(budget=budget))
    with pytest.raises(TypeError, match=r"takes \*\*kwargs"):
        methods.register("loose", lambda **kw: methods.PaFI(**kw))
    assert "loose" not in methods.names()


def test_selective_by_name_equals_the_named_factory():
    params = {"b": jnp.arange(3.0), "w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    grads = jax.tree.map(lambda p: jnp.cos(7 * p), params)
    for by_name, named in [
        (osel.selective("id3", budget=6, max_steps=2, inner=optax.adam(0.1)),
         osel.selective_id3(6, 2, inner=optax.adam(0.1))),
        (osel.selective("bitfit", budget=2), osel.selective_bitfit(2)),
    ]:
        s1, s2 = by_name.init(params), named.init(params)
        for _ in range(2):
            u1, s1 = by_name.update(grads, s1, params)
            u2, s2 = named.update(grads, s2, params)
            for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))):
                np.testing.assert_array_equal(a, b)
        assert type(s1) is type(s2) and type(s1).method_name in ("id3", "bitfit")
        assert osel.make_summary(params, s1).method == type(s1).method_name


def test_torch_keyword_arguments_are_split_by_the_factory_signature():
    kw = {"lr": 0.1, "budget": 5, "max_steps": 3, "eps": 1e-6, "betas": (0.9, 0.99)}
    assert split_kwargs("id3", dict(kw)) == {"budget": 5, "max_steps": 3, "eps": 1e-6}
    rest = dict(kw)
    assert split_kwargs("pafi", rest) == {"budget": 5}
    assert rest == {"lr": 0.1, "eps": 1e-6, "betas": (0.9, 0.99)}  # eps is the inner optimizer's


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILTIN_ARGS))
def test_conformance_of_every_builtin(name):
    report = check_method(name, **BUILTIN_ARGS[name])
    assert report.torch_checked and report.traces == 1
    assert report.budget_used == (BUILTIN_ARGS[name].get("budget") or 116)


# -- broken methods: the check must catch each ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Broken:
    """PaFI-like at init; ``update`` misbehaves as ``how`` says."""

    budget: int
    how: str
    name: str = "broken"
    needs_params: bool = False
    frozen_after = None
    k_max = 2

    def init(self, params, layout):
        return [jnp.zeros(s, bool) for s in layout.shapes], jnp.int32(0)

    def update(self, mask, state, count, grads, params, selectable, *, report_added=False):
        flat0 = mask[0].reshape(-1)
        add = 1 if self.how != "too_many" else 3
        if self.how == "shrinks":
            new0 = jnp.zeros_like(flat0).at[count].set(True)
        elif self.how == "over_budget":
            new0 = flat0.at[count].set(True)  # one per step, forever
        else:
            new0 = flat0.at[jnp.arange(add) + count * add].set(True)
        mask = [new0.reshape(mask[0].shape), *mask[1:]]
        if not report_added:
            return mask, state
        if self.how == "misreports":  # says it added entry 0 of leaf 1
            z = jnp.zeros((self.k_max,), jnp.int32)
            return mask, state, (z + 1, z, jnp.arange(self.k_max) == 0)
        return mask, state, None


@pytest.mark.parametrize(
    "how, budget, match",
    [
        ("over_budget", 2, "over the budget of 2|removed entries from the mask"),
        ("shrinks", 10, "removed entries from the mask"),
        ("too_many", 30, "added 3 entries, over k_max=2"),
        ("misreports", 30, "report_added|compact and dense wrapper forms select different"),
    ],
)
def test_the_check_catches_a_broken_method(how, budget, match):
    with pytest.raises(ConformanceError, match=match):
        check_method(Broken, budget=budget, how=how, steps=3, check_torch=False)


@dataclasses.dataclass(frozen=True)
class Retraces(Broken):
    """Keeps a Python int in its state, so every step has a new static value: retraces."""

    how: str = "ok"

    def init(self, params, layout):
        return [jnp.zeros(s, bool) for s in layout.shapes], ()

    def update(self, mask, state, count, grads, params, selectable, *, report_added=False):
        out = jax.lax.cond(count < 1, lambda m: m, lambda m: m, list(mask))
        state = (*state, 0)  # grows by one leaf every step: a new tree structure
        return (out, state, None) if report_added else (out, state)


def test_the_check_catches_recompiles():
    with pytest.raises(ConformanceError, match="traced 3 times"):
        check_method(Retraces, budget=4, steps=3, check_torch=False)


def test_state_names_its_method_and_pickles():
    import pickle

    params = {"w": jnp.arange(4.0)}
    for name, kwargs in [("random", dict(budget=2)), ("fft", {})]:
        state = osel.selective(name, **kwargs).init(params)
        assert isinstance(state, osel.SelectiveState) and type(state).method_name == name
        again = pickle.loads(pickle.dumps(state))
        assert type(again) is type(state)
        assert osel.make_summary(params, again).method == name


def test_no_method_name_comparisons_outside_the_registry():
    """Callers use the Method interface; only the registry maps names to methods."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in [*root.glob("optax_selective/**/*.py"), *root.glob("torch_bridge/**/*.py")]:
        if path.name in ("_registry.py", "demo.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            named = any(
                isinstance(s, ast.Attribute) and s.attr in ("name", "method_name")
                or isinstance(s, ast.Name) and s.id in ("method", "method_name", "name")
                for s in sides
            )
            builtin = any(
                isinstance(c, ast.Constant) and c.value in BUILTIN_ARGS
                for s in sides for c in ast.walk(s)
            )
            if named and builtin:
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found
