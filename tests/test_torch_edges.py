"""The torch bridge at its edges: float16 with eps-dividing optimizers, ID3's exponent, the
under-used budget warning, what post_train_work prints, the weight-decay announcement."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402
import torch  # noqa: E402

from torch_bridge import get_selective_optimizer  # noqa: E402
from torch_bridge.safety import restore_scope  # noqa: E402
from torch_bridge.verify import changed  # noqa: E402


def small_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def train(model, opt, steps, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
        opt.zero_grad()
        (model(x.to(dtype)).float() - y).pow(2).mean().backward()
        opt.step()


def unselected_changes(model, before, opt):
    return sum(int((changed(b, p) & ~m).sum())
               for b, p, m in zip(before, model.parameters(), opt.get_masks()))


# -- float16: eps underflows, a zero gradient gives 0/0 ------------------------------------------
EPS_DIVIDED = [torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop]


@pytest.mark.parametrize("method", ["id3", "pafi"])
@pytest.mark.parametrize("opt_cls", EPS_DIVIDED, ids=lambda c: c.__name__)
def test_float16_unselected_entries_stay_bit_identical(opt_cls, method):
    model = small_model(torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    cls = get_selective_optimizer(opt_cls, method)
    opt = cls(model.parameters(), lr=0.01, weight_decay=0.0, budget=12, max_steps=3,
              compact=False)
    train(model, opt, 4, dtype=torch.float16)
    assert opt.get_budget_used() == 12
    assert unselected_changes(model, before, opt) == 0
    assert not any(bool(p.isnan().any()) for p in model.parameters())


def test_eps_zero_in_float32_is_restored_too():
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = get_selective_optimizer(torch.optim.Adam, "pafi")(
        model.parameters(), lr=0.01, eps=0.0, budget=12, compact=False)
    train(model, opt, 2)
    assert unselected_changes(model, before, opt) == 0


def test_restore_copy_only_where_the_inner_step_can_move_unselected_entries():
    group = {"weight_decay": 0.0, "eps": 1e-8, "maximize": False}
    assert restore_scope(torch.optim.Adam, group, torch.float32) == "none"
    assert restore_scope(torch.optim.Adam, group, torch.bfloat16) == "none"  # 1e-8 fits in bf16
    assert restore_scope(torch.optim.Adam, group, torch.float16) == "with_grad"
    assert restore_scope(torch.optim.Adam, {**group, "eps": 1e-4}, torch.float16) == "none"
    assert restore_scope(torch.optim.SGD, {"weight_decay": 0.0}, torch.float16) == "none"


# -- ID3's exponent: any finite value --------------------------------------------------------------
def test_id3_takes_a_negative_exp_through_get_selective_optimizer():
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    cls = get_selective_optimizer(torch.optim.SGD, "id3")
    opt = cls(model.parameters(), lr=0.1, budget=20, max_steps=4, exp=-1, eps=1e-3, verify=True)
    assert opt.method.exp == -1.0
    train(model, opt, 4)
    assert opt.get_budget_used() == 20 and unselected_changes(model, before, opt) == 0
    opt.post_train_work()


def test_exp_minus_one_ranks_by_gradient_times_magnitude():
    # exp=-1: score |g| * (|θ| + eps); exp=+1 would prefer the small weight instead
    w = torch.nn.Parameter(torch.tensor([0.01, 4.0, 1.0]))
    opt = get_selective_optimizer(torch.optim.SGD, "id3")([w], lr=0.1, budget=1, max_steps=1,
                                                           exp=-1.0, eps=0.0)
    w.grad = torch.tensor([1.0, 1.0, 2.0])  # scores 0.01, 4, 2
    opt.step()
    assert opt.get_masks()[0].tolist() == [False, True, False]
