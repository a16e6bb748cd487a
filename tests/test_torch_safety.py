"""Unselected entries stay bit-identical whatever the inner optimizer does; decay is honoured."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from torch_bridge import get_selective_optimizer  # noqa: E402
from torch_bridge.verify import changed  # noqa: E402

CONFIGS = [
    (torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "maximize": True}),
    (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "foreach": True}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "fused": True}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.0, "fused": True}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "foreach": False}),
    (torch.optim.Adagrad, {"lr": 0.1, "weight_decay": 0.1}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    (torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5}),
    (torch.optim.RMSprop, {"lr": 0.01, "weight_decay": 0.1, "maximize": True}),
    (torch.optim.Adamax, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
]


def params_with_edge_values(seed=0, edge=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 9, generator=g)
    b = torch.randn(9, generator=g)
    if not edge:
        return [torch.nn.Parameter(w), torch.nn.Parameter(b)]
    w[0, :4] = torch.tensor([-0.0, 0.0, 1e-40, -1e-40])  # signed zeros and denormals
    b[:2] = torch.tensor([-0.0, 3e38])
    return [torch.nn.Parameter(w), torch.nn.Parameter(b)]


def run(opt, params, steps=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 7, generator=g)
        loss = (x @ params[0] + params[1]).tanh().sum()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("method", ["id3", "pafi"])
@pytest.mark.parametrize("opt_cls,kwargs", CONFIGS, ids=[f"{c.__name__}-{k}" for c, k in CONFIGS])
def test_unselected_bit_identical(method, opt_cls, kwargs):
    params = params_with_edge_values()
    before = [p.detach().clone() for p in params]
    cls = get_selective_optimizer(opt_cls, method)
    opt = cls(params, budget=12, max_steps=3, verify=True, **kwargs)
    run(opt, params)
    opt.post_train_work()
    moved = 0
    for p, b, m in zip(params, before, opt.get_masks()):
        assert not (changed(b, p) & ~m).any(), "an unselected entry changed"
        moved += int(changed(b, p).sum())
    assert 0 < moved <= 12


def test_per_group_weight_decay():
    params = params_with_edge_values()
    before = [p.detach().clone() for p in params]
    cls = get_selective_optimizer(torch.optim.AdamW, "id3")
    opt = cls([{"params": [params[0]], "weight_decay": 0.5}, {"params": [params[1]], "weight_decay": 0.0}],
              lr=0.1, budget=10, max_steps=2)
    run(opt, params)
    for p, b, m in zip(params, before, opt.get_masks()):
        assert torch.equal(p[~m], b[~m]) and not (changed(b, p) & ~m).any()


class Shaker(torch.optim.Optimizer):
    """An optimizer outside torch.optim that moves every entry, gradient or not."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(group["lr"])


@pytest.mark.parametrize("method", ["id3", "pafi", "bitfit"])
def test_foreign_optimizer_cannot_move_unselected(method):
    params = params_with_edge_values(edge=False)
    before = [p.detach().clone() for p in params]
    opt = get_selective_optimizer(Shaker, method)(params, budget=5, max_steps=2, verify=True)
    run(opt, params)
    opt.post_train_work()
    assert sum(int(changed(b, p).sum()) for p, b in zip(params, before)) == 5


def test_weight_decay_is_honoured_not_forced_to_zero():
    """With every entry selected the wrapper is exactly the inner optimizer (0.4 set wd to 0)."""
    a, b = params_with_edge_values(), params_with_edge_values()
    run(get_selective_optimizer(torch.optim.AdamW, "fft")(a, lr=0.1, weight_decay=0.3), a)
    run(torch.optim.AdamW(b, lr=0.1, weight_decay=0.3), b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = params_with_edge_values()
    run(torch.optim.AdamW(c, lr=0.1, weight_decay=0.0), c)
    assert not torch.equal(a[0], c[0])
