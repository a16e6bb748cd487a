"""Resume: an optimizer state saved with orbax mid-run continues exactly like an unbroken run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import optax_selective as osel

STEPS, SPLIT = 6, 3  # ID3 spends its budget over 4 steps, so the mask still grows after SPLIT


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w": jax.random.normal(k1, (5, 4)),
        "b": jnp.zeros(4),
        "scale": jnp.ones(4, jnp.bfloat16),
        "frozen_ids": jnp.arange(3),  # int leaf: never selected, never changed
    }


def _data():
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (16, 5)), jax.random.normal(ky, (16, 4))


def _loss(params, x, y):
    pred = (x @ params["w"] + params["b"]) * params["scale"].astype(jnp.float32)
    return jnp.mean((pred - y) ** 2)


TXS = {
    "chain": lambda: optax.chain(osel.selective_id3(budget=11, max_steps=4), optax.adam(0.05)),
    "wrapper": lambda: osel.selective_id3(
        budget=11, max_steps=4, inner=optax.adamw(0.05, weight_decay=0.1)
    ),
    "multisteps": lambda: optax.MultiSteps(
        osel.selective_id3(budget=11, max_steps=4, inner=optax.adamw(0.05)), every_k_schedule=2
    ),
}


def _make_step(tx):
    x, y = _data()

    @jax.jit
    def step(params, state):
        floats = {k: v for k, v in params.items() if k != "frozen_ids"}
        grads = jax.grad(lambda f: _loss({**params, **f}, x, y))(floats)
        grads["frozen_ids"] = jnp.zeros_like(params["frozen_ids"])  # as an int leaf's "grad"
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _run(step, params, state, n):
    for _ in range(n):
        params, state = step(params, state)
    return params, state


def _assert_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


@pytest.mark.parametrize("form", sorted(TXS))
def test_resume_with_standard_checkpointer(tmp_path, form):
    tx = TXS[form]()
    step = _make_step(tx)
    params0 = _params()
    full_params, full_state = _run(step, params0, tx.init(params0), STEPS)

    mid_params, mid_state = _run(step, params0, tx.init(params0), SPLIT)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", {"params": mid_params, "opt_state": mid_state})
    del mid_params, mid_state

    # A fresh start: build the target from a new init, restore, continue.
    fresh_tx = TXS[form]()
    target = {"params": _params(), "opt_state": fresh_tx.init(_params())}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "ckpt", _abstract(target))
    restored_state = osel.find_selective_state(restored["opt_state"])
    assert isinstance(restored_state, osel.SelectiveState) and type(restored_state).method_name == "id3"
    assert osel.budget_used(restored["opt_state"]) < 11  # the mask was still growing
    params, state = _run(
        _make_step(fresh_tx), restored["params"], restored["opt_state"], STEPS - SPLIT
    )

    _assert_equal(params, full_params)
    _assert_equal(osel.selected_mask(state), osel.selected_mask(full_state))
    _assert_equal(state, full_state)
    if form != "multisteps":  # MultiSteps makes one inner update per 2 steps: still growing
        assert osel.budget_used(state) == 11
    osel.verify(params0, params, state, budget=11)


def test_resume_with_checkpoint_manager_args_api(tmp_path):
    tx = TXS["wrapper"]()
    step = _make_step(tx)
    params0 = _params()
    full_params, full_state = _run(step, params0, tx.init(params0), STEPS)

    params, state = params0, tx.init(params0)
    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        for i in range(SPLIT):
            params, state = step(params, state)
            mngr.save(
                i,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(state)
                ),
            )
        mngr.wait_until_finished()

    with ocp.CheckpointManager(tmp_path / "run") as mngr:
        assert mngr.latest_step() == SPLIT - 1
        target = tx.init(params0)
        restored = mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params0)),
                opt_state=ocp.args.StandardRestore(_abstract(target)),
            ),
        )
    params, state = _run(step, restored["params"], restored["opt_state"], STEPS - SPLIT)
    _assert_equal(params, full_params)
    _assert_equal(state, full_state)


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def _nnx_setup():
    model = _Net(nnx.Rngs(0))
    tx = osel.selective_id3(budget=20, max_steps=4, inner=optax.adamw(0.05, weight_decay=0.1))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def _nnx_step(model, opt, x, y):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)


def test_resume_nnx_optimizer(tmp_path):
    x, y = _data()
    model, opt = _nnx_setup()
    for _ in range(STEPS):
        _nnx_step(model, opt, x, y)
    full_params = nnx.state(model, nnx.Param)
    full_mask = osel.selected_mask(opt.opt_state)

    model, opt = _nnx_setup()
    for _ in range(SPLIT):
        _nnx_step(model, opt, x, y)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", {"model": nnx.state(model), "opt": nnx.state(opt)})

    model, opt = _nnx_setup()
    target = {"model": nnx.state(model), "opt": nnx.state(opt)}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "ckpt", _abstract(target))
    nnx.update(model, restored["model"])
    nnx.update(opt, restored["opt"])
    assert 0 < osel.budget_used(opt.opt_state) < 20
    for _ in range(STEPS - SPLIT):
        _nnx_step(model, opt, x, y)
    _assert_equal(nnx.state(model, nnx.Param), full_params)
    _assert_equal(osel.selected_mask(opt.opt_state), full_mask)
    assert osel.budget_used(opt.opt_state) == 20


def test_resume_detects_a_lost_mask(tmp_path):
    """The check above can fail: restoring a state whose mask was reset diverges."""
    tx = TXS["chain"]()
    step = _make_step(tx)
    params0 = _params()
    full_params, _ = _run(step, params0, tx.init(params0), STEPS)
    mid_params, mid_state = _run(step, params0, tx.init(params0), SPLIT)
    sel = osel.find_selective_state(mid_state)
    broken = jax.tree.map(
        lambda s: (
            s._replace(mask=jax.tree.map(jnp.zeros_like, s.mask))
            if isinstance(s, osel.SelectiveState)
            else s
        ),
        mid_state,
        is_leaf=lambda s: isinstance(s, osel.SelectiveState),
    )
    assert osel.budget_used(broken) == 0 < osel.budget_used(sel)
    params, _ = _run(step, mid_params, broken, STEPS - SPLIT)
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full_params))
    )


def test_state_saved_on_cuda_restores_on_cpu(cuda_fixture):
    """tests/data/saved_on_cuda/state holds cuda:0 arrays; the CPU target decides placement."""
    fixture, make_fixture = cuda_fixture
    expected = np.load(os.path.join(fixture, "expected.npz"))
    params, tx = make_fixture.fixture_params_and_tx()
    target = {"params": params, "opt_state": tx.init(params)}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(fixture, "state"), _abstract(target))
    mask = osel.selected_mask(restored["opt_state"])
    assert int(osel.find_selective_state(restored["opt_state"]).count) == int(expected["count"])
    for key in params:
        assert list(restored["params"][key].devices())[0].platform == "cpu"
        np.testing.assert_array_equal(
            np.asarray(restored["params"][key]).astype(np.float32), expected[f"p_{key}"]
        )
        np.testing.assert_array_equal(np.asarray(mask[key]), expected[f"m_{key}"])
    # ... and training continues on CPU from there.
    step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p))
    _, state = step(restored["params"], restored["opt_state"])
    assert osel.budget_used(state) > osel.budget_used(restored["opt_state"])
