"""``load_state_dict`` of selective torch optimizers checks what it loads (issues 12 and 13):
budget, parameter shapes, masks within the budget, step counts, inner state shapes, 0.4
states; in the dense and the compact form; a refused state leaves the optimizer as it was."""

import copy
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from torch_bridge import get_selective_optimizer  # noqa: E402

FORMS = {  # (optimizer class, keyword arguments) of the dense and the compact form
    "dense": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01,
                                "compact": False}),
    "compact": (torch.optim.Adam, {"lr": 0.1, "compact": True}),
}


def mlp(a=4, b=3, c=2, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.Tanh(), torch.nn.Linear(b, c))


def trained(form, budget, model=None, method="pafi", steps=2):
    model = model or mlp()
    cls, kw = FORMS[form]
    opt = get_selective_optimizer(cls, method)(model.parameters(), budget=budget, max_steps=2,
                                               **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, model[0].in_features, generator=g)).pow(2).mean().backward()
        opt.step()
    return model, opt


def refused_unchanged(opt, state, match):
    before = copy.deepcopy(opt.state_dict())
    used, count = opt.get_budget_used(), opt.count
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert opt.get_budget_used() == used and opt.count == count
    assert repr(after["selective"]["masks"]) == repr(before["selective"]["masks"])
    assert after["param_groups"] == before["param_groups"]
    assert repr(after["state"]) == repr(before["state"])
    assert repr(after["selective"].get("compact")) == repr(before["selective"].get("compact"))


@pytest.mark.parametrize("form", FORMS)
def test_other_budget_is_refused(form):
    _, big = trained(form, budget=20)
    state = big.state_dict()
    _, small = trained(form, budget=12)
    refused_unchanged(small, state, "saved with budget 20, this optimizer has budget 12")


@pytest.mark.parametrize("form", FORMS)
def test_masks_over_the_budget_are_refused(form):
    _, big = trained(form, budget=20)
    state = big.state_dict()
    del state["selective"]["budget"]  # as states saved before the budget was recorded
    _, small = trained(form, budget=12)
    refused_unchanged(small, state, "masks hold 20 selected entries, more than this "
                                    "optimizer's budget 12")


@pytest.mark.parametrize("form", FORMS)
def test_other_parameter_shapes_are_refused(form):
    _, small = trained(form, budget=6)
    state = small.state_dict()
    _, big = trained(form, budget=6, model=mlp(8, 6, 2))
    refused_unchanged(big, state, r"saved for shape \(3, 4\), the optimizer's parameter has "
                                  r"shape \(6, 8\)")


def test_inner_state_of_other_shapes_is_refused():
    # An older state without the recorded shapes, whose masks happen to be in range.
    _, small = trained("dense", budget=4, model=mlp(4, 3, 2))
    state = small.state_dict()
    del state["selective"]["shapes"]
    _, other = trained("dense", budget=4, model=mlp(3, 4, 2))
    refused_unchanged(other, state, "momentum_buffer' has shape")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("count", [-1, 1.5, True, "3"])
def test_bad_step_counts_are_refused(form, count):
    _, opt = trained(form, budget=6)
    state = opt.state_dict()
    state["selective"]["count"] = count
    refused_unchanged(opt, state, "step count .* must be an int >= 0")


@pytest.mark.parametrize("form", FORMS)
def test_duplicate_and_out_of_range_masks_are_refused(form):
    _, opt = trained(form, budget=6)
    for bad, match in ((torch.tensor([0, 0, 1]), "repeat"), (torch.tensor([0, 99]), "out of range"),
                       (torch.zeros(2, 2, dtype=torch.int64), "1-D int64")):
        state = opt.state_dict()
        state["selective"]["masks"][0] = bad
        state["selective"]["budget"] = opt._budget
        refused_unchanged(opt, state, match)


def test_forged_compact_slots_are_refused():
    _, opt = trained("compact", budget=6)
    state = opt.state_dict()
    buf = state["selective"]["compact"][0]
    buf["indices"] = buf["indices"].clone()
    buf["indices"][0] = 10**6
    refused_unchanged(opt, state, "compact slot indices out of range")
    state = opt.state_dict()
    state["selective"]["compact"][0]["capacity"] = 10**9
    refused_unchanged(opt, state, "compact state saved with 1000000000 slots")


@pytest.mark.parametrize("form", FORMS)
def test_a_valid_state_still_resumes_exactly(form):
    model, opt = trained(form, budget=6)
    state = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    _, fresh = trained(form, budget=6, model=model2, steps=0)
    fresh.load_state_dict(state)
    assert fresh.count == opt.count and fresh.get_budget_used() == opt.get_budget_used()
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, fresh)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_0_4_optimizer_state_says_what_it_is_and_how_to_continue():
    model = mlp()
    plain = torch.optim.Adam(model.parameters(), lr=0.1)
    # selective-optimizers 0.4 kept its masks in each param group under "chosen_masks"
    plain.param_groups[0]["chosen_masks"] = [torch.ones_like(p, dtype=torch.bool)
                                            for p in model.parameters()]
    state = plain.state_dict()
    _, opt = trained("dense", budget=6, model=mlp())
    refused_unchanged(opt, state, "selective-optimizers 0.4 optimizer state")
    with pytest.raises(ValueError, match="build a new selective optimizer"):
        opt.load_state_dict(state)
    with pytest.raises(ValueError, match="was not saved by a selective optimizer"):
        opt.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())


# ------------------------------------------------------------------------------------------
# issue 28: slots that lost their entries, malformed slot state, forged inner state and counts


def test_compact_slots_emptied_are_refused():
    _, opt = trained("compact", budget=3)
    state = opt.state_dict()
    for buf in state["selective"]["compact"]:
        buf["leaves"] = torch.zeros(0, dtype=torch.int64)
        buf["indices"] = torch.zeros(0, dtype=torch.int64)
    _, fresh = trained("compact", budget=3, steps=0)
    refused_unchanged(fresh, state, r"compact slots of .* hold 0 entries but its mask selects 2")


def test_compact_slot_dropped_is_refused():
    _, opt = trained("compact", budget=3)
    state = opt.state_dict()
    buf = state["selective"]["compact"][0]
    buf["leaves"], buf["indices"] = buf["leaves"][:-1], buf["indices"][:-1]
    refused_unchanged(opt, state, "every selected entry needs its slot")


def test_compact_slot_state_not_a_dict_is_refused():
    _, opt = trained("compact", budget=3)
    state = opt.state_dict()
    state["selective"]["compact"][0]["state"] = [1, 2]
    refused_unchanged(opt, state, "its 'state' must be a dict")


def test_a_step_count_past_int64_is_refused():
    _, opt = trained("dense", budget=6)
    state = opt.state_dict()
    state["selective"]["count"] = 2**70
    refused_unchanged(opt, state, "must be an int >= 0 and at most")


def _forge_inner(form, opt, name, value):
    state = opt.state_dict()
    if form == "compact":
        state["selective"]["compact"][0]["state"][name] = value
    else:
        state["state"][0][name] = value
    return state


INNER_FORGERIES = {  # name: (entry, forged value, what the error says)
    "0-d exp_avg": ("exp_avg", torch.tensor(0.5), "must be a floating-point tensor"),
    "int exp_avg": ("exp_avg", None, "must be a floating-point tensor"),
    "negative exp_avg_sq": ("exp_avg_sq", None, "holds negative values"),
    "nan exp_avg": ("exp_avg", None, "NaN or infinity"),
    "step -1": ("step", torch.tensor(-1.0), "'step' is -1.0"),
    "step 1.5": ("step", torch.tensor(1.5), "'step' is 1.5"),
    "step inf": ("step", torch.tensor(float("inf")), "'step' is inf"),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", INNER_FORGERIES)
def test_inner_state_the_optimizer_cannot_use_is_refused(form, case):
    cls = torch.optim.Adam
    model = mlp()
    opt = get_selective_optimizer(cls, "pafi")(model.parameters(), budget=3, lr=0.1,
                                               compact=form == "compact")
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()
    name, value, match = INNER_FORGERIES[case]
    good = (opt.state_dict()["selective"]["compact"][0]["state"] if form == "compact"
            else opt.state_dict()["state"][0])[name]
    if value is None:
        value = {"int exp_avg": lambda: good.to(torch.int64),
                 "negative exp_avg_sq": lambda: good - 1.0,
                 "nan exp_avg": lambda: torch.full_like(good, float("nan"))}[case]()
    refused_unchanged(opt, _forge_inner(form, opt, name, value), match)
