"""The torch wrapper selects exactly what the optax transformation selects, step by step."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import optax_selective as osel  # noqa: E402
from torch_bridge import get_selective_optimizer  # noqa: E402

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
