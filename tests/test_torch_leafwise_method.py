"""A registered method that declares LeafwiseMethod gets the torch bridge's leafwise selection.

The method is the leafwise example of ``docs/guides/custom-methods.md``: ID3's schedule with
the first-order Taylor importance ``|g * θ|`` as its score. Declared leafwise, the compact
state selects it one parameter (chunk) at a time, exactly as ID3; the entries and parameters
equal those of the whole-model path, and (through ``check_method``) the entries equal JAX's.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
import torch

from optax_selective import methods, selection
from optax_selective.methods import ID3, LeafwiseMethod
from optax_selective.testing import ConformanceError, check_method
from torch_bridge import get_selective_optimizer, leafwise
from torch_bridge import optimizer as torch_optimizer

NAME = "taylor_leafwise_test"
SHAPES = ((7, 9), (9,), (9, 13), (13,), (13, 3), (3,))


@dataclasses.dataclass(frozen=True)
class Taylor:
    budget: int
    max_steps: int
    name: str = NAME
    needs_params: bool = True
    leafwise = True  # every step is the top-k of the elementwise score below

    @property
    def frozen_after(self) -> int:
        return self.max_steps

    @property
    def k_max(self) -> int:
        return selection.max_increment(self.budget, self.max_steps)

    def effective_budget(self, layout):
        b_eff = self.budget - layout.num_choose_all
        if not 1 <= b_eff <= layout.num_selectable:
            raise ValueError(f"{self.name}: budget {self.budget} does not fit the parameters.")
        return b_eff

    def score(self, grad, param, mask):
        taylor = jnp.abs(grad.astype(jnp.float32) * param.astype(jnp.float32))
        return selection.exclude(taylor, mask)

    def increment(self, count, effective_budget):
        return selection.id3_increment(count, effective_budget, self.max_steps)

    def init(self, params, layout):
        return methods.choose_all_mask(layout), jnp.int32(self.effective_budget(layout))

    def update(self, mask, state, count, grads, params, selectable, *, report_added=False):
        def grow(mask):
            scores = [self.score(g, p, m) if ok else None
                      for g, p, m, ok in zip(grads, params, mask, selectable)]
            new = selection.top_k_masks(scores, self.increment(count, state), self.k_max)
            return [m if n is None else m | n for m, n in zip(mask, new)]

        mask = jax.lax.cond(count < self.max_steps, grow, list, list(mask))
        return (mask, state, None) if report_added else (mask, state)


@dataclasses.dataclass(frozen=True)
class WholeModelTaylor(Taylor):
    leafwise = False  # the same rule, not declared: always selected whole-model


@dataclasses.dataclass(frozen=True)
class WrongScoreTaylor(Taylor):
    """Declares leafwise but its ``score`` is not what ``update`` ranks by: a broken promise."""

    def score(self, grad, param, mask):
        return selection.exclude(jnp.abs(grad.astype(jnp.float32)), mask)

    def update(self, mask, state, count, grads, params, selectable, *, report_added=False):
        taylor = Taylor(self.budget, self.max_steps)  # ranks by |g * θ|
        return taylor.update(mask, state, count, grads, params, selectable,
                             report_added=report_added)


def _factory(cls):
    def make(*, budget=None, max_steps=None):
        budget = methods.required_budget(NAME, budget)
        max_steps = methods.check_int("max_steps", methods.require(NAME, "max_steps", max_steps,
                                                                   "steps"), 1)
        return cls(budget=budget, max_steps=max_steps)
    return make


@pytest.fixture
def registered():
    methods.register(NAME, _factory(Taylor))
    yield
    methods.unregister(NAME)


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def groups(params):
    return [{"params": params[:4]}, {"params": [params[4]], "lr": 0.05},
            {"params": [params[5]], "choose_all": True}]


def train(opt, params, steps=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 7, generator=g)
        h = (x @ params[0] + params[1]).tanh()
        h = (h @ params[2] + params[3]).tanh()
        (h @ params[4] + params[5]).square().sum().backward()
        opt.step()


def run(name, **kw):
    params = make_params()
    opt = get_selective_optimizer(torch.optim.AdamW, name)(
        groups(params), lr=0.01, weight_decay=0.1, budget=40, max_steps=3, **kw)
    train(opt, params)
    return opt, params


def assert_same(a, b):
    (oa, pa), (ob, pb) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for x, y in zip(oa.get_masks(), ob.get_masks()):
        assert torch.equal(x, y)


def test_the_protocol_declares_who_selects_leafwise():
    assert isinstance(ID3(budget=4, max_steps=2), LeafwiseMethod)
    assert isinstance(Taylor(budget=4, max_steps=2), LeafwiseMethod)
    for name, kw in [("pafi", dict(budget=4)), ("bitfit", dict(budget=4)), ("fft", {}),
                     ("fish", dict(budget=4, fish_steps=2)), ("random", dict(budget=4))]:
        assert not isinstance(methods.build(name, **kw), LeafwiseMethod), name


def test_a_registered_leafwise_method_is_selected_leafwise(registered):
    before = leafwise.TRACES[0]
    streamed = run(NAME, stream_grads=True)  # streaming selects leafwise, whatever the size
    assert streamed[0]._leafwise is not None and leafwise.TRACES[0] > before
    whole = run(NAME, compact=True)  # a small model: one whole-model program per step
    assert whole[0]._leafwise is None
    assert_same(streamed, whole)
    assert_same(streamed, run(NAME, compact=False))
    assert streamed[0].get_budget_used() == 40


def test_large_models_select_leafwise_without_streaming(registered, monkeypatch):
    whole = run(NAME)
    monkeypatch.setattr(torch_optimizer, "LEAFWISE_MIN", 100)  # "large": >= 100 entries
    large = run(NAME)
    assert large[0]._leafwise is not None and whole[0]._leafwise is None
    assert_same(large, whole)


def test_a_method_that_does_not_declare_it_is_selected_whole_model():
    methods.register(NAME, _factory(WholeModelTaylor))
    try:
        streamed = run(NAME, stream_grads=True)
        assert streamed[0]._leafwise is None
        methods.register(NAME, _factory(Taylor), replace=True)
        assert_same(streamed, run(NAME, stream_grads=True))
    finally:
        methods.unregister(NAME)


@pytest.mark.slow
def test_the_conformance_check_runs_the_leafwise_path(registered):
    # check_method compares the torch bridge's leafwise selection with JAX's, step by step
    params = {"b": jnp.linspace(-1.0, 1.0, 9), "w": jnp.cos(jnp.arange(30.0)).reshape(5, 6)}
    report = check_method(NAME, params=params, budget=12, max_steps=3)
    assert report.torch_checked and report.budget_used == 12
    methods.register(NAME, _factory(WrongScoreTaylor), replace=True)
    with pytest.raises(ConformanceError, match="leafwise selection .* select different"):
        check_method(NAME, params=params, budget=12, max_steps=3)


def test_the_conformance_check_names_missing_leafwise_members():
    @dataclasses.dataclass(frozen=True)
    class Undeclared(WholeModelTaylor):
        leafwise = True
        score = None  # not a method: the leafwise path could not call it

    with pytest.raises(ConformanceError, match="leafwise = True but .*score"):
        check_method(_factory(Undeclared), budget=12, max_steps=3, check_torch=False)
