"""Edges of the transform (issue 12): signed zeros, zero-size leaves, float16 in the chain
form, ID3's exponent, the same keywords on every factory."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_selective as osel

# every method, built the same way (wrapper form unless the test says otherwise)
FACTORIES = {
    "id3": lambda **kw: osel.selective_id3(2, 2, **kw),
    "pafi": lambda **kw: osel.selective_pafi(2, **kw),
    "bitfit": lambda **kw: osel.selective_bitfit(2, **kw),
    "fish": lambda **kw: osel.selective_fish(2, 1, **kw),
    "random": lambda **kw: osel.selective_random(2, seed=3, **kw),
}


def _bits(x):
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}")


def _signed_zero_params():
    # -0.0 and +0.0 both large in number so PaFI (smallest |θ|) must leave some unselected
    return {
        "w": jnp.array([-0.0, 0.0, -0.0, 5.0, -0.0, 3.0], jnp.float32),
        "b": jnp.array([-0.0, 1.0], jnp.float32),
    }


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_wrapper_form_keeps_unselected_negative_zero_bit_exact(name, compact):
    params = _signed_zero_params()
    tx = FACTORIES[name](inner=optax.adam(0.1), compact=compact)
    state = tx.init(params)
    p = params
    grads = {"w": jnp.arange(1.0, 7.0), "b": jnp.array([2.0, 1.0])}
    for _ in range(2):
        u, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, u)
    mask = osel.selected_mask(state)
    kept_zeros = 0
    for k in params:
        keep = ~np.asarray(mask[k])
        kept_zeros += int(np.sum(keep & (_bits(params[k]) == 0x80000000)))
        np.testing.assert_array_equal(_bits(p[k])[keep], _bits(params[k])[keep])
    assert kept_zeros > 0  # the test exercises an unselected -0.0
    osel.verify(params, p, state, budget=2)


@pytest.mark.parametrize("inner", [optax.sgd(0.1), optax.sgd(0.1, momentum=0.9), optax.adam(0.1)])
def test_chain_form_keeps_unselected_negative_zero_bit_exact(inner):
    params = _signed_zero_params()
    tx = optax.chain(osel.selective_pafi(2), inner)
    state = tx.init(params)
    u, state = tx.update({"w": jnp.ones(6), "b": jnp.ones(2)}, state, params)
    p = optax.apply_updates(params, u)
    osel.verify(params, p, state, budget=2)


def test_verify_compares_bit_patterns():
    params = {"w": jnp.array([0.0, 1.0])}
    state = osel.selective_pafi(1).init({"w": jnp.array([5.0, 0.5])})  # selects w[1]
    with pytest.raises(osel.VerificationError, match="1 unselected entries changed"):
        osel.verify(params, {"w": jnp.array([-0.0, 2.0])}, state, budget=1)
    nan_a = np.array([np.nan, 1.0], np.float32)
    nan_b = nan_a.copy()
    nan_b.view(np.uint32)[0] ^= 1  # another NaN payload
    with pytest.raises(osel.VerificationError):
        osel.verify({"w": nan_a}, {"w": nan_b}, state, budget=1)
    osel.verify({"w": nan_a}, {"w": nan_a.copy()}, state, budget=1)


def test_changed_entries_is_the_one_bitwise_rule():
    from optax_selective.verify import changed_entries

    a = np.array([0.0, np.nan, 1.0, -0.0], np.float32)
    b = np.array([-0.0, np.nan, 1.0, -0.0], np.float32)
    assert changed_entries(a, b).tolist() == [True, False, False, False]
    h = jnp.array([0.0, 1.0], jnp.bfloat16)
    assert changed_entries(h, -h).tolist() == [True, True]
    c = np.array([1 + 0j, complex(-0.0, 0.0)], np.complex128)
    assert changed_entries(c, np.array([1 + 0j, 0j])).tolist() == [False, True]


@pytest.mark.parametrize(
    "factory",
    [
        lambda **kw: osel.selective_fish(5, 3, **kw),
        lambda **kw: osel.selective_random(5, seed=7, **kw),
    ],
    ids=["fish", "random"],
)
def test_compact_fish_and_random_equal_the_dense_form(factory):
    """Every factory takes compact=; compact FISH / random give the dense form's params."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params) for _ in range(5)]
    out = {}
    for compact in (True, False):
        tx = factory(inner=optax.adamw(0.1, weight_decay=0.1), compact=compact)
        state, p = tx.init(params), params
        step = jax.jit(tx.update)
        for g in grads:
            u, state = step(g, state, p)
            p = optax.apply_updates(p, u)
        osel.verify(params, p, state, budget=5)
        out[compact] = p, osel.selected_mask(state)
        state_size = sum(x.size for x in jax.tree.leaves(state.inner_state))
        assert state_size < 30 if compact else state_size >= 30  # compact= is honoured
    (p_c, m_c), (p_d, m_d) = out[True], out[False]
    for k in params:
        np.testing.assert_array_equal(m_c[k], m_d[k])
        # same arithmetic on other shapes: XLA may round the last bit differently
        np.testing.assert_allclose(p_c[k], p_d[k], rtol=1e-6, atol=1e-7)
        unselected = ~np.asarray(m_c[k])
        np.testing.assert_array_equal(_bits(p_c[k])[unselected], _bits(params[k])[unselected])


ALL = dict(FACTORIES, fft=lambda **kw: osel.selective_fft(inner=kw["inner"]))


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_size_leaves_in_the_wrapper_form(name, compact):
    params = {"a": jnp.array([0.5, -1.0, 2.0]), "b": jnp.zeros(0), "c": jnp.zeros((0, 4), jnp.bfloat16)}
    kw = {"inner": optax.adamw(0.1, weight_decay=0.1)}
    if name != "fft":
        kw["compact"] = compact
    tx = ALL[name](**kw)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    u, state = tx.update(grads, state, params)
    assert u["b"].shape == (0,) and u["c"].shape == (0, 4) and u["c"].dtype == jnp.bfloat16
    p = optax.apply_updates(params, u)
    osel.verify(params, p, state, budget=3)


def test_id3_accepts_any_finite_exp():
    params = {"w": jnp.array([0.1, 1.0, 10.0, 100.0])}
    grads = {"w": jnp.array([1.0, 1.0, 1.0, 1.0])}
    tx = osel.selective_id3(1, 1, exp=-1.0)  # score |g| * (|θ| + eps): the largest θ wins
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    assert osel.selected_mask(state)["w"].tolist() == [False, False, False, True]
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="exp must be a finite number"):
            osel.selective_id3(1, 1, exp=bad)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        osel.selective_id3(1, 1, eps=-1.0)


def test_chain_form_warns_once_for_float16():
    params = {"w": jnp.ones(3, jnp.float16), "v": jnp.ones(2, jnp.float16)}
    tx = optax.chain(osel.selective_pafi(1), optax.adam(0.1))
    with pytest.warns(UserWarning, match="float16") as record:
        tx.init(params)
    assert len([r for r in record if "float16" in str(r.message)]) == 1
    assert "selective_pafi(..., inner=optimizer)" in str(record[0].message)
    with warnings.catch_warnings():  # the wrapper form is exact: no warning
        warnings.simplefilter("error")
        osel.selective_pafi(1, inner=optax.adam(0.1)).init(params)
        optax.chain(osel.selective_pafi(1), optax.adam(0.1)).init({"w": jnp.ones(3, jnp.bfloat16)})


def test_the_one_exception_subnormals_flushed_by_xla_cpu():
    """docs/concepts-guarantees.md: XLA's CPU arithmetic flushes subnormals to zero, so an
    unselected subnormal reads back as a zero of its sign. verify reports it (bits differ).
    If XLA stops flushing, this test fails and the documented exception can go."""
    if jax.default_backend() != "cpu":
        pytest.skip("the exception is specific to XLA's CPU backend")
    params = {"w": jnp.array([5.0, 1e-40, -1e-40], jnp.float32)}
    tx = osel.selective_pafi(1, inner=optax.sgd(0.1))
    state = tx.init({"w": jnp.array([0.0, 5.0, 5.0])})  # select w[0] only
    u, state = tx.update({"w": jnp.ones(3)}, state, params)
    after = optax.apply_updates(params, u)
    assert _bits(after["w"])[1:].tolist() == [0x00000000, 0x80000000]  # flushed, sign kept
    with pytest.raises(osel.VerificationError, match="2 unselected entries changed"):
        osel.verify(params, after, state, budget=1)
