"""The transformation in use: both forms, optax wrappers, flax.nnx, dtypes, bad input, and
resuming from an orbax checkpoint exactly like an unbroken run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import optax_selective as osel


def params_and_grads(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
        "out": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    }
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    return params, grads


def run(tx, params, grads, steps):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(steps):
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state, step


ALL_METHODS = {
    "id3": lambda **kw: osel.selective_id3(10, 3, **kw),
    "pafi": lambda **kw: osel.selective_pafi(10, **kw),
    "bitfit": lambda **kw: osel.selective_bitfit(10, **kw),
}


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_wrapper_form_keeps_unselected_entries_bit_identical_under_adamw(name):
    params, grads = params_and_grads()
    tx = ALL_METHODS[name](inner=optax.adamw(0.1, weight_decay=0.1))
    after, state, step = run(tx, params, grads, steps=5)
    osel.verify(params, after, state, budget=10)
    assert step._cache_size() == 1
    changed = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(after)))
    assert 0 < changed <= 10


def test_chain_form_with_adamw_is_caught_by_verify():
    params, grads = params_and_grads()
    tx = optax.chain(osel.selective_id3(10, 3), optax.adamw(0.1, weight_decay=0.1))
    after, state, _ = run(tx, params, grads, steps=3)
    with pytest.raises(osel.VerificationError, match="unselected entries changed"):
        osel.verify(params, after, state, budget=10)


def test_chain_form_with_adam_is_exact():
    params, grads = params_and_grads()
    tx = optax.chain(osel.selective_id3(10, 3), optax.adam(0.1))
    after, state, _ = run(tx, params, grads, steps=4)
    osel.verify(params, after, state, budget=10)


def test_verify_reports_budget_overshoot():
    params, grads = params_and_grads()
    after, state, _ = run(osel.selective_pafi(10, inner=optax.sgd(0.1)), params, grads, 1)
    with pytest.raises(osel.VerificationError, match="over the budget of 5"):
        osel.verify(params, after, state, budget=5)


def test_wrapper_equals_chain_for_sgd():
    params, grads = params_and_grads()
    a, _, _ = run(osel.selective_id3(10, 3, inner=optax.sgd(0.1)), params, grads, 4)
    b, _, _ = run(optax.chain(osel.selective_id3(10, 3), optax.sgd(0.1)), params, grads, 4)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_late_unmasked_entries_see_global_adam_step_count():
    # DESIGN.md section 4: the inner optimizer's count is global, moments start at zero.
    params = {"w": jnp.array([1.0, 1.0])}
    tx = osel.selective_id3(2, 2, inner=optax.adam(1.0))
    state = tx.init(params)
    g0, g1 = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}
    _, state = tx.update(g0, state, params)
    updates, state = tx.update(g1, state, params)
    # entry 1 joins at the second step: m = 0.1, v = 0.001, bias-corrected with count 2.
    m_hat, v_hat = 0.1 / (1 - 0.9**2), 0.001 / (1 - 0.999**2)
    np.testing.assert_allclose(updates["w"][1], -m_hat / (np.sqrt(v_hat) + 1e-8), rtol=1e-4)


def test_nan_gradients_do_not_leak_into_unselected_entries():
    params = {"w": jnp.ones(4)}
    tx = osel.selective_pafi(2, inner=optax.sgd(1.0))
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.array([1.0, 1.0, jnp.nan, jnp.nan])}, state, params)
    assert updates["w"].tolist() == [-1.0, -1.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_are_preserved(dtype):
    params = jax.tree.map(lambda p: p.astype(dtype), params_and_grads()[0])
    grads = jax.tree.map(jnp.ones_like, params)
    tx = osel.selective_id3(10, 2, inner=optax.adam(0.1))
    updates, state = tx.update(grads, tx.init(params), params)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    assert state.count.dtype == jnp.int32
    assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(osel.selected_mask(state)))


def test_count_saturates_instead_of_overflowing():
    params = {"w": jnp.ones(2)}
    tx = osel.selective_pafi(1)
    state = tx.init(params)._replace(count=jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32))
    _, state = tx.update({"w": jnp.ones(2)}, state, params)
    assert int(state.count) == jnp.iinfo(jnp.int32).max


def test_multisteps_accumulates_before_selecting():
    params, grads = params_and_grads()
    tx = optax.MultiSteps(osel.selective_id3(10, 2, inner=optax.sgd(0.1)), every_k_schedule=2)
    after, state, step = run(tx, params, grads, steps=4)
    assert osel.budget_used(state) == 10
    assert int(osel.find_selective_state(state).count) == 2
    osel.verify(params, after, state, budget=10)
    assert step._cache_size() == 1


def test_inject_hyperparams_on_inner_and_on_id3_scalars():
    params, grads = params_and_grads()
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
    tx = optax.inject_hyperparams(osel.selective_id3, static_args=("budget", "max_steps"))(
        budget=10, max_steps=3, exp=1.0, eps=1e-3, inner=inner
    )
    after, state, step = run(tx, params, grads, steps=3)
    assert osel.budget_used(state) == 10
    osel.verify(params, after, state, budget=10)
    assert step._cache_size() == 1


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def test_flax_nnx_optimizer_loop():
    model = MLP(nnx.Rngs(0))
    before = jax.tree.map(jnp.array, nnx.state(model, nnx.Param))
    head = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: "l2" in jax.tree_util.keystr(path), p)  # noqa: E731
    tx = osel.selective_id3(30, 5, choose_all=head, inner=optax.adamw(1e-2, weight_decay=0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (16, 5))
    y = jnp.arange(16) % 2

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(8)]
    assert losses[-1] < losses[0]
    assert osel.budget_used(optimizer.opt_state) == 30
    assert np.asarray(osel.selected_mask(optimizer.opt_state)["l2"]["kernel"]).all()
    osel.verify(before, nnx.state(model, nnx.Param), optimizer.opt_state, budget=30)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: osel.selective_id3(0, 5), ValueError, "budget must be in"),
        (lambda: osel.selective_id3(-3, 5), ValueError, "got -3"),
        (lambda: osel.selective_id3(2.5, 5), TypeError, "budget must be an int, got 2.5"),
        (lambda: osel.selective_id3(True, 5), TypeError, "budget"),
        (lambda: osel.selective_pafi("10"), TypeError, "budget"),
        (lambda: osel.selective_id3(10, 0), ValueError, r"max_steps must be in \[1, 2147483647\], got 0"),
        (lambda: osel.selective_id3(10, 2.0), TypeError, "max_steps must be an int, got 2.0"),
        (lambda: osel.selective_id3(10, 5, eps=-1.0), ValueError, "eps must be >= 0"),
        (lambda: osel.selective_id3(10, 5, inner=lambda x: x), TypeError, "inner must be"),
    ],
)
def test_bad_arguments_at_construction(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "tx, params, match",
    [
        (osel.selective_id3(100, 5), {"w": jnp.ones(10)}, "budget 100 is larger than the 10 eligible"),
        (osel.selective_pafi(11), {"w": jnp.ones(10)}, "use selective_fft"),
        (osel.selective_id3(4, 5, choose_all={"a": True, "b": False}), {"a": jnp.ones(4), "b": jnp.ones(4)}, "hold 4 entries but budget is 4"),
        (osel.selective_pafi(3, choose_all={"a": True, "b": False}), {"a": jnp.ones(4), "b": jnp.ones(4)}, "hold 4 entries but budget is 3"),
        (osel.selective_id3(2, 5), {}, "empty pytree"),
        (osel.selective_pafi(2), {"n": jnp.arange(4)}, "no floating-point leaves"),
        (osel.selective_pafi(2, choose_all={"x": True}), {"w": jnp.ones(4)}, "choose_all must be a bool pytree prefix"),
        (osel.selective_pafi(2, choose_all={"w": "yes"}), {"w": jnp.ones(4)}, "choose_all leaves must be Python bools"),
    ],
)
def test_bad_params_at_init(tx, params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tx.init(params)


def test_inject_hyperparams_without_static_budget_says_what_to_do():
    params, grads = params_and_grads()
    tx = optax.inject_hyperparams(osel.selective_id3)(budget=10, max_steps=3)
    with pytest.raises(TypeError, match="add 'budget' to static_args"):
        jax.jit(tx.update)(grads, tx.init(params), params)


def test_id3_without_params_raises_optax_style():
    params = {"w": jnp.ones(3)}
    tx = osel.selective_id3(2, 2)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


def test_selected_mask_needs_exactly_one_selective_state():
    with pytest.raises(ValueError, match="found 0"):
        osel.selected_mask(optax.adam(1e-3).init({"w": jnp.ones(2)}))


# Resume: an optimizer state saved with orbax mid-run continues exactly like an unbroken run.

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
