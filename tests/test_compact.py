"""Compact inner state (optax_selective.compact) against the dense wrapper form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_selective as osel
from optax_selective import compact


def model(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {
        "emb": jnp.asarray(rng.normal(size=(7, 5)), dtype),
        "layer": {
            "kernel": jnp.asarray(rng.normal(size=(5, 6)) * 0.1, dtype),
            "bias": jnp.zeros(6, dtype),
            "scale": jnp.asarray(1.5, dtype),
        },
        "head": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
        "steps": jnp.asarray(3, jnp.int32),
    }


def grads_at(params, step):
    rng = np.random.default_rng(100 + step)
    out = {}
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        if jnp.issubdtype(p.dtype, jnp.floating):
            g = rng.normal(size=p.shape) * (1 + 3 * (rng.random(size=p.shape) < 0.1))
            out[jax.tree_util.keystr(path)] = jnp.asarray(g, p.dtype)
        else:
            out[jax.tree_util.keystr(path)] = jnp.zeros_like(p)
    return jax.tree_util.tree_map_with_path(lambda path, _: out[jax.tree_util.keystr(path)], params)


def train(tx, params, steps, jit_init=False, settle=False):
    """``steps`` jitted updates. ``settle``: start from the state's dtypes after one update, so
    the reference compiles once (optax's adam-family moments of the int leaf turn int32 into
    float32 after the first step, which would compile the step a second time)."""
    state = (jax.jit(tx.init) if jit_init else tx.init)(params)
    if settle:
        after = jax.eval_shape(tx.update, grads_at(params, 0), state, params)[1]
        state = jax.tree.map(lambda x, s: x.astype(s.dtype), state, after)
    step = jax.jit(tx.update)
    for t in range(steps):
        updates, state = step(grads_at(params, t), state, params)
        params = optax.apply_updates(params, updates)
    return params, state, step


INNERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(0.05),
    "adamw": lambda: optax.adamw(0.05, weight_decay=0.3),
    "adamw_schedule": lambda: optax.adamw(optax.linear_schedule(0.05, 0.01, 6), weight_decay=0.1),
    "adagrad": lambda: optax.adagrad(0.1),
    "rmsprop": lambda: optax.rmsprop(0.01),
    "rmsprop_centered": lambda: optax.rmsprop(0.01, centered=True, momentum=0.5),
    "lion": lambda: optax.lion(0.01, weight_decay=0.1),
    "amsgrad": lambda: optax.amsgrad(0.05),
    "chain_clip_adam": lambda: optax.chain(optax.clip(0.5), optax.adam(0.05)),
    "inject_adamw": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=0.05, weight_decay=0.2),
}
HEAD = {"emb": False, "layer": False, "head": True, "steps": False}
METHODS = {  # name: (factory, budget)
    "id3": (lambda **kw: osel.selective_id3(12, 4, **kw), 12),
    "id3_slow": (lambda **kw: osel.selective_id3(5, 7, eps=1e-3, **kw), 5),  # budget < steps
    "id3_choose_all": (lambda **kw: osel.selective_id3(30, 3, choose_all=HEAD, **kw), 30),
    "pafi": (lambda **kw: osel.selective_pafi(10, **kw), 10),
    "bitfit": (lambda **kw: osel.selective_bitfit(9, **kw), 9),
}
CASES = [(m, i) for m in ("id3", "id3_choose_all") for i in sorted(INNERS)] + [
    (m, i) for m in ("id3_slow", "pafi", "bitfit") for i in ("adamw", "lion", "adagrad", "inject_adamw")
]


def assert_same(a, b, rtol=2e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("method, inner", CASES)
def test_compact_gives_the_dense_wrapper_params(method, inner):
    params = model()
    factory, budget = METHODS[method]
    dense, dense_state, _ = train(factory(inner=INNERS[inner](), compact=False), params, 6, settle=True)
    small, small_state, step = train(factory(inner=INNERS[inner]()), params, 6)
    assert isinstance(small_state.inner_state, compact.CompactState)
    assert not isinstance(dense_state.inner_state, compact.CompactState)
    assert_same(dense, small)
    jax.tree.map(np.testing.assert_array_equal, osel.selected_mask(dense_state), osel.selected_mask(small_state))
    osel.verify(params, small, small_state, budget=budget)
    assert step._cache_size() == 1


def test_late_unmasked_entry_gets_global_bias_correction():
    params = {"w": jnp.array([1.0, 1.0, 1.0])}
    tx = osel.selective_id3(2, 2, inner=optax.adam(1.0))
    state = tx.init(params)
    _, state = tx.update({"w": jnp.array([1.0, 0.0, 0.0])}, state, params)
    updates, state = tx.update({"w": jnp.array([0.0, 1.0, 0.0])}, state, params)
    m_hat, v_hat = 0.1 / (1 - 0.9**2), 0.001 / (1 - 0.999**2)
    np.testing.assert_allclose(updates["w"][1], -m_hat / (np.sqrt(v_hat) + 1e-8), rtol=1e-4)
    assert updates["w"][2] == 0.0
    assert np.asarray(state.inner_state.slots[0]).tolist() == [0, 1]


def test_mixed_dtypes_get_one_slot_buffer_each_and_keep_their_dtype():
    params = model()
    params["emb"] = params["emb"].astype(jnp.bfloat16)
    tx = osel.selective_id3(12, 3, inner=optax.adam(0.05))
    dense, _, _ = train(osel.selective_id3(12, 3, inner=optax.adam(0.05), compact=False), params, 4, settle=True)
    small, state, _ = train(tx, params, 4)
    assert sorted(str(s.dtype) for s in state.inner_state.inner_state[0].mu) == ["bfloat16", "float32"]
    assert [int(s.shape[0]) for s in state.inner_state.slots] == [12, 12]  # min(budget, entries)
    assert small["emb"].dtype == jnp.bfloat16
    assert_same(dense, small, rtol=1e-2, atol=1e-2)


def test_jitted_init_builds_the_same_slots_as_eager_init():
    params = model()
    tx = osel.selective_pafi(30, choose_all=HEAD, inner=optax.adam(0.1))
    eager, traced = tx.init(params), jax.jit(tx.init)(params)
    for a, b in zip(eager.inner_state.slots, traced.inner_state.slots):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    a, _, _ = train(tx, params, 3)
    b, _, _ = train(tx, params, 3, jit_init=True)
    assert_same(a, b, rtol=0, atol=0)


def test_state_is_o_budget():
    params = {"w": jnp.zeros((200, 100)), "b": jnp.zeros(100)}
    n = 20_100
    state = osel.selective_id3(50, 5, inner=optax.adamw(1e-3)).init(params)
    mask_bytes = sum(x.nbytes for x in jax.tree.leaves(state.mask))
    other = sum(x.nbytes for x in jax.tree.leaves(state)) - mask_bytes
    assert mask_bytes == n
    assert other <= 16 * 50 + 64, other  # slots 4 B + two moments 8 B per budget entry + scalars
    dense = osel.selective_id3(50, 5, inner=optax.adamw(1e-3), compact=False).init(params)
    assert sum(x.nbytes for x in jax.tree.leaves(dense)) > 8 * n


def test_nan_gradients_outside_the_mask_stay_out():
    params = {"w": jnp.ones(4)}
    tx = osel.selective_pafi(2, inner=optax.adam(1.0))
    updates, state = tx.update({"w": jnp.array([1.0, 1.0, jnp.nan, jnp.inf])}, tx.init(params), params)
    assert np.isfinite(np.asarray(updates["w"])).all()
    assert np.asarray(updates["w"])[2:].tolist() == [0.0, 0.0]
    assert np.isfinite(np.asarray(state.inner_state.inner_state[0].mu[0])).all()


def test_multisteps_and_fft_wrapper():
    params = model()
    ms = lambda c: optax.MultiSteps(osel.selective_id3(12, 2, inner=optax.adam(0.1), compact=c), every_k_schedule=2)  # noqa: E731
    a, _, _ = train(ms(True), params, 6)
    b, _, _ = train(ms(False), params, 6, settle=True)
    assert_same(a, b)
    # FFT has no budget: its wrapper stays dense (compact would be the same size).
    state = osel.selective_fft(inner=optax.adam(0.1)).init(params)
    assert not isinstance(state.inner_state, compact.CompactState)


def _coupled():
    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        total = sum(jnp.sum(u) for u in jax.tree.leaves(updates))
        return jax.tree.map(lambda u: u - total, updates), state

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize(
    "inner, match",
    [
        (lambda: optax.adafactor(1e-3), "scale_by_factored_rms|not on the allow-list"),
        (lambda: optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)), "masked"),
        (lambda: optax.chain(optax.clip_by_block_rms(1.0), optax.adam(1e-3)), "clip_by_block_rms"),
        (lambda: optax.multi_transform({"a": optax.adam(1e-3)}, lambda p: jax.tree.map(lambda _: "a", p)), "multi_transform|partition"),
        (_coupled, "_coupled"),
        (lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, mask=lambda p: p), "masked"),
    ],
)
def test_non_elementwise_inner_is_refused_with_a_pointer_to_compact_false(inner, match):
    with pytest.raises(ValueError, match=match) as err:
        osel.selective_id3(10, 3, inner=inner())
    assert "compact=False" in str(err.value)
    osel.selective_id3(10, 3, inner=inner(), compact=False)  # the dense form takes anything


def test_probe_catches_a_registered_transformation_that_is_not_elementwise():
    def scale_by_coupling():
        def init_fn(params):
            return optax.EmptyState()

        def update_fn(updates, state, params=None):
            return jax.tree.map(lambda u: u - jnp.mean(u), updates), state

        return optax.GradientTransformation(init_fn, update_fn)

    compact.register_elementwise("test_probe_catches_a_registered_transformation_that_is_not_elementwise")
    try:
        assert "numeric probe" in compact.compact_refusal(scale_by_coupling())
    finally:
        compact.allowlist._ELEMENTWISE.discard("test_probe_catches_a_registered_transformation_that_is_not_elementwise")
