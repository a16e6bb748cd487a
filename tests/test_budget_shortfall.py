"""The under-used budget warning (issue 12): one rule, shared with the torch bridge."""

import pytest

from optax_selective.inspect import (
    BudgetShortfallWarning,
    budget_shortfall_message,
    warn_budget_shortfall,
)


def test_no_message_when_budget_spent():
    assert budget_shortfall_message(20, 20, "id3", steps_run=5, max_steps=5) is None
    assert budget_shortfall_message(21, 20, "id3") is None


def test_fewer_steps_than_max_steps_names_both_numbers():
    msg = budget_shortfall_message(554, 2000, "id3", steps_run=277, max_steps=1000)
    assert "554 of its budget of 2000" in msg
    assert "only 277 of max_steps=1000" in msg
    assert "gradient accumulation" in msg


def test_all_steps_ran_points_to_gradients():
    msg = budget_shortfall_message(10, 20, "id3", steps_run=9, max_steps=5)
    assert "non-finite gradients" in msg and "first 5 updates" in msg


def test_warn_emits_the_category_once_per_call():
    with pytest.warns(BudgetShortfallWarning, match="3 of its budget of 4"):
        assert warn_budget_shortfall(3, 4, "fish", steps_run=1, max_steps=2)


def _id3_run(steps, grads_fn, max_steps=4, budget=8):
    import jax.numpy as jnp
    import optax

    import optax_selective as osel

    params = {"w": jnp.linspace(0.1, 1.0, 12), "b": jnp.ones(3)}
    tx = osel.selective_id3(budget, max_steps, inner=optax.sgd(0.1))
    state = tx.init(params)
    for t in range(steps):
        _, state = tx.update(grads_fn(t, params), state, params)
    return params, state


def test_make_summary_warns_when_fewer_updates_than_max_steps_ran():
    import jax.numpy as jnp

    import optax_selective as osel

    params, state = _id3_run(2, lambda t, p: {k: jnp.ones_like(v) for k, v in p.items()})
    with pytest.warns(BudgetShortfallWarning, match=r"4 of its budget of 8.*only 2 of max_steps=4"):
        summary = osel.make_summary(params, state)
    assert summary.budget_used == 4


def test_make_summary_warns_when_a_step_had_no_gradient():
    import jax.numpy as jnp

    import optax_selective as osel

    def grads(t, p):  # step 1 has no finite gradient (e.g. an overflow step)
        return {k: (jnp.full_like(v, jnp.nan) if t == 1 else jnp.ones_like(v)) for k, v in p.items()}

    params, state = _id3_run(4, grads)
    with pytest.warns(BudgetShortfallWarning, match=r"6 of its budget of 8.*non-finite gradients"):
        osel.make_summary(params, state)


def test_make_summary_is_quiet_when_the_budget_is_spent():
    import warnings

    import jax.numpy as jnp

    import optax_selective as osel

    params, state = _id3_run(4, lambda t, p: {k: jnp.ones_like(v) for k, v in p.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert osel.make_summary(params, state).budget_used == 8


def test_fish_with_fewer_updates_than_fish_steps_warns():
    import jax.numpy as jnp

    import optax_selective as osel

    params = {"w": jnp.ones(6)}
    tx = osel.selective_fish(3, fish_steps=3)
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones(6)}, state, params)
    with pytest.warns(BudgetShortfallWarning, match="only 1 of max_steps=3"):
        osel.make_summary(params, state)


def test_no_warning_before_any_update():
    import warnings

    import jax.numpy as jnp

    import optax_selective as osel

    params = {"w": jnp.ones(4)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        osel.make_summary(params, osel.selective_id3(2, 2).init(params))
