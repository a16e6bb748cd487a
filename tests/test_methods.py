"""Each method selects exactly what DESIGN.md section 3 says, checked against numpy."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import optax_selective as osel


def flat(tree):
    return np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(tree)])


def ranked(score, k, exclude):
    """Global top-k by (score desc, global index asc) among finite, non-excluded entries."""
    order = np.lexsort((np.arange(score.size), -score))
    return [i for i in order if np.isfinite(score[i]) and not exclude[i]][:k]


def random_params(seed, shapes):
    rng = np.random.default_rng(seed)
    return {f"p{i}": jnp.asarray(rng.normal(size=s).astype(np.float32)) for i, s in enumerate(shapes)}


leaf_shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
)


@settings(max_examples=25)
@given(shapes=leaf_shapes, seed=st.integers(0, 1000), data=st.data())
def test_id3_exact_budget_after_max_steps(shapes, seed, data):
    params = random_params(seed, shapes)
    n = flat(params).size
    budget = data.draw(st.integers(1, n))
    max_steps = data.draw(st.integers(1, 6))
    tx = osel.selective_id3(budget, max_steps, eps=1e-3)
    state = tx.init(params)
    rng = np.random.default_rng(seed + 1)
    used = []
    for _ in range(max_steps + 2):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        _, state = tx.update(grads, state, params)
        used.append(osel.budget_used(state))
    assert used[max_steps - 1] == budget
    assert used[-1] == budget  # frozen afterwards
    assert all(b <= a for b, a in zip(used, used[1:]))  # only grows


def test_id3_picks_top_k_by_d3_score_each_step():
    params = random_params(0, [(3, 5), (7,), (2, 2, 2)])
    budget, max_steps, exp, eps = 13, 4, 2.0, 0.1
    tx = optax.chain(osel.selective_id3(budget, max_steps, exp=exp, eps=eps), optax.sgd(0.1))
    state = tx.init(params)
    step = jax.jit(tx.update)
    rng = np.random.default_rng(1)
    want = np.zeros(flat(params).size, bool)
    for t in range(max_steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        score = np.abs(flat(grads)) / (np.abs(flat(params)) + eps) ** exp
        k = budget // max_steps + (1 if t < budget % max_steps else 0)
        want[ranked(score, k, want)] = True
        updates, state = step(grads, state, params)
        np.testing.assert_array_equal(flat(osel.selected_mask(state)), want)
        params = optax.apply_updates(params, updates)
    assert step._cache_size() == 1  # no recompilation after the first step


def test_id3_budget_smaller_than_max_steps():
    params = {"w": jnp.arange(1.0, 11.0)}
    tx = osel.selective_id3(3, 10)
    state = tx.init(params)
    used = []
    for _ in range(10):
        _, state = tx.update({"w": jnp.ones(10)}, state, params)
        used.append(osel.budget_used(state))
    assert used == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]


def test_id3_never_selects_non_finite_scores():
    params = {"a": jnp.ones(4), "b": jnp.ones(3)}
    grads = {"a": jnp.array([jnp.nan, 1.0, jnp.inf, 0.5]), "b": jnp.array([jnp.nan] * 3)}
    tx = osel.selective_id3(6, 1)
    _, state = tx.update(grads, tx.init(params), params)
    mask = osel.selected_mask(state)
    assert mask["a"].tolist() == [False, True, False, True] and not mask["b"].any()


def test_id3_prefers_real_gradients_over_zero_ties():
    # Reference defect: with a cutoff score of 0, early leaves' zero-gradient entries took
    # the budget. Here the entry with a real gradient always wins.
    params = {"a": jnp.ones(5), "b": jnp.ones(2)}
    grads = {"a": jnp.zeros(5), "b": jnp.array([0.0, 1e-6])}
    tx = osel.selective_id3(2, 1)
    _, state = tx.update(grads, tx.init(params), params)
    mask = osel.selected_mask(state)
    assert mask["b"].tolist() == [False, True] and mask["a"].tolist() == [True] + [False] * 4


@settings(max_examples=25)
@given(shapes=leaf_shapes, seed=st.integers(0, 1000), data=st.data())
def test_pafi_picks_smallest_magnitudes(shapes, seed, data):
    params = random_params(seed, shapes)
    n = flat(params).size
    budget = data.draw(st.integers(1, n))
    state = osel.selective_pafi(budget).init(params)
    want = np.zeros(n, bool)
    want[ranked(-np.abs(flat(params)), budget, want)] = True
    np.testing.assert_array_equal(flat(osel.selected_mask(state)), want)


def test_pafi_ties_go_to_lower_global_index():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
    mask = osel.selected_mask(osel.selective_pafi(4).init(params))
    assert mask["a"].all() and mask["b"].tolist() == [True, False, False]


def test_bitfit_takes_bias_leaves_in_order_last_partly():
    params = {"a_w": jnp.ones((2, 3)), "b_bias": jnp.ones(4), "c_ln": jnp.ones(3), "d": jnp.ones(())}
    mask = osel.selected_mask(osel.selective_bitfit(6).init(params))
    assert not mask["a_w"].any()
    assert mask["b_bias"].all()
    assert mask["c_ln"].tolist() == [True, True, False]
    assert not mask["d"]


def test_bitfit_selects_all_biases_when_budget_is_larger():
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
    state = osel.selective_bitfit(100).init(params)
    assert osel.budget_used(state) == 3


def test_bitfit_custom_predicate_on_path():
    params = {"bias": jnp.ones((2, 2)), "scale": jnp.ones(2)}
    tx = osel.selective_bitfit(10, is_bias=lambda path, shape: "bias" in path)
    mask = osel.selected_mask(tx.init(params))
    assert mask["bias"].all() and not mask["scale"].any()


def test_fft_selects_every_float_entry_and_no_int_entry():
    params = {"w": jnp.ones((2, 2)), "steps": jnp.zeros(3, jnp.int32)}
    mask = osel.selected_mask(osel.selective_fft().init(params))
    assert mask["w"].all() and not mask["steps"].any()


@pytest.mark.parametrize(
    "make",
    [
        lambda ca: osel.selective_id3(6, 2, choose_all=ca),
        lambda ca: osel.selective_pafi(6, choose_all=ca),
        lambda ca: osel.selective_bitfit(6, choose_all=ca),
    ],
    ids=["id3", "pafi", "bitfit"],
)
@pytest.mark.parametrize("as_callable", [False, True])
def test_choose_all_counts_toward_budget(make, as_callable):
    params = {"body": {"w": jnp.arange(1.0, 13.0).reshape(3, 4), "b": jnp.ones(4)}, "head": jnp.ones(4)}
    spec = {"body": False, "head": True}
    tx = make((lambda p: spec) if as_callable else spec)
    state = tx.init(params)
    assert osel.selected_mask(state)["head"].all()
    for _ in range(2):
        _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert osel.budget_used(state) == 6


def test_non_float_leaves_are_never_selected_or_changed():
    params = {"w": jnp.array([3.0, 1.0]), "n": jnp.array([1, 2], jnp.int32)}
    tx = osel.selective_pafi(2, inner=optax.sgd(1.0))
    state = tx.init(params)
    assert not osel.selected_mask(state)["n"].any()
    grads = {"w": jnp.ones(2), "n": jnp.ones(2, jnp.int32)}
    updates, _ = tx.update(grads, state, params)
    assert updates["n"].tolist() == [0, 0]
