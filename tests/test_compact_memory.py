"""Compact state at LLM scale: per-leaf indexing, 16-bit leaves, and XLA's compiled memory.

Nothing here allocates model-sized arrays: large shapes are ``jax.ShapeDtypeStruct`` and go
through ``jax.eval_shape`` / ``.lower()`` only; the index logic is checked on small values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_selective as osel
from optax_selective import compact


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16) if x.dtype.itemsize == 2 else x.view(np.uint32)


def _train(tx, params, steps, seed=0):
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        params, state = step(grads, state, params)
    return params, state


def _model(dtype=jnp.bfloat16):
    rng = np.random.default_rng(1)
    shapes = {"emb": (40, 8), "w1": (8, 16), "b1": (16,), "w2": (16, 8), "norm": (8,), "s": ()}
    return {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in shapes.items()}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("method", ["id3", "pafi"])
def test_16bit_compact_matches_the_dense_state(dtype, method):
    """bfloat16: bit for bit. float16: XLA:CPU may keep a fused float16 expression in float32
    (it drops convert pairs), so the two forms' Adam arithmetic can differ in the last bit."""
    params = _model(dtype)
    make = {
        "id3": lambda c: osel.selective_id3(60, 3, inner=optax.adamw(1e-2, weight_decay=0.1), compact=c),
        "pafi": lambda c: osel.selective_pafi(60, inner=optax.adamw(1e-2, weight_decay=0.1), compact=c),
    }[method]
    dense, dense_state = _train(make(False), params, 5)
    small, small_state = _train(make(True), params, 5)
    assert isinstance(small_state.inner_state, compact.CompactState)
    for k in params:
        assert dense[k].dtype == small[k].dtype == dtype
        if dtype == jnp.bfloat16:
            np.testing.assert_array_equal(_bits(dense[k]), _bits(small[k]), err_msg=k)
        else:
            np.testing.assert_allclose(np.asarray(dense[k], np.float32), np.asarray(small[k], np.float32), rtol=2e-3, atol=1e-4, err_msg=k)
    for a, b in zip(jax.tree.leaves(dense_state.mask), jax.tree.leaves(small_state.mask)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_slots_index_within_each_leaf():
    params = {"a": jnp.array([5.0, 0.1, 7.0]), "b": jnp.array([[0.2, 9.0], [8.0, 0.0]])}
    state = osel.selective_pafi(3, inner=optax.sgd(0.1)).init(params)
    inner = state.inner_state
    # PaFI picks the three smallest |θ|: a[1], b[0, 0] and b[1, 1], listed in leaf order.
    assert np.asarray(inner.leaf[0]).tolist() == [0, 1, 1]
    assert np.asarray(inner.slots[0]).tolist() == [1, 0, 3]
    assert inner.leaf[0].dtype == jnp.int16  # 2 bytes per slot while leaves fit int16


def test_leaf_ids_widen_past_int16():
    assert compact.leaf_id_dtype(32767) == jnp.int16
    assert compact.leaf_id_dtype(32768) == jnp.int32


def test_id3_new_entries_get_their_leaf_and_index():
    params = {"a": jnp.ones(4), "b": jnp.ones((2, 3))}
    tx = osel.selective_id3(3, 1, inner=optax.sgd(1.0))
    state = tx.init(params)
    grads = {"a": jnp.array([0.0, 3.0, 0.0, 0.0]), "b": jnp.array([[0.0, 0.0, 2.0], [0.0, 5.0, 0.0]])}
    updates, state = tx.update(grads, state, params)
    got = sorted(zip(np.asarray(state.inner_state.leaf[0]).tolist(), np.asarray(state.inner_state.slots[0]).tolist()))
    assert got == [(0, 1), (1, 2), (1, 4)]
    np.testing.assert_array_equal(np.asarray(updates["b"]), [[0.0, 0.0, -2.0], [0.0, -5.0, 0.0]])


def test_more_than_2_31_entries_of_one_dtype_are_accepted():
    # Three bf16 leaves of 2**30 entries: 3 * 2**30 > 2**31 in total, each leaf indexable.
    params = {f"w{i}": jax.ShapeDtypeStruct((2**15, 2**15), jnp.bfloat16) for i in range(3)}
    for tx in (osel.selective_id3(1000, 10, inner=optax.adamw(0.1)), osel.selective_pafi(1000, inner=optax.adamw(0.1))):
        state = jax.eval_shape(tx.init, params)
        assert state.inner_state.slots[0].shape == (1000,)

        def step(g, s, p, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        jax.jit(step, donate_argnums=(1, 2)).lower(params, state, params)  # traces and lowers


@pytest.mark.parametrize(
    "make",
    [
        lambda: osel.selective_pafi(10, inner=optax.adamw(0.1)),
        lambda: optax.chain(osel.selective_id3(10, 2), optax.adam(0.1)),
        lambda: osel.selective_id3(10, 2, inner=optax.adamw(0.1), compact=False),
    ],
)
def test_a_leaf_of_2_31_entries_is_refused_clearly(make):
    params = {"b": jax.ShapeDtypeStruct((4,), jnp.bfloat16), "w": jax.ShapeDtypeStruct((2**31,), jnp.bfloat16)}
    with pytest.raises(ValueError, match=r"leaf \['w'\] of shape \(2147483648,\).*Split that parameter"):
        jax.eval_shape(make().init, params)


def _peak(tx, params):
    state = jax.eval_shape(tx.init, params)

    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    m = jax.jit(step, donate_argnums=(1, 2)).lower(params, state, params).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes, m.temp_size_in_bytes


@pytest.mark.slow
def test_16bit_step_temporaries_stay_near_one_update():
    # 24 bf16 leaves of 256 x 1024 (6.3M entries, 12 MiB): before, every leaf's update was
    # widened to float32 and every leaf's scatter indices were alive at once (temporaries
    # several times the parameters); now they are about one bf16 update plus O(budget).
    params = {f"w{i}": jax.ShapeDtypeStruct((256, 1024), jnp.bfloat16) for i in range(24)}
    n_bytes = 24 * 256 * 1024 * 2
    budget = 24 * 256 * 1024 // 200
    for tx in (osel.selective_pafi(budget, inner=optax.adamw(1e-3)), osel.selective_id3(budget, 100, inner=optax.adamw(1e-3))):
        _, temp = _peak(tx, params)
        assert temp <= 1.35 * n_bytes, (temp, n_bytes)
