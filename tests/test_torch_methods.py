"""torch_bridge.methods and jax_interop: the torch wrapper selects exactly what the optax
transformation selects, step by step, for every method (FISH and R-Mask included)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import optax_selective as osel  # noqa: E402
from torch_bridge import (
    METHOD_NAMES,  # noqa: E402
    get_selective_optimizer,  # noqa: E402
)

SHAPES = [(4, 3), (3,), (6, 5), (5,), (2, 2, 3)]  # the first two form the head
LR = 0.5  # a power of two: SGD updates are exact in both frameworks


def make_tx(method, choose_all, budget, max_steps, exp):
    ca = [choose_all, choose_all, False, False, False]
    offered = dict(budget=budget, max_steps=max_steps, exp=exp, eps=1e-3)
    takes = osel.methods.arguments(method)  # the registry says what each method takes
    args = {k: v for k, v in offered.items() if k in takes}
    return osel.selective(method, choose_all=ca, inner=optax.sgd(LR), **args)


CASES = [("id3", ca, exp) for ca in (False, True) for exp in (0.0, 1.0)] + [
    (m, ca, 1.0) for m in ("pafi", "bitfit", "fft") for ca in (False, True)
]


@pytest.mark.parametrize("method,choose_all,exp", CASES)
def test_same_masks_every_step(method, choose_all, exp):
    rng = np.random.default_rng(0)
    init = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    init[3][:] = 0.0  # zero-initialised bias: PaFI ties, ID3 infinite-ish scores
    init[2][0, :2] = init[2][1, :2]  # repeated magnitudes: ties broken by global index
    budget, max_steps, steps = (15 + 20 if choose_all else 20), 4, 6
    if method == "bitfit":  # the last bias leaf is taken partly
        budget = 15 + 3 if choose_all else 3 + 4
    tparams = [torch.nn.Parameter(torch.tensor(a)) for a in init]
    groups = ([{"params": tparams[:2], "choose_all": True}, {"params": tparams[2:]}]
              if choose_all else [{"params": tparams}])
    kwargs = {} if method == "fft" else {"budget": budget, "max_steps": max_steps, "exp": exp, "eps": 1e-3}
    if method != "id3":
        kwargs.pop("exp", None), kwargs.pop("eps", None)
    opt = get_selective_optimizer(torch.optim.SGD, method)(groups, lr=LR, **kwargs)
    tx = make_tx(method, choose_all, budget, max_steps, exp)
    jparams = [jnp.asarray(a) for a in init]
    state = tx.init(jparams)
    update = jax.jit(tx.update)
    for t in range(steps):
        grads = rng.normal(size=(sum(np.prod(s) for s in SHAPES),)).astype(np.float32)
        grads = np.round(grads, 1)  # many equal |g|: exercises the tie rule
        grads = np.split(grads, np.cumsum([np.prod(s) for s in SHAPES])[:-1])
        grads = [g.reshape(s) for g, s in zip(grads, SHAPES)]
        for p, g in zip(tparams, grads):
            p.grad = torch.tensor(g)
        opt.step()
        updates, state = update([jnp.asarray(g) for g in grads], state, jparams)
        jparams = optax.apply_updates(jparams, updates)
        jmask = osel.selected_mask(state)
        for i, (tm, jm) in enumerate(zip(opt.get_masks(), jmask)):
            np.testing.assert_array_equal(tm.numpy(), np.asarray(jm), err_msg=f"step {t} leaf {i}")
        for p, jp in zip(tparams, jparams):
            np.testing.assert_array_equal(p.detach().numpy(), np.asarray(jp))
    assert opt.get_budget_used() == osel.budget_used(state)
    if method in ("id3", "pafi"):
        assert opt.get_budget_used() == budget


# FISH and R-Mask through the torch bridge: the same masks as JAX, step by step.

# Leaf order: head (4, 3), head bias (3,), body (6, 5), an int buffer-like param, body (5,).
FISH_SHAPES = [(4, 3), (3,), (6, 5), (3,), (5,)]
INT_LEAF = 3


def initial_values(rng):
    vals = [rng.normal(size=s).astype(np.float32) for s in FISH_SHAPES]
    vals[INT_LEAF] = np.arange(3, dtype=np.int32)
    return vals


def torch_groups(init, choose_all):
    tparams = []
    for i, a in enumerate(init):
        t = torch.tensor(a)
        tparams.append(torch.nn.Parameter(t, requires_grad=i != INT_LEAF))
    if choose_all:
        return tparams, [{"params": tparams[:2], "choose_all": True}, {"params": tparams[2:]}]
    return tparams, [{"params": tparams}]


def jax_choose_all(choose_all):
    return [choose_all, choose_all, False, False, False] if choose_all else None


def random_grads(rng):
    grads = []
    for i, s in enumerate(FISH_SHAPES):
        g = np.round(rng.normal(size=s), 1).astype(np.float32)  # many equal g**2: ties
        grads.append(None if i == INT_LEAF else g)
    return grads


@pytest.mark.parametrize("choose_all", [False, True])
def test_fish_same_masks_and_params_every_step(choose_all):
    rng = np.random.default_rng(0)
    init = initial_values(rng)
    budget, fish_steps, steps = (15 + 9 if choose_all else 9), 3, 5
    tparams, groups = torch_groups(init, choose_all)
    opt = get_selective_optimizer(torch.optim.SGD, "fish")(
        groups, lr=LR, budget=budget, fish_steps=fish_steps
    )
    tx = osel.selective_fish(budget, fish_steps, choose_all=jax_choose_all(choose_all), inner=optax.sgd(LR))
    jparams = [jnp.asarray(a) for a in init]
    state = tx.init(jparams)
    update = jax.jit(tx.update)
    for t in range(steps):
        grads = random_grads(rng)
        if t == 1:
            grads[2][0, 0] = np.nan  # a non-finite Fisher sum is never selected
        for p, g in zip(tparams, grads):
            p.grad = None if g is None else torch.tensor(g)
        opt.step()
        jgrads = [jnp.zeros(3, jnp.int32) if g is None else jnp.asarray(g) for g in grads]
        updates, state = update(jgrads, state, jparams)
        jparams = optax.apply_updates(jparams, updates)
        for i, (tm, jm) in enumerate(zip(opt.get_masks(), osel.selected_mask(state))):
            np.testing.assert_array_equal(tm.numpy(), np.asarray(jm), err_msg=f"step {t} leaf {i}")
        for i, (p, jp) in enumerate(zip(tparams, jparams)):
            if i != INT_LEAF:  # SGD with NaN: both NaN only where selected, compare bitwise
                np.testing.assert_array_equal(p.detach().numpy(), np.asarray(jp))
        want = budget if t >= fish_steps - 1 else (15 if choose_all else 0)
        assert opt.get_budget_used() == osel.budget_used(state) == want
    assert not opt.get_masks()[2][0, 0]


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
@pytest.mark.parametrize("choose_all", [False, True])
def test_random_same_mask_as_jax_for_the_same_seed(seed, choose_all):
    rng = np.random.default_rng(1)
    init = initial_values(rng)
    budget = (15 + 8) if choose_all else 8
    _, groups = torch_groups(init, choose_all)
    opt = get_selective_optimizer(torch.optim.AdamW, "random")(
        groups, lr=1e-2, budget=budget, seed=seed
    )
    state = osel.selective_random(budget, seed=seed, choose_all=jax_choose_all(choose_all)).init(
        [jnp.asarray(a) for a in init]
    )
    for i, (tm, jm) in enumerate(zip(opt.get_masks(), osel.selected_mask(state))):
        np.testing.assert_array_equal(tm.numpy(), np.asarray(jm), err_msg=f"leaf {i}")
    assert opt.get_budget_used() == osel.budget_used(state) == budget
    assert not opt.get_masks()[INT_LEAF].any()


def test_random_seeds_differ_and_training_keeps_unselected_entries():
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    cls = get_selective_optimizer(torch.optim.AdamW, "random")
    masks = [cls(model.parameters(), lr=0.1, budget=10, seed=s).get_masks() for s in (0, 1)]
    assert any(not torch.equal(a, b) for a, b in zip(*masks))
    opt = cls(model.parameters(), lr=0.1, weight_decay=0.5, budget=10, seed=0, verify=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
        opt.step()
    opt.post_train_work()  # raises VerificationError if an unselected entry moved
    assert opt.get_budget_used() == 10


def test_fish_in_torch_trains_only_choose_all_while_scoring_then_verifies():
    torch.manual_seed(0)
    body, head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
    before = [p.detach().clone() for p in body.parameters()]
    head_before = [p.detach().clone() for p in head.parameters()]
    opt = get_selective_optimizer(torch.optim.AdamW, "fish")(
        [{"params": head.parameters(), "choose_all": True}, {"params": body.parameters()}],
        lr=0.1, weight_decay=0.5, budget=27 + 5, fish_steps=3, verify=True,
    )
    g = torch.Generator().manual_seed(0)
    for t in range(5):
        opt.zero_grad()
        head(torch.tanh(body(torch.randn(4, 6, generator=g)))).pow(2).mean().backward()
        opt.step()
        if t < 2:
            assert all(torch.equal(a, b) for a, b in zip(before, body.parameters()))
            assert opt.get_budget_used() == 27
    assert not all(torch.equal(a, b) for a, b in zip(head_before, head.parameters()))
    assert opt.get_budget_used() == 32
    opt.post_train_work()


def test_fish_in_torch_leaf_without_gradient_at_the_fixing_step_takes_no_part():
    a = torch.nn.Parameter(torch.zeros(4))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = get_selective_optimizer(torch.optim.SGD, "fish")([a, b], lr=1.0, budget=2, fish_steps=2)
    a.grad, b.grad = torch.tensor([1.0, 0.0, 3.0, 0.5]), torch.full((3,), 9.0)
    opt.step()
    a.grad, b.grad = torch.tensor([1.0, 0.0, 3.0, 0.5]), None
    opt.step()
    assert opt.get_masks()[0].tolist() == [True, False, True, False]
    assert not opt.get_masks()[1].any() and opt.get_budget_used() == 2


def test_registry_and_bad_arguments():
    assert {"fish", "random"} <= set(METHOD_NAMES)
    params = [torch.nn.Parameter(torch.zeros(5))]
    fish = get_selective_optimizer(torch.optim.SGD, "fish")
    rand = get_selective_optimizer(torch.optim.SGD, "random")
    with pytest.raises(ValueError, match="'fish' needs fish_steps"):
        fish(params, lr=0.1, budget=2)
    with pytest.raises(ValueError, match="fish_steps must be in .*got 0"):
        fish(params, lr=0.1, budget=2, fish_steps=0)
    with pytest.raises(ValueError, match="seed must be in .*got -3"):
        rand(params, lr=0.1, budget=2, seed=-3)
    with pytest.raises(TypeError, match="seed must be an int"):
        rand(params, lr=0.1, budget=2, seed=torch.Generator())
    with pytest.raises(ValueError, match="budget 6 is larger than the 5 eligible"):
        rand(params, lr=0.1, budget=6)


def test_fish_state_dict_round_trip_during_and_after_scoring():
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = get_selective_optimizer(torch.optim.Adam, "fish")(
            model.parameters(), lr=0.1, budget=3, fish_steps=2
        )
        return model, opt

    def step(model, opt):
        opt.zero_grad()
        model(torch.arange(8.0).reshape(2, 4)).pow(2).sum().backward()
        opt.step()

    model, opt = make()
    step(model, opt)
    during = opt.state_dict()
    step(model, opt)
    after = opt.state_dict()
    _, fresh = make()
    # Saved during scoring, the state dict holds the running Fisher sum: resuming is exact.
    model_r, resumed = make()
    resumed.load_state_dict(during)
    step(model_r, resumed)
    for a, b in zip(resumed.get_masks(), opt.get_masks()):
        assert torch.equal(a, b)
    old_style = dict(during, selective={k: v for k, v in during["selective"].items() if k != "method_state"})
    with pytest.raises(ValueError, match="saved during fish's selection \\(after 1 of 2 steps\\) without"):
        fresh.load_state_dict(old_style)
    fresh.load_state_dict(after)
    for a, b in zip(fresh.get_masks(), opt.get_masks()):
        assert torch.equal(a, b)
    assert fresh.get_budget_used() == 3
