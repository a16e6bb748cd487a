"""Compact inner state with what real training uses (issue 12): clip_by_global_norm,
apply_if_finite, MultiSteps; and an allow-list that knows optax's own functions by their
code, not their names. These tests also pin the walk against the installed optax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_selective as osel
from optax_selective import compact

STEPS = 5


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=4), jnp.float32),
        "h": jnp.asarray(rng.normal(size=3), jnp.bfloat16),
    }


def _grads(params, t, guarded):
    rng = np.random.default_rng(100 + t)
    # large gradients: the global norm is well above the clipping threshold
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 10.0, x.dtype), params)
    if guarded and t == 3:  # non-finite: skipped by apply_if_finite / MultiSteps' skip rule
        g = jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), g)
    return g


def _train(tx, params, guarded):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(STEPS):
        u, state = step(_grads(params, t, guarded), state, params)
        params = optax.apply_updates(params, u)
    return params, state


INNERS = {
    "clip_by_global_norm+adamw": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(0.05, weight_decay=0.1)
    ),
    "apply_if_finite": lambda: optax.apply_if_finite(optax.adam(0.05), max_consecutive_errors=3),
    "MultiSteps": lambda: optax.MultiSteps(optax.adam(0.05), every_k_schedule=2),
    "MultiSteps.gradient_transformation": lambda: optax.MultiSteps(
        optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1, momentum=0.9)),
        every_k_schedule=2,
        should_skip_update_fn=optax.skip_not_finite,
    ).gradient_transformation(),
    "MultiSteps+skip_large_updates": lambda: optax.MultiSteps(
        optax.adam(0.05),
        every_k_schedule=2,
        should_skip_update_fn=functools.partial(optax.skip_large_updates, max_squared_norm=1e6),
    ),
}


GUARDED = {"apply_if_finite", "MultiSteps.gradient_transformation"}


@pytest.mark.parametrize("name", sorted(INNERS))
def test_compact_state_with_real_training_inners_equals_the_dense_form(name):
    params = _params()
    out = {}
    for is_compact in (True, False):
        tx = osel.selective_id3(8, 3, inner=INNERS[name](), compact=is_compact)
        p, state = _train(tx, params, guarded=name in GUARDED)
        assert isinstance(state.inner_state, compact.CompactState) == is_compact
        osel.verify(params, p, state, budget=8)
        out[is_compact] = p, osel.selected_mask(state)
    (p_c, m_c), (p_d, m_d) = out[True], out[False]
    moved = 0
    for k in params:
        np.testing.assert_array_equal(m_c[k], m_d[k])
        np.testing.assert_allclose(
            np.asarray(p_c[k], np.float32), np.asarray(p_d[k], np.float32), rtol=1e-5, atol=1e-6
        )
        moved += int(np.sum(np.asarray(p_c[k]) != np.asarray(params[k])))
        assert np.isfinite(np.asarray(p_c[k], np.float32)).all()
    assert moved > 0  # the inner optimizer did train the selected entries


def test_multisteps_with_a_user_skip_rule_is_refused():
    ms = optax.MultiSteps(optax.adam(0.1), 2, should_skip_update_fn=lambda u, g, p: jnp.array(False))
    with pytest.raises(ValueError, match="should_skip_update_fn.*compact=False"):
        osel.selective_pafi(3, inner=ms)
    osel.selective_pafi(3, inner=ms, compact=False)  # the dense form takes it


# Module level, as users write them: their __qualname__ heads are "scale" and "clip".
def scale(step_size):  # the name of optax.scale, but not optax's code
    def init_fn(params):
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        return jax.tree.map(lambda u: u * step_size, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def clip(limit):
    def init_fn(params):
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        return jax.tree.map(lambda u: jnp.clip(u, -limit, limit), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def test_a_user_function_named_like_an_optax_one_is_not_on_the_allow_list():
    for tx in (scale(0.1), clip(1.0), optax.chain(optax.adam(0.1), scale(-1.0))):
        reason = compact.compact_refusal(tx)
        assert reason is not None and "not on the allow-list" in reason
        with pytest.raises(ValueError, match="compact=False"):
            osel.selective_pafi(2, inner=tx)


@pytest.mark.parametrize(
    "inner",
    [
        optax.adam(0.1),
        optax.adamw(0.1, weight_decay=0.1),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
        optax.lion(0.1),
        optax.rmsprop(0.1),
        optax.adagrad(0.1),
        optax.adamax(0.1),
        optax.amsgrad(0.1),
        optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=0.1),
        optax.chain(optax.clip(1.0), optax.clip_by_global_norm(1.0), optax.adam(0.1)),
        optax.adam(optax.linear_schedule(0.1, 0.0, 10)),
    ],
    ids=lambda tx: None,
)
def test_installed_optax_elementwise_optimizers_are_recognised(inner):
    """Pins the walk to the installed optax: its own optimizers must stay accepted."""
    assert compact.compact_refusal(inner) is None


def test_installed_optax_non_elementwise_ones_are_still_refused():
    for tx in (optax.adafactor(0.1), optax.lamb(0.1), optax.clip_by_block_rms(1.0)):
        assert compact.compact_refusal(tx) is not None
