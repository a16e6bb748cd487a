"""The torch bridge at its edges: float16 with eps-dividing optimizers, ID3's exponent, the
under-used budget warning, what post_train_work prints, the weight-decay announcement."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from optax_selective.inspect import BudgetShortfallWarning  # noqa: E402
from torch_bridge import VerificationError, get_selective_optimizer  # noqa: E402
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


def test_float16_dense_and_compact_forms_give_the_same_parameters():
    out = {}
    for compact in (False, True):
        model = small_model(torch.float16)
        opt = get_selective_optimizer(torch.optim.Adam, "id3")(
            model.parameters(), lr=0.01, budget=12, max_steps=3, compact=compact)
        assert opt.compact is compact
        train(model, opt, 4, dtype=torch.float16)
        out[compact] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(out[False], out[True]))


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


# -- the budget line, the verification result, the under-used budget warning ---------------------
def test_post_train_work_prints_the_budget_line_and_the_verification_result(capsys):
    model = small_model()
    cls = get_selective_optimizer(torch.optim.SGD, "id3")
    opt = cls(model.parameters(), lr=0.1, budget=20, max_steps=2, verify=True)
    train(model, opt, 2)
    opt.post_train_work()
    assert capsys.readouterr().out.splitlines() == [
        "Budget allocated: 20, budget used: 20",
        "Verification successful: Non-chosen parameters have not changed.",
    ]
    quiet = get_selective_optimizer(torch.optim.SGD, "pafi")(model.parameters(), lr=0.1, budget=7)
    quiet.post_train_work()  # verify=False: the budget line only
    assert capsys.readouterr().out == "Budget allocated: 7, budget used: 7\n"


def test_verification_failure_still_raises_after_the_budget_line(capsys):
    model = small_model()
    opt = get_selective_optimizer(torch.optim.SGD, "pafi")(model.parameters(), lr=0.1, budget=5,
                                                           verify=True)
    with torch.no_grad():
        model[0].weight.view(-1)[opt.get_masks()[0].view(-1).logical_not().nonzero()[0]] += 1.0
    with pytest.raises(VerificationError, match="1 unselected entries changed"):
        opt.post_train_work()
    assert capsys.readouterr().out == "Budget allocated: 5, budget used: 5\n"


def test_fewer_steps_than_max_steps_warns_once_with_used_and_budget():
    # gradient accumulation: max_steps set to the batch count, 4 of 10 optimizer steps ran
    model = small_model()
    opt = get_selective_optimizer(torch.optim.SGD, "id3")(model.parameters(), lr=0.1, budget=20,
                                                          max_steps=10)
    train(model, opt, 4)
    with pytest.warns(BudgetShortfallWarning, match="selected 8 of its budget of 20") as rec:
        opt.post_train_work()
    assert "only 4 of max_steps=10" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.get_summary(model)  # once per optimizer
        opt.post_train_work()
    assert opt.get_budget_used() == 8  # the selection itself is unchanged


def test_a_step_without_selectable_gradient_warns_at_get_summary():
    model = small_model()
    opt = get_selective_optimizer(torch.optim.SGD, "id3")(model.parameters(), lr=0.1, budget=20,
                                                          max_steps=4)
    train(model, opt, 1)
    opt.zero_grad(set_to_none=True)
    opt.step()  # no gradient at all: that step's 5 entries are not made up later
    train(model, opt, 2)
    with pytest.warns(BudgetShortfallWarning, match="15 of its budget of 20.*first 4 updates"):
        opt.get_summary(model)


def test_no_shortfall_warning_when_the_budget_is_spent():
    model = small_model()
    for method, kw in (("id3", dict(max_steps=3)), ("fish", dict(fish_steps=2)), ("pafi", {})):
        opt = get_selective_optimizer(torch.optim.SGD, method)(model.parameters(), lr=0.1,
                                                               budget=9, **kw)
        train(model, opt, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.get_summary(model)
            opt.post_train_work()


# -- AdamW's default weight decay is applied (0.4 forced 0) ----------------------------------------
def test_adamw_default_weight_decay_is_announced_once_at_construction():
    model = small_model()
    cls = get_selective_optimizer(torch.optim.AdamW, "pafi")
    with pytest.warns(UserWarning, match=r"default weight_decay=0\.01.*weight_decay=0\.0") as rec:
        opt = cls(model.parameters(), lr=0.1, budget=5)
    assert len([r for r in rec if "weight_decay" in str(r.message)]) == 1
    assert rec[0].filename == __file__  # points at the user's line
    assert opt.param_groups[0]["weight_decay"] == 0.01  # applied, not forced to 0
    explicit = [
        dict(weight_decay=0.01), dict(weight_decay=0.0),
        dict(params=[{"params": list(model.parameters()), "weight_decay": 0.1}]),
    ]
    for kw in explicit:
        kw = {"params": model.parameters(), **kw}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cls(lr=0.1, budget=5, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(model.parameters(), 0.1, (0.9, 0.999), 1e-8, 0.0, budget=5)  # positional
        get_selective_optimizer(torch.optim.Adam, "pafi")(model.parameters(), lr=0.1, budget=5)


# -- silent or misleading edges (#31) ----------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"stream_grads": True}])
def test_a_selection_step_without_gradients_or_with_nan_ones_warns_at_the_step(kw):
    model = small_model()
    opt = get_selective_optimizer(torch.optim.AdamW, "id3")(
        model.parameters(), lr=0.01, weight_decay=0.0, budget=20, max_steps=3, **kw)
    with pytest.warns(RuntimeWarning, match=r"step\(\) 0 of 3: no selectable parameter has a "
                                            "gradient.*used up"):
        opt.step()  # backward() forgotten
    opt.zero_grad()
    (model(torch.randn(2, 6)).sum() * float("nan")).backward()  # a diverged loss
    with pytest.warns(RuntimeWarning, match=r"step\(\) 1 of 3: every gradient entry is NaN"):
        opt.step()
    opt.zero_grad()
    model(torch.randn(2, 6)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # a good step: no warning


def test_an_unknown_keyword_is_named():
    model = small_model()
    with pytest.raises(TypeError, match=r"unknown keyword argument 'max_step'.*'max_steps'"):
        get_selective_optimizer(torch.optim.AdamW, "id3")(
            model.parameters(), lr=0.01, budget=20, max_step=5)


def test_pafi_says_it_ignores_max_steps():
    model = small_model()
    with pytest.warns(UserWarning, match="max_steps is ignored by the method 'pafi'"):
        get_selective_optimizer(torch.optim.SGD, "pafi")(
            model.parameters(), lr=0.01, budget=20, max_steps=5)


@pytest.mark.parametrize("named", [True, False])
def test_verification_error_names_the_parameter(named):
    model = small_model()
    params = model.named_parameters() if named else model.parameters()
    opt = get_selective_optimizer(torch.optim.SGD, "pafi")(params, lr=0.01, budget=3, verify=True)
    with torch.no_grad():
        model[2].weight.add_(1.0)  # moved outside the optimizer
    with pytest.raises(VerificationError, match=r"2\.weight: \d+ unselected entries changed"):
        opt.post_train_work(model=None if named else model)
