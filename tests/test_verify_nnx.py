"""verify / budget_used with flax.nnx states and pure dicts (issue 12)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_selective as osel


class Net(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(self.bn(self.lin(x))))


def _loss(model, x):
    return jnp.mean(model(x) ** 2)


@pytest.fixture(scope="module")
def trained():
    """One training step of a BatchNorm + Dropout model: before / after in every form."""
    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, osel.selective_pafi(5, inner=optax.adam(0.1)), wrt=nnx.Param)
    before = {
        "state": nnx.state(model, nnx.Param),
        "pure": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "full": nnx.state(model),
    }
    before = {k: nnx.clone(v) if k != "pure" else v for k, v in before.items()}
    model.train()
    opt.update(model, nnx.grad(_loss)(model, jnp.arange(24.0).reshape(8, 3)))
    after = {
        "state": nnx.state(model, nnx.Param),
        "pure": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "full": nnx.state(model),
    }
    return model, opt, before, after


@pytest.mark.parametrize("form_after", ["state", "pure", "full"])
@pytest.mark.parametrize("form_before", ["state", "pure", "full"])
def test_verify_accepts_nnx_states_and_pure_dicts(trained, form_before, form_after):
    _, opt, before, after = trained
    # BatchNorm statistics and the Dropout RNG counter changed, but the optimizer does not
    # cover them: they are not compared.
    osel.verify(before[form_before], after[form_after], opt.opt_state, budget=5)
    osel.verify(before[form_before], after[form_after], nnx.state(opt), budget=5)


def test_verify_still_catches_a_moved_unselected_entry_in_a_full_state(trained):
    _, opt, before, after = trained
    mask = np.asarray(osel.selected_mask(opt.opt_state)["out"]["kernel"])
    moved = nnx.to_pure_dict(nnx.state(Net(nnx.Rngs(0))))  # the initial values, all leaves
    i = tuple(np.argwhere(~mask)[0])
    moved["out"]["kernel"] = moved["out"]["kernel"].at[i].add(1.0)
    with pytest.raises(osel.VerificationError, match=r"\['out'\]\['kernel'\]: 1 unselected entries changed"):
        osel.verify(before["full"], moved, opt.opt_state, budget=5)


def test_verify_names_a_real_structural_mismatch(trained):
    _, opt, before, after = trained
    wrapped = {"params": before["pure"]}  # linen-style nesting: no leaf path matches
    with pytest.raises(osel.VerificationError, match=r"params_before has no leaf at \['bn'\]\['bias'\]"):
        osel.verify(wrapped, after["pure"], opt.opt_state, budget=5)
    partial = {k: v for k, v in after["pure"].items() if k != "out"}
    with pytest.raises(osel.VerificationError, match=r"params_after has no leaf at \['out'\]\['bias'\], \['out'\]\['kernel'\]"):
        osel.verify(before["pure"], partial, opt.opt_state, budget=5)
    reshaped = dict(after["pure"], out=dict(after["pure"]["out"], bias=jnp.zeros(3)))
    with pytest.raises(osel.VerificationError, match=r"params_after\['out'\]\['bias'\] has shape \(3,\)"):
        osel.verify(before["pure"], reshaped, opt.opt_state, budget=5)


def test_budget_used_of_nnx_state_of_the_optimizer(trained):
    _, opt, _, _ = trained
    assert osel.budget_used(nnx.state(opt)) == osel.budget_used(opt.opt_state) == 5
    mask = osel.selected_mask(nnx.state(opt))
    assert int(sum(np.sum(np.asarray(m)) for m in nnx.to_pure_dict(nnx.state(opt))["opt_state"]["mask"]["lin"].values())) == int(
        sum(np.sum(np.asarray(m)) for m in mask["lin"].values())
    )


def test_chain_form_with_adamw_says_why_and_what_to_do():
    params = {"w": jnp.array([1.0, 2.0, 3.0])}
    tx = optax.chain(osel.selective_pafi(1), optax.adamw(0.1, weight_decay=0.5))
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    with pytest.raises(osel.VerificationError, match=r"(?s)2 unselected entries changed.*decoupled weight decay.*inner="):
        osel.verify(params, optax.apply_updates(params, updates), state, budget=1)


def test_id3_in_nnx_optimizer_budget_used_and_summary_from_nnx_state():
    """ID3's state (a registered pytree with a static schedule) through nnx.Optimizer."""
    model = Net(nnx.Rngs(1))
    opt = nnx.Optimizer(model, osel.selective_id3(6, 2, inner=optax.adamw(0.1)), wrt=nnx.Param)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    model.train()
    for _ in range(2):
        opt.update(model, nnx.grad(_loss)(model, jnp.arange(24.0).reshape(8, 3)))
    assert osel.budget_used(nnx.state(opt)) == osel.budget_used(opt.opt_state) == 6
    osel.verify(before, nnx.state(model), nnx.state(opt), budget=6)
    summary = osel.make_summary(nnx.state(model, nnx.Param), opt.opt_state)
    assert summary.method == "id3" and summary.budget_used == 6
