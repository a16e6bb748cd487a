"""A registered method that declares LeafwiseInitMethod gets its fixed mask chosen leafwise.

The method keeps the ``budget`` entries of *largest* magnitude, fixed at init (PaFI's
opposite). Declared with ``leafwise_init = True``, the torch bridge's compact state chooses
that mask one parameter (chunk) at a time with streaming or for large models, exactly as the
whole-model ``init`` does; undeclared, the whole model is scored at once.
"""

import dataclasses

import jax.numpy as jnp
import pytest
import torch

from optax_selective import methods, selection
from optax_selective.methods import LeafwiseInitMethod, LeafwiseMethod
from torch_bridge import get_selective_optimizer
from torch_bridge import optimizer as torch_optimizer

NAME = "largest_leafwise_init_test"
SHAPES = ((7, 9), (9,), (9, 3), (3,))


@dataclasses.dataclass(frozen=True)
class Largest:
    budget: int
    name: str = NAME
    needs_params: bool = False
    frozen_after = 0
    k_max = 0
    leafwise_init = True

    def effective_budget(self, layout):
        b_eff = self.budget - layout.num_choose_all
        if not 0 <= b_eff <= layout.num_selectable:
            raise ValueError(f"{self.name}: budget {self.budget} does not fit the parameters.")
        return b_eff

    @staticmethod
    def score(param):
        return selection.exclude(jnp.abs(param.astype(jnp.float32)), False)

    def init(self, params, layout):
        scores = [self.score(p) if ok else None for p, ok in zip(params, layout.selectable)]
        new = selection.top_k_masks(scores, self.effective_budget(layout), self.effective_budget(layout))
        mask = methods.choose_all_mask(layout)
        return [m if n is None else m | n for m, n in zip(mask, new)], ()

    def update(self, mask, state, count, grads, params, selectable, *, report_added=False):
        return (mask, state, None) if report_added else (mask, state)


@dataclasses.dataclass(frozen=True)
class UndeclaredLargest(Largest):
    leafwise_init = False


def _factory(cls):
    def make(*, budget=None):
        return cls(budget=methods.required_budget(NAME, budget))
    return make


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = torch_optimizer.choose_fixed_mask

    def counting(*args, **kwargs):  # the real function, counted
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_optimizer, "choose_fixed_mask", counting)
    return calls


def run(cls, **kw):
    methods.register(NAME, _factory(cls), replace=True)
    try:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]
        groups = [{"params": params[:3]}, {"params": [params[3]], "choose_all": True}]
        opt = get_selective_optimizer(torch.optim.AdamW, NAME)(groups, lr=0.01, weight_decay=0.0, budget=20,
                                                                 **kw)
        for _ in range(3):
            opt.zero_grad()
            x = torch.randn(4, 7, generator=g)
            ((x @ params[0] + params[1]).tanh() @ params[2] + params[3]).square().sum().backward()
            opt.step()
        return [m.clone() for m in opt.get_masks()], [p.detach().clone() for p in params]
    finally:
        methods.unregister(NAME)


def test_the_protocol_declares_who_chooses_a_fixed_mask_leafwise():
    assert isinstance(Largest(budget=3), LeafwiseInitMethod)
    assert not isinstance(Largest(budget=3), LeafwiseMethod)
    assert isinstance(methods.build("pafi", budget=3), LeafwiseInitMethod)
    for name, kw in [("id3", dict(budget=3, max_steps=2)), ("bitfit", dict(budget=3))]:
        assert not isinstance(methods.build(name, **kw), LeafwiseInitMethod), name


def test_a_declared_method_chooses_its_mask_leafwise_and_equals_the_whole_model(spy):
    whole = run(Largest)  # small model, no streaming: one whole-model init
    assert spy == []
    streamed = run(Largest, stream_grads=True)
    assert len(spy) == 1
    undeclared = run(UndeclaredLargest, stream_grads=True)
    assert len(spy) == 1  # not declared: the whole model at init, even when streaming
    for a, b, c in zip(whole[0] + whole[1], streamed[0] + streamed[1],
                       undeclared[0] + undeclared[1]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert sum(int(m.sum()) for m in whole[0]) == 20
