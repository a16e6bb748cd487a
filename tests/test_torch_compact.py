"""compact=True: the inner torch optimizer sees only the selected entries, same parameters."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from torch_bridge import get_selective_optimizer  # noqa: E402
from torch_bridge.verify import changed  # noqa: E402

EXACT = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "maximize": True}),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "foreach": True}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "foreach": False}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "fused": True}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    (torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5}),
    (torch.optim.Adamax, {"lr": 0.01}),
    (torch.optim.NAdam, {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    (torch.optim.RAdam, {"lr": 0.01}),
]
METHOD_KW = {
    "id3": {"budget": 20, "max_steps": 3},
    "pafi": {"budget": 20},
    "bitfit": {"budget": 20},
    "fish": {"budget": 20, "fish_steps": 2},
    "random": {"budget": 20, "seed": 3},
    "fft": {},
}


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((7, 9), (9,), (9, 3), (3,))]


def groups(params):
    # two groups with different lr, and a choose_all "head" that stays dense
    return [{"params": params[:2]}, {"params": [params[2]], "lr": 0.05},
            {"params": [params[3]], "choose_all": True}]


def loss_fn(params, x):
    return ((x @ params[0] + params[1]).tanh() @ params[2] + params[3]).square().sum()


def train(opt, params, steps=6, seed=1, skip_grad_at=None):
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        opt.zero_grad()
        loss_fn(params, torch.randn(4, 7, generator=g)).backward()
        if skip_grad_at is not None and t == skip_grad_at:
            params[2].grad = None
        opt.step()


def pair(opt_cls, kwargs, method, **extra):
    out = []
    for compact in (False, True):
        params = make_params()
        cls = get_selective_optimizer(opt_cls, method)
        opt = cls(groups(params), compact=compact, **METHOD_KW[method], **kwargs, **extra)
        out.append((opt, params))
    return out


@pytest.mark.parametrize("opt_cls,kwargs", EXACT, ids=[f"{c.__name__}-{k}" for c, k in EXACT])
@pytest.mark.parametrize("method", ["id3", "pafi"])
def test_same_parameters_as_dense(opt_cls, kwargs, method):
    (dense, pd), (compact, pc) = pair(opt_cls, kwargs, method)
    train(dense, pd)
    train(compact, pc)
    for a, b in zip(pd, pc):
        assert torch.equal(a, b)  # bit for bit: the same elementwise math on the same values
    for a, b in zip(dense.get_masks(), compact.get_masks()):
        assert torch.equal(a, b)
    assert compact.get_budget_used() == dense.get_budget_used() == 20


@pytest.mark.parametrize("method", ["bitfit", "fish", "random"])
def test_other_methods_same_parameters(method):
    (dense, pd), (compact, pc) = pair(torch.optim.AdamW, {"lr": 0.01}, method)
    before = [p.detach().clone() for p in pc]
    train(dense, pd)
    train(compact, pc)
    for a, b in zip(pd, pc):
        assert torch.equal(a, b)  # bit for bit: the same elementwise math on the same values
    for p, b, m in zip(pc, before, compact.get_masks()):
        assert not (changed(b, p) & ~m).any()


def test_state_is_o_budget():
    params = [torch.nn.Parameter(torch.randn(256, 256)), torch.nn.Parameter(torch.randn(256))]
    n = sum(p.numel() for p in params)
    sizes = {}
    for compact in (False, True):
        cls = get_selective_optimizer(torch.optim.AdamW, "id3")
        opt = cls(params, lr=1e-3, budget=100, max_steps=2, compact=compact)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        opt.step()
        sizes[compact] = opt.state_nbytes()
    assert sizes[False] >= 8 * n  # two Adam moments per entry
    assert sizes[True] <= n + 40 * 100  # one mask byte per entry + slots (values, moments, indices)


def test_leaf_without_grad_is_held():
    _, (compact, pc) = pair(torch.optim.Adam, {"lr": 0.05}, "pafi")
    train(compact, pc, steps=2)
    held = next(b for key, b in compact._compact.buffers.items() if key[0] == 1)  # params[2] only
    other = next(b for key, b in compact._compact.buffers.items() if key[0] == 0)
    frozen, held_state = pc[2].detach().clone(), {k: v.clone() for k, v in held.state.items()
                                                  if k != "step"}
    other_before = pc[0].detach().clone()
    assert held_state and held.filled > 0
    g = torch.Generator().manual_seed(5)
    compact.zero_grad()
    loss_fn(pc, torch.randn(4, 7, generator=g)).backward()
    pc[2].grad = None
    compact.step()
    assert torch.equal(pc[2], frozen)
    for k, v in held_state.items():
        assert torch.equal(held.state[k], v), k
    assert other.filled > 0 and not torch.equal(pc[0], other_before)


def test_resume_matches_uninterrupted(tmp_path):
    cls = get_selective_optimizer(torch.optim.AdamW, "id3")
    ref_params = make_params()
    ref = cls(groups(ref_params), lr=0.01, budget=20, max_steps=4, compact=True)
    train(ref, ref_params, steps=6)

    params = make_params()
    opt = cls(groups(params), lr=0.01, budget=20, max_steps=4, compact=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(params, torch.randn(4, 7, generator=g)).backward()
        opt.step()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    params2 = [torch.nn.Parameter(p.clone()) for p in ck["params"]]
    opt2 = cls(groups(params2), lr=0.01, budget=20, max_steps=4, compact=True)
    opt2.load_state_dict(ck["opt"])
    for _ in range(3):
        opt2.zero_grad()
        loss_fn(params2, torch.randn(4, 7, generator=g)).backward()
        opt2.step()
    for a, b in zip(ref_params, params2):
        assert torch.equal(a, b)

    dense = cls(groups(make_params()), lr=0.01, budget=20, max_steps=4, compact=False)
    with pytest.raises(ValueError, match="compact"):
        dense.load_state_dict(ck["opt"])


def test_lr_scheduler_reaches_compact_step():
    params = make_params()
    cls = get_selective_optimizer(torch.optim.SGD, "pafi")
    opt = cls(groups(params), lr=0.1, budget=20, compact=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # lr 0 from the start
    before = [p.detach().clone() for p in params]
    train(opt, params, steps=2)
    sched.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("opt_cls,kwargs,match", [
    (torch.optim.LBFGS, {"lr": 0.1}, "elementwise"),
    (torch.optim.Adam, {"lr": 0.1, "weight_decay": 0.01}, "coupled weight decay"),
    (torch.optim.SGD, {"lr": 0.1, "weight_decay": 0.01}, "coupled weight decay"),
])
def test_refuses_what_it_cannot_do_exactly(opt_cls, kwargs, match):
    cls = get_selective_optimizer(opt_cls, "pafi")
    with pytest.raises(ValueError, match=match):
        cls(make_params(), budget=5, compact=True, **kwargs)


def test_compact_flag_must_be_bool_or_none():
    cls = get_selective_optimizer(torch.optim.AdamW, "pafi")
    with pytest.raises(TypeError, match="compact"):
        cls(make_params(), budget=5, compact="yes")


@pytest.mark.parametrize("opt_cls,kwargs,method,expect", [
    (torch.optim.AdamW, {"weight_decay": 0.01}, "id3", True),
    (torch.optim.SGD, {"momentum": 0.9}, "pafi", True),
    (torch.optim.Adam, {"weight_decay": 0.01}, "id3", False),  # coupled decay: dense
    (torch.optim.LBFGS, {}, "pafi", False),  # not elementwise: dense
    (torch.optim.AdamW, {}, "fft", False),  # everything selected: dense
])
def test_default_is_compact_where_exact(opt_cls, kwargs, method, expect):
    cls = get_selective_optimizer(opt_cls, method)
    opt = cls(make_params(), lr=0.1, **METHOD_KW[method], **kwargs)
    assert opt.compact is expect
    if not expect and method != "fft":
        with pytest.raises(ValueError):
            cls(make_params(), lr=0.1, compact=True, **METHOD_KW[method], **kwargs)


def test_verify_passes_and_summary_round_trips():
    params = make_params()
    model = torch.nn.Module()
    for i, p in enumerate(params):
        model.register_parameter(f"p{i}", p)
    cls = get_selective_optimizer(torch.optim.AdamW, "id3")
    opt = cls(groups(params), lr=0.05, budget=20, max_steps=3, compact=True, verify=True)
    train(opt, params)
    opt.post_train_work()
    summary = opt.get_summary(model)
    assert summary["budget_used"] == opt.get_budget_used() == 20
    fresh = make_params()
    for name, entry in summary["params"].items():
        p = dict(model.named_parameters())[name]
        i = int(name[1:])
        flat_new, flat_old = p.detach().reshape(-1), fresh[i].detach().reshape(-1)
        idx = entry["indices"].long()
        changed_idx = torch.nonzero(flat_new != flat_old).view(-1)
        assert set(changed_idx.tolist()) <= set(idx.tolist())
