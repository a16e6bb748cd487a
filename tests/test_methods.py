"""optax_selective.methods: each method selects exactly what DESIGN.md section 3 says, checked
against numpy (FISH and R-Mask: budget, ties, choose_all, jit, bad input)."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import optax_selective as osel
from optax_selective.methods.random import random_keys
from tests._reference import numpy_top_k


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
    step = jax.jit(tx.update)  # one program per example's shapes (eager: one per operation)
    rng = np.random.default_rng(seed + 1)
    used = []
    for _ in range(max_steps + 2):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        _, state = step(grads, state, params)
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


# FISH mask and R-Mask against numpy references: budget, ties, choose_all, jit, bad input.

def tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=5), jnp.float32),
        "head": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32),
        "ids": jnp.arange(3, dtype=jnp.int32),
    }


def float_tree(seed=0):
    # optax's Adam turns an int leaf's first moment into float on the first step, which
    # makes jax.jit retrace once; that is optax's behaviour, not ours, so jit tests with Adam
    # use float leaves only.
    return {k: v for k, v in tree(seed).items() if k != "ids"}


def grads_like(params, rng, ties=False):
    def one(p):
        if not jnp.issubdtype(p.dtype, jnp.floating):
            return jnp.zeros_like(p)
        if ties:  # few distinct values: the tie rule decides
            return jnp.asarray(rng.integers(-1, 2, size=p.shape), p.dtype)
        return jnp.asarray(rng.normal(size=p.shape), p.dtype)

    return jax.tree.map(one, params)


def mask_leaves(state):
    return [np.asarray(m) for m in jax.tree.leaves(osel.selected_mask(state))]


CHOOSE_HEAD = {"a": False, "b": False, "head": True, "ids": False}


# --------------------------------------------------------------------------- FISH


@pytest.mark.parametrize("ties", [False, True])
def test_fish_mask_is_numpy_fisher_top_k_with_choose_all(ties):
    params = tree()
    rng = np.random.default_rng(1)
    steps, budget = 3, 4 + 7  # head (4 entries) + 7 chosen by Fisher score
    grads = [grads_like(params, rng, ties) for _ in range(steps)]
    grads[1]["a"] = grads[1]["a"].at[0, 0].set(jnp.nan)  # non-finite Fisher: never chosen
    grads[2]["b"] = grads[2]["b"].at[4].set(jnp.inf)
    tx = osel.selective_fish(budget, steps, choose_all=CHOOSE_HEAD)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
        _, state = step(g, state, params)

    # Reference over the selectable leaves a, b (leaf order: a, b, head, ids).
    sums = [
        sum(np.asarray(g[k], np.float32) ** 2 for g in grads) for k in ("a", "b")
    ]
    want = numpy_top_k(sums, budget - 4)
    got = mask_leaves(state)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2].all() and not got[3].any()
    assert not got[0][0, 0] and not got[1][4]
    assert osel.budget_used(state) == budget
    fisher = state.method_state.fisher_sum
    np.testing.assert_allclose(np.asarray(fisher[0]), sums[0], rtol=1e-6)
    assert fisher[2].shape == (0,) and fisher[3].shape == (0,)  # choose_all, int: placeholders


def test_fish_scores_at_initial_values_then_trains_and_freezes():
    params = tree()
    rng = np.random.default_rng(2)
    steps, budget = 3, 9
    tx = osel.selective_fish(budget, steps, choose_all=CHOOSE_HEAD, inner=optax.sgd(0.5))
    state = tx.init(params)
    step = jax.jit(tx.update)
    p = params
    for t in range(steps + 3):
        before = p
        updates, state = step(grads_like(p, rng), state, p)
        p = optax.apply_updates(p, updates)
        if t < steps - 1:  # scoring: only choose_all moves
            assert osel.budget_used(state) == 4
            np.testing.assert_array_equal(p["a"], params["a"])
            np.testing.assert_array_equal(p["b"], params["b"])
            assert not np.array_equal(p["head"], before["head"])
        else:  # the last scoring update already trains the full mask
            assert osel.budget_used(state) == budget
        if t == steps - 1:
            fixed_mask, fixed_sum = mask_leaves(state), state.method_state.fisher_sum
            assert not np.array_equal(p["a"], params["a"]) or not np.array_equal(p["b"], params["b"])
    for got, want in zip(mask_leaves(state), fixed_mask):
        np.testing.assert_array_equal(got, want)
    jax.tree.map(np.testing.assert_array_equal, state.method_state.fisher_sum, fixed_sum)
    osel.verify(params, p, state, budget)
    assert step._cache_size() == 1


def test_fish_one_step_scores_the_first_gradient():
    params = {"w": jnp.zeros(5)}
    tx = osel.selective_fish(2, 1)
    _, state = tx.update({"w": jnp.array([1.0, -3.0, 0.0, 3.0, 2.0])}, tx.init(params))
    assert osel.selected_mask(state)["w"].tolist() == [False, True, False, True, False]


def test_fish_zero_gradients_tie_to_lower_global_index():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
    tx = osel.selective_fish(3, 2)
    state = tx.init(params)
    for _ in range(2):
        _, state = tx.update({"a": jnp.zeros(3), "b": jnp.array([0.0, 1.0])}, state)
    m = osel.selected_mask(state)
    assert m["a"].tolist() == [True, True, False] and m["b"].tolist() == [False, True]


def test_fish_with_fewer_finite_scores_than_budget_selects_only_finite():
    params = {"w": jnp.zeros(4)}
    tx = osel.selective_fish(3, 1)
    _, state = tx.update({"w": jnp.array([jnp.nan, 1.0, jnp.inf, jnp.nan])}, tx.init(params))
    assert osel.selected_mask(state)["w"].tolist() == [False, True, False, False]


def test_fish_bfloat16_params_accumulate_in_float32():
    params = {"w": jnp.zeros(3, jnp.bfloat16)}
    tx = osel.selective_fish(1, 2, inner=optax.sgd(1.0))
    state = tx.init(params)
    assert state.method_state.fisher_sum[0].dtype == jnp.float32
    g = {"w": jnp.array([1.0, 2.0, 0.5], jnp.bfloat16)}
    updates, state = tx.update(g, state, params)
    updates, state = tx.update(g, state, params)
    assert updates["w"].dtype == jnp.bfloat16
    assert osel.selected_mask(state)["w"].tolist() == [False, True, False]


def test_fish_inside_multisteps_counts_real_updates():
    params = {"w": jnp.zeros(4)}
    tx = optax.MultiSteps(osel.selective_fish(1, 2, inner=optax.sgd(1.0)), every_k_schedule=2)
    state = tx.init(params)
    for g in ([1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 5.0]):
        _, state = tx.update({"w": jnp.array(g)}, state, params)
    assert osel.budget_used(state) == 0  # one real update (mean grad [1,0,0,0]) of two
    _, state = tx.update({"w": jnp.array([0, 0, 0, 5.0])}, state, params)
    assert osel.selected_mask(state)["w"].tolist() == [False, False, False, True]  # 1 vs 25


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(budget=3, fish_steps=0), ValueError, r"fish_steps must be in \[1, 2147483647\], got 0"),
        (dict(budget=3, fish_steps=-2), ValueError, "fish_steps must be in .*, got -2"),
        (dict(budget=3, fish_steps=2.0), TypeError, "fish_steps must be an int, got 2.0"),
        (dict(budget=3, fish_steps=True), TypeError, "fish_steps must be an int, got True"),
        (dict(budget=0, fish_steps=2), ValueError, "budget must be in"),
        (dict(budget=1.5, fish_steps=2), TypeError, "budget must be an int"),
    ],
)
def test_fish_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        osel.selective_fish(**kwargs)


def test_fish_budget_errors_at_init():
    params = tree()  # 12 + 5 + 4 float entries
    with pytest.raises(ValueError, match="fish: budget 22 is larger than the 21 eligible"):
        osel.selective_fish(22, 2).init(params)
    with pytest.raises(ValueError, match="hold 4 entries but budget is 4, leaving 0"):
        osel.selective_fish(4, 2, choose_all=CHOOSE_HEAD).init(params)
    with pytest.raises(ValueError, match="no floating-point leaves"):
        osel.selective_fish(1, 2).init({"ids": jnp.arange(3)})


def test_fish_jit_does_not_recompile_and_wrapper_keeps_unselected_identical():
    params = float_tree()
    rng = np.random.default_rng(3)
    tx = osel.selective_fish(6, 2, inner=optax.adamw(0.1, weight_decay=0.5))
    state = tx.init(params)
    step = jax.jit(tx.update)
    p = params
    for _ in range(5):
        updates, state = step(grads_like(p, rng), state, p)
        p = optax.apply_updates(p, updates)
    assert step._cache_size() == 1
    osel.verify(params, p, state, budget=6)
    changed = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p)))
    assert 0 < changed <= 6
    for a, b, m in zip(jax.tree.leaves(params), jax.tree.leaves(p), mask_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a)[~m], np.asarray(b)[~m])


# --------------------------------------------------------------------------- R-Mask


def reference_random_mask(params, budget, seed, choose_all=None):
    """The documented draw, rebuilt from jax.random directly plus a numpy top-k."""
    leaves = jax.tree.leaves(params)
    flags = [False] * len(leaves) if choose_all is None else jax.tree.leaves(choose_all)
    keys, where = [], []
    for i, (x, c) in enumerate(zip(leaves, flags)):
        if jnp.issubdtype(x.dtype, jnp.floating) and not c:
            k = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), i)
            bits = np.asarray(jax.random.bits(k, x.shape, jnp.uint32))
            keys.append((bits >> 8).astype(np.float64))
            where.append(i)
    b_eff = budget - sum(x.size for x, c in zip(leaves, flags) if c)
    chosen = numpy_top_k(keys, b_eff)
    out = [np.full(x.shape, bool(c)) for x, c in zip(leaves, flags)]
    for i, m in zip(where, chosen):
        out[i] = m
    return out


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1])
@pytest.mark.parametrize("choose_all", [None, CHOOSE_HEAD])
def test_random_mask_is_the_documented_draw(seed, choose_all):
    params = tree()
    state = osel.selective_random(10, seed=seed, choose_all=choose_all).init(params)
    got = mask_leaves(state)
    want = reference_random_mask(params, 10, seed, choose_all)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert osel.budget_used(state) == 10
    assert not got[3].any()  # int leaf never selected


def test_random_same_seed_same_mask_other_seed_other_mask():
    params = {"w": jnp.zeros((8, 8)), "b": jnp.zeros(8)}
    masks = {s: mask_leaves(osel.selective_random(12, seed=s).init(params)) for s in (0, 1)}
    again = mask_leaves(osel.selective_random(12, seed=0).init(params))
    for a, b in zip(masks[0], again):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(masks[0], masks[1]))


def test_random_keys_of_a_leaf_ignore_the_other_leaves():
    short = osel.selective_random(3, seed=5).init({"a": jnp.zeros(6)})
    longer = osel.selective_random(3, seed=5).init({"a": jnp.zeros(6), "z": jnp.zeros(0)})
    np.testing.assert_array_equal(mask_leaves(short)[0], mask_leaves(longer)[0])
    k = random_keys(5, 0, (6,))
    assert k.dtype == jnp.float32 and bool(((k >= 0) & (k < 2**24) & (k == jnp.floor(k))).all())


def test_random_selection_is_spread_over_entries_and_leaves():
    # 100 seeds, 5 of 20 entries each: every entry is expected 25 times (sd ~4.3). A draw
    # biased to low indices or to one leaf fails this.
    params = {"a": jnp.zeros(8), "b": jnp.zeros((3, 4))}
    counts = np.zeros(20)
    for seed in range(100):
        counts += np.concatenate([m.reshape(-1) for m in mask_leaves(osel.selective_random(5, seed=seed).init(params))])
    assert counts.sum() == 500 and counts.min() >= 8 and counts.max() <= 45


def test_random_with_zero_left_after_choose_all_trains_choose_all_only():
    params = tree()
    state = osel.selective_random(4, choose_all=CHOOSE_HEAD).init(params)
    got = mask_leaves(state)
    assert got[2].all() and osel.budget_used(state) == 4


def test_random_wrapper_form_under_jit_keeps_unselected_identical():
    params = float_tree()
    rng = np.random.default_rng(4)
    tx = osel.selective_random(7, seed=3, inner=optax.adamw(0.1, weight_decay=0.5))
    state = tx.init(params)
    step = jax.jit(tx.update)
    p = params
    for _ in range(3):
        updates, state = step(grads_like(p, rng), state, p)
        p = optax.apply_updates(p, updates)
    assert step._cache_size() == 1
    osel.verify(params, p, state, budget=7)
    for a, b, m in zip(jax.tree.leaves(params), jax.tree.leaves(p), mask_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a)[~m], np.asarray(b)[~m])
        if m.any() and jnp.issubdtype(a.dtype, jnp.floating):
            assert (np.asarray(a)[m] != np.asarray(b)[m]).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(budget=3, seed=-1), ValueError, r"seed must be in \[0, 4294967295\], got -1"),
        (dict(budget=3, seed=2**32), ValueError, "seed must be in"),
        (dict(budget=3, seed=1.0), TypeError, "seed must be an int, got 1.0"),
        (dict(budget=3, seed=True), TypeError, "seed must be an int"),
        (dict(budget=-1), ValueError, "budget must be in"),
    ],
)
def test_random_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        osel.selective_random(**kwargs)


def test_random_budget_errors_at_init():
    params = tree()
    with pytest.raises(ValueError, match="random: budget 22 is larger than the 21 eligible"):
        osel.selective_random(22).init(params)
    with pytest.raises(ValueError, match="hold 4 entries but budget is 3, leaving -1"):
        osel.selective_random(3, choose_all=CHOOSE_HEAD).init(params)


@pytest.mark.eight_devices  # runs in the 8-device child pytest (tests/conftest.py)
def test_fish_sum_is_sharded_like_its_parameter():
    if jax.device_count() < 2:
        pytest.skip("needs at least 2 devices")
    mesh = jax.make_mesh((2,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    params = {"w": jax.device_put(jnp.ones((4, 3)), sharding), "b": jnp.ones(3)}
    state = osel.selective_fish(2, 2).init(params)
    assert state.method_state.fisher_sum[1].sharding == sharding


def test_fish_method_with_missing_leaves_as_the_torch_bridge_calls_it():
    # The bridge passes None for params outside selection at init, and None masks/grads for
    # leaves without a gradient in a step; those leaves take no part in that step.
    from optax_selective._tree import LeafLayout
    from optax_selective.methods import Fish, RandomMask

    layout = LeafLayout(("a", "b", "c"), ((4,), (3,), (2,)), (True, True, False), (False, False, True))
    method = Fish(budget=2 + 2, fish_steps=2)
    assert method.frozen_after == 2 and RandomMask(budget=1).frozen_after == 0
    masks, state = method.init([jnp.zeros(4), jnp.zeros(3), None], layout)
    update = jax.jit(  # as the bridge's runner: selectable means "has a gradient"
        lambda m, s, count, g: method.update(m, s, count, g, None, [x is not None for x in g])
    )
    a, b = jnp.array([1.0, 0.0, 3.0, 0.5]), jnp.array([9.0, 9.0, 9.0])
    masks, state = update(masks[:2] + [None], state, 0, [a, b, None])
    assert not any(bool(m.any()) for m in masks[:2])
    new, state = update([masks[0], None, None], state, 1, [a, None, None])
    assert new[1] is None and new[2] is None
    assert new[0].tolist() == [True, False, True, False]  # b (sum 81 each) took no part
    np.testing.assert_array_equal(state.fisher_sum[1], np.full(3, 81.0, np.float32))


def test_inside_inject_hyperparams_with_static_args():
    params = {"w": jnp.arange(6.0)}
    grads = {"w": jnp.array([0.0, 3.0, 1.0, 0.0, 2.0, 0.0])}
    for factory, static, kwargs in (
        (osel.selective_fish, ("budget", "fish_steps"), dict(budget=2, fish_steps=1)),
        (osel.selective_random, ("budget", "seed"), dict(budget=2, seed=3)),
    ):
        tx = optax.inject_hyperparams(factory, static_args=static)(**kwargs, inner=optax.sgd(0.1))
        _, state = jax.jit(tx.update)(grads, tx.init(params), params)
        assert osel.budget_used(state) == 2
    assert osel.selected_mask(state)["w"].tolist() == mask_leaves(
        osel.selective_random(2, seed=3).init(params)
    )[0].tolist()
