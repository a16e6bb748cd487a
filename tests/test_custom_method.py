"""A method defined here, registered once, trains in JAX and in torch with the same selection.

The method is the example of ``docs/guides/custom-methods.md``: a one-shot mask of the
``budget`` entries with the largest gradient magnitude at update ``at_step``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import optax_selective as osel
from optax_selective import methods, selection
from optax_selective.methods import ShardInit
from optax_selective.testing import check_method
from torch_bridge import get_selective_optimizer
from torch_bridge.distributed import ShardedMethodRunner

NAME = "grad_magnitude_test"


@dataclasses.dataclass(frozen=True)
class GradMagnitude:
    budget: int
    at_step: int = 0
    name: str = NAME
    needs_params: bool = False
    k_max = None  # the whole budget joins at once

    @property
    def frozen_after(self) -> int:
        return self.at_step + 1

    def init(self, params, layout):
        # choose_all leaves are fully selected; the rest of the budget is chosen later
        b_eff = self.budget - layout.num_choose_all
        if b_eff < 1:
            raise ValueError(f"{self.name}: budget {self.budget} leaves nothing after choose_all.")
        mask = [jnp.full(s, c, bool) for s, c in zip(layout.shapes, layout.choose_all)]
        return mask, jnp.int32(b_eff)

    def update(self, mask, state, count, grads, params, selectable, *, report_added=False):
        def choose(mask):
            scores = [jnp.abs(g) if ok else None for g, ok in zip(grads, selectable)]
            new = selection.top_k_masks(scores, state, self.budget)
            return [m if n is None else m | n for m, n in zip(mask, new)]

        mask = jax.lax.cond(count == self.at_step, choose, list, list(mask))
        return (mask, state, None) if report_added else (mask, state)


@dataclasses.dataclass(frozen=True)
class ShardableGradMagnitude(GradMagnitude):
    """The same method with the two hooks sharded (FSDP2) runners need."""

    def shard_init(self, shards, starts, layout):
        mask, b_eff = self.init(None, layout)
        return ShardInit(int(b_eff), [0] * len(layout.shapes))

    def shard_update(self, state, count, grads, params, masks):
        if count != self.at_step:
            return None, 0, state
        return [None if g is None else jnp.abs(g) for g in grads], state, state


def make(*, budget=None, at_step=0):
    budget = methods.required_budget(NAME, budget)
    return GradMagnitude(budget=budget, at_step=methods.check_int("at_step", at_step, 0))


@pytest.fixture(autouse=True)
def registered():
    methods.register(NAME, make)
    yield
    methods.unregister(NAME)


def gradients(steps, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"b": (5,), "w": (4, 6)}
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(steps)]


def test_user_method_same_selection_in_jax_and_torch():
    grads = gradients(4)
    params = {"b": jnp.zeros(5), "w": jnp.ones((4, 6))}
    tx = osel.selective(NAME, budget=7, at_step=1, inner=optax.adamw(1e-2))  # compact state
    state = tx.init(params)
    assert osel.budget_used(state) == 0 and state.inner_state.slots[0].shape == (7,)
    jax_masks = []
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
        jax_masks.append({k: np.asarray(v) for k, v in state.mask.items()})
    assert osel.budget_used(state) == 7
    assert osel.make_summary(params, state).method == NAME

    tb, tw = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.ones(4, 6))
    opt = get_selective_optimizer(torch.optim.AdamW, NAME)(
        [tb, tw], lr=1e-2, budget=7, at_step=1, weight_decay=0.1
    )
    assert opt.compact and opt.method.at_step == 1
    for t, g in enumerate(grads):
        tb.grad, tw.grad = torch.from_numpy(g["b"]), torch.from_numpy(g["w"])
        opt.step()
        got = opt.get_masks()
        np.testing.assert_array_equal(got[0].numpy(), jax_masks[t]["b"])
        np.testing.assert_array_equal(got[1].numpy(), jax_masks[t]["w"])
    assert opt.get_budget_used() == 7
    # the magnitudes chosen at step 1 are the 7 largest of that step's gradients
    flat = np.abs(np.concatenate([grads[1]["b"], grads[1]["w"].ravel()]))
    chosen = np.concatenate([jax_masks[-1]["b"], jax_masks[-1]["w"].ravel()])
    assert set(np.flatnonzero(chosen)) == set(np.argsort(-flat, kind="stable")[:7])


def test_user_method_arguments_are_checked_once_for_both_frameworks():
    with pytest.raises(ValueError, match=f"method '{NAME}' needs budget"):
        osel.selective(NAME, at_step=1)
    with pytest.raises(ValueError, match=f"method '{NAME}' needs budget"):
        get_selective_optimizer(torch.optim.SGD, NAME)([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    with pytest.raises(ValueError, match="at_step must be in"):
        get_selective_optimizer(torch.optim.SGD, NAME)(
            [torch.nn.Parameter(torch.ones(3))], lr=0.1, budget=2, at_step=-1
        )
    with pytest.raises(TypeError, match="takes no argument 'max_steps'"):
        osel.selective(NAME, budget=2, max_steps=3)


def test_user_method_passes_the_conformance_check():
    report = check_method(NAME, budget=9, at_step=1)
    assert report.budget_used == 9 and report.torch_checked and report.traces == 1


def test_sharded_runner_refuses_a_method_without_the_hooks_and_runs_one_with_them():
    layout_params = [torch.zeros(5), torch.ones(4, 6)]
    from optax_selective._tree import LeafLayout

    layout = LeafLayout(("b", "w"), ((5,), (4, 6)), (True, True), (False, False))
    with pytest.raises(NotImplementedError, match="lacks shard_init and shard_update"):
        ShardedMethodRunner(GradMagnitude(budget=4), layout, layout_params)
    # With the hooks, the sharded runner (here one process, every leaf whole) selects what
    # the JAX method selects.
    method = ShardableGradMagnitude(budget=4, at_step=0)
    runner = ShardedMethodRunner(method, layout, layout_params)
    masks = runner.init(layout_params)
    g = gradients(1)[0]
    new = runner.update(0, [0, 1], masks, [torch.from_numpy(g["b"]), torch.from_numpy(g["w"])], layout_params)
    want, _ = method.update(
        [jnp.zeros(5, bool), jnp.zeros((4, 6), bool)], jnp.int32(4), jnp.int32(0),
        [jnp.asarray(g["b"]), jnp.asarray(g["w"])], None, [True, True],
    )
    for i in range(2):
        np.testing.assert_array_equal(new[i].numpy(), np.asarray(want[i]))
