"""Forged or damaged JAX optimizer states (issue 28, item 1): a step never moves more than the
budget, in the dense and the compact form; ``budget_used`` and ``verify`` tell the truth;
``validate_state`` names what is wrong before the first step. Each state here is a real
state from ``tx.init`` / ``tx.update`` with one field changed, as a tampered checkpoint
restores it."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.experimental import checkify  # noqa: E402

import optax_selective as osel  # noqa: E402
from optax_selective.verify import changed_entries  # noqa: E402

PARAMS = {"w": jnp.arange(1.0, 16.0)}
GRADS = {"w": jnp.ones(15)}
BUDGET = 3
FORMS = {"dense": False, "compact": True}
_STEPS: dict = {}


def form(compact, budget=BUDGET):
    tx = osel.selective_pafi(budget, inner=optax.adam(0.1), compact=compact)
    key = (compact, budget)
    if key not in _STEPS:  # one compiled step per form, reused by every test
        _STEPS[key] = jax.jit(tx.update)
    return tx, _STEPS[key]


def moved(params, updates):
    after = optax.apply_updates(params, updates)
    return sum(int(np.sum(changed_entries(params[k], after[k])))
               for k in params)


def all_true(state):
    return state._replace(mask=jax.tree.map(jnp.ones_like, state.mask))


@pytest.mark.parametrize("name", FORMS)
def test_a_mask_over_the_budget_moves_nothing_and_budget_used_says_so(name):
    tx, step = form(FORMS[name])
    forged = all_true(tx.init(PARAMS))
    updates, after = step(GRADS, forged, PARAMS)
    if FORMS[name]:  # compact: its slots hold at most the budget, whatever the mask says
        assert moved(PARAMS, updates) <= BUDGET
        with pytest.raises(ValueError, match="its compact slots hold"):
            osel.budget_used(after)  # old main: 15
    else:
        assert moved(PARAMS, updates) == 0  # old main: 15
        assert osel.budget_used(after) == 0  # old main: 15
        osel.verify(PARAMS, optax.apply_updates(PARAMS, updates), after, budget=BUDGET)
    # an honest state still trains its budget
    updates, _ = step(GRADS, tx.init(PARAMS), PARAMS)
    assert moved(PARAMS, updates) == BUDGET


def test_budget_used_refuses_a_compact_state_whose_mask_and_slots_disagree():
    tx, _ = form(True)
    with pytest.raises(ValueError, match="its mask selects 15 entries, its compact slots hold 3"):
        osel.budget_used(all_true(tx.init(PARAMS)))


def test_compact_slots_outside_the_mask_move_nothing():
    tx, step = form(True)
    state = tx.init(PARAMS)
    inner = state.inner_state
    sel = np.flatnonzero(np.asarray(state.mask["w"]))
    outside = np.setdiff1d(np.arange(15), sel)[:3].astype(np.int32)
    forged_slots = (jnp.asarray(outside),)
    forged = state._replace(inner_state=inner._replace(slots=forged_slots))
    updates, _ = step(GRADS, forged, PARAMS)
    assert moved(PARAMS, updates) == 0  # old main: the 3 unselected entries moved
    with pytest.raises(osel.VerificationError, match="which its mask does not select"):
        osel.verify(PARAMS, PARAMS, forged, budget=BUDGET)
    with pytest.raises(osel.StateValidationError, match="which its mask does not select"):
        osel.validate_state(forged, PARAMS, budget=BUDGET)


def test_a_forged_step_count_cannot_stretch_id3_past_its_budget():
    tx = osel.selective_id3(budget=4, max_steps=2, inner=optax.sgd(0.1), compact=False)
    state = tx.init(PARAMS)
    state = state._replace(count=jnp.asarray(-10, jnp.int32))  # ID3 would select 2 per step
    step = jax.jit(tx.update)
    params = PARAMS
    for _ in range(3):
        updates, state = step({"w": jnp.arange(15.0) + 1}, state, params)
        params = optax.apply_updates(params, updates)
    assert moved(PARAMS, {"w": params["w"] - PARAMS["w"]}) <= 4  # old main: 6
    with pytest.raises(osel.StateValidationError, match="count"):
        osel.validate_state(tx.init(PARAMS)._replace(count=jnp.asarray(-10, jnp.int32)),
                            PARAMS, budget=4)


def test_checkify_reports_the_refused_step():
    tx, _ = form(False)
    checked = jax.jit(checkify.checkify(tx.update, errors=checkify.user_checks))
    err, _ = checked(GRADS, all_true(tx.init(PARAMS)), PARAMS)
    with pytest.raises(Exception, match="more entries than the budget of 3"):
        err.throw()
    err, _ = checked(GRADS, tx.init(PARAMS), PARAMS)
    assert err.get() is None


def _compact_emptied(state):
    inner = state.inner_state
    return state._replace(inner_state=inner._replace(
        slots=tuple(jnp.full_like(s, -1) for s in inner.slots),
        filled=tuple(jnp.zeros_like(f) for f in inner.filled)))



FORGERIES = {  # name: (form, forge(state), message)
    "mask over budget": ("dense", all_true, "selects 15 entries, more than the budget of 3"),
    "mask not bool": ("dense", lambda s: s._replace(mask={"w": s.mask["w"].astype(jnp.int8)}),
                      "is int8"),
    "mask wrong shape": ("dense", lambda s: s._replace(mask={"w": jnp.zeros(14, bool)}),
                         r"expected bool \(15,\)"),
    "negative count": ("dense", lambda s: s._replace(count=jnp.asarray(-1, jnp.int32)),
                       "count"),
    "nan moment": ("dense", lambda s: s._replace(inner_state=(
        s.inner_state[0]._replace(mu={"w": jnp.full(15, jnp.nan)}),) + s.inner_state[1:]),
        r"mu\['w'\] holds NaN"),
    "negative nu": ("dense", lambda s: s._replace(inner_state=(
        s.inner_state[0]._replace(nu={"w": -jnp.ones(15)}),) + s.inner_state[1:]),
        "second moment"),
    "compact slots emptied": ("compact", _compact_emptied, "compact slots hold 0"),
    "compact mask over budget": ("compact", all_true, "more than the budget of 3"),
}


@pytest.mark.parametrize("case", FORGERIES)
def test_validate_state_names_the_forged_field(case):
    name, forge, match = FORGERIES[case]
    tx, step = form(FORMS[name])
    state = tx.init(PARAMS)
    _, state = step(GRADS, state, PARAMS)  # a state mid-training, as checkpoints hold
    osel.validate_state(state, PARAMS, budget=BUDGET, tx=tx)
    with pytest.raises(osel.StateValidationError, match=match):
        osel.validate_state(forge(state), PARAMS, budget=BUDGET)


def test_validate_state_compares_the_structure_with_tx():
    tx, _ = form(False)
    other = osel.selective_pafi(BUDGET, inner=optax.sgd(0.1, momentum=0.9), compact=False)
    with pytest.raises(osel.StateValidationError, match="tree structure differs"):
        osel.validate_state(other.init(PARAMS), PARAMS, budget=BUDGET, tx=tx)
    chain = optax.chain(optax.clip_by_global_norm(1.0), tx)
    osel.validate_state(chain.init(PARAMS), PARAMS, budget=BUDGET, tx=chain)
    with pytest.raises(osel.StateValidationError, match="budget 4 gives"):
        osel.validate_state(form(True)[0].init(PARAMS), PARAMS, budget=4)
