"""FISH mask: the top entries by empirical Fisher information, fixed (DESIGN.md section 3).

The score of an entry is the mean of its squared gradient over the first ``fish_steps``
updates. Ranking by the mean is ranking by the sum (``fish_steps`` is a positive constant),
so the state keeps the float32 running sum and the top-k runs on the sum itself: no division,
so no two distinct sums can round to the same score.

Scoring schedule, for update ``t`` (0-based count of updates so far):

* ``t < fish_steps``: ``fisher_sum += g ** 2`` (float32, raw gradient) on every selectable
  leaf. The mask is choose_all only, so entries outside choose_all do not move and every
  scoring gradient is taken at their initial values, as in the paper, which computes the
  mask before training.
* ``t == fish_steps - 1``: after adding this step's gradient, the ``B_eff`` entries with the
  highest sum over all selectable leaves together (ties to the lower global index, non-finite
  sums excluded) join the mask, which is then fixed. This update already uses the full mask,
  so exactly ``budget`` entries are selected after ``fish_steps`` updates (as for ID3).
* ``t >= fish_steps``: nothing changes.

Memory: the running sum is one float32 per selectable entry (the size of one Adam moment,
choose_all and non-float leaves excluded: those hold a zero-size placeholder). Shapes of the
optimizer state are static under ``jax.jit``, so the buffer cannot be freed after scoring; it
stays in the state, frozen, and doubles as a record of the Fisher scores.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optax_selective import selection
from optax_selective._tree import LeafLayout
from optax_selective.methods import _base, _registry


@_base.register_with_schedule
class FishState(NamedTuple):
    """FISH's own state.

    Attributes:
      effective_budget: int32 scalar, ``budget - |choose_all|``, fixed at init.
      fisher_sum: one float32 array per leaf (leaf order): the running sum of squared
        gradients, shaped like the leaf for selectable leaves, shape ``(0,)`` for the others.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> params = {"b": jnp.zeros(2), "w": jnp.zeros(3)}
      >>> tx = osel.selective_fish(budget=3, fish_steps=2, choose_all={"b": True, "w": False})
      >>> state = tx.init(params)
      >>> _, state = tx.update({"b": jnp.ones(2), "w": jnp.array([1.0, -2.0, 3.0])}, state)
      >>> fish_state = state.method_state
      >>> int(fish_state.effective_budget), [s.tolist() for s in fish_state.fisher_sum]
      (1, [[], [1.0, 4.0, 9.0]])
    """

    effective_budget: jax.Array
    fisher_sum: list[jax.Array]
    schedule: _base.SpendSchedule | None = None  # static: for the under-used budget check


def fisher_increment(grad: jax.Array) -> jax.Array:
    """One step's contribution to the empirical Fisher score: ``g ** 2`` in float32."""
    g = grad.astype(jnp.float32)
    return g * g


@dataclasses.dataclass(frozen=True)
class Fish:
    """FISH's rule: the entries with the highest empirical Fisher score (the sum of squared
    gradients over the first ``fish_steps`` updates) join at update ``fish_steps - 1``; the
    mask is fixed from then on (schedule in the module docstring).

    :func:`optax_selective.selective_fish` builds it from checked arguments.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> from optax_selective.methods import Fish
      >>> method = Fish(budget=2, fish_steps=1)
      >>> method.frozen_after  # no change after the first update
      1
      >>> tx = osel.selective(method)
      >>> params = {"w": jnp.zeros(4)}
      >>> _, state = tx.update({"w": jnp.array([3.0, 0.5, -4.0, 1.0])}, tx.init(params))
      >>> osel.selected_mask(state)["w"].tolist()
      [True, False, True, False]
    """

    budget: int
    fish_steps: int
    name: str = "fish"
    needs_params: bool = False
    k_max = None  # the whole B_eff joins at once

    @property
    def frozen_after(self) -> int:
        """``update`` is the identity once ``fish_steps`` updates have been applied."""
        return self.fish_steps

    def init(self, params, layout: LeafLayout):
        _base.check_not_full(self.name, self.budget, layout)
        b_eff = _base.effective_budget(self.name, self.budget, layout, at_least=1)
        # zeros_like: the sum takes its parameter's sharding, so it is never replicated.
        fisher_sum = [
            jnp.zeros_like(p, jnp.float32) if ok else jnp.zeros((0,), jnp.float32)
            for p, ok in zip(params, layout.selectable)
        ]
        schedule = _base.SpendSchedule(self.budget, self.fish_steps)
        state = FishState(jnp.asarray(b_eff, jnp.int32), fisher_sum, schedule)
        return _base.choose_all_mask(layout), state

    def update(self, mask, state: FishState, count, grads, params, selectable, *, report_added=False):
        del params
        # Leaves selectable at init hold a full-size sum; the placeholders are (0,)-shaped.
        scored = [s.size > 0 for s in state.fisher_sum]

        def accumulate(fisher_sum):
            return [
                s + fisher_increment(g) if use and ok and g is not None else s
                for s, g, use, ok in zip(fisher_sum, grads, scored, selectable)
            ]

        # Skip the pass over the gradients entirely once scoring is over.
        fisher_sum = lax.cond(
            count < self.fish_steps, accumulate, lambda s: list(s), list(state.fisher_sum)
        )

        def fix(mask):
            # A leaf whose mask is None (the torch bridge: no gradient in this step) takes no
            # part, so the whole B_eff goes to leaves whose new mask is returned.
            scores = [
                s if use and m is not None else None
                for s, m, use in zip(fisher_sum, mask, scored)
            ]
            new = selection.top_k_masks(scores, state.effective_budget, self.budget)
            return [m if n is None else m | n for m, n in zip(mask, new)]

        mask = lax.cond(count == self.fish_steps - 1, fix, lambda m: list(m), list(mask))
        state = state._replace(fisher_sum=fisher_sum)
        return (mask, state, None) if report_added else (mask, state)

    # -- on shards (torch FSDP2): the same sums, kept per shard; top-k done by the runner -------
    def shard_init(self, shards, starts, layout: LeafLayout) -> _base.ShardInit:
        del starts
        _base.check_not_full(self.name, self.budget, layout)
        b_eff = _base.effective_budget(self.name, self.budget, layout, at_least=1)
        sums = [
            jnp.zeros(s.shape, jnp.float32) if ok and s is not None else None
            for s, ok in zip(shards, layout.selectable)
        ]
        return _base.ShardInit((b_eff, sums), [0] * len(layout.shapes))

    def shard_update(self, state, count, grads, params, masks):
        del params, masks
        b_eff, sums = state
        if count >= self.fish_steps:
            return None, 0, state
        sums = [
            s if s is None or g is None else _accumulate(s, g) for s, g in zip(sums, grads)
        ]
        if count < self.fish_steps - 1:
            return None, 0, (b_eff, sums)
        # A leaf without a gradient in this last step takes no part, as in ``update``.
        return [s if g is not None else None for s, g in zip(sums, grads)], b_eff, (b_eff, sums)


@jax.jit
def _accumulate(fisher_sum, grad):
    return fisher_sum + fisher_increment(grad)


@_registry.register("fish")
def make_fish(*, budget=None, fish_steps=None) -> Fish:
    """FISH from the user's arguments, checked (see :func:`optax_selective.selective_fish`)."""
    budget = _base.required_budget("fish", budget)
    fish_steps = _base.require(
        "fish", "fish_steps", fish_steps,
        "number of steps whose squared gradients make up the Fisher score",
    )
    return Fish(budget=budget, fish_steps=_base.check_int("fish_steps", fish_steps, 1))
