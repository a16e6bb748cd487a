"""R-Mask: ``B_eff`` eligible entries drawn uniformly at random, fixed at init (DESIGN.md 3).

The draw is defined on the leaves in leaf order, without reference to any framework's
random generator, so the torch bridge (which calls this same code on its parameter list)
selects the same entries as JAX for the same seed:

* leaf ``i`` (its position in leaf order, counting every leaf) gets the key
  ``jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), i)``;
* each of its entries gets a 24-bit random integer ``jax.random.bits(key_i, shape, uint32)
  >> 8``, exactly representable in float32;
* the ``B_eff`` highest keys over all selectable leaves together are chosen, ties to the
  lower global index (:func:`optax_selective.selection.top_k_masks`).

The keys of one leaf do not depend on the other leaves, so adding a leaf at the end of the
pytree does not change the keys of the others. Ties only matter between entries with equal
24-bit keys at the cutoff, so the choice is uniform up to a bias of order ``N / 2**24``
entries towards lower indices. The draw is fixed for a given JAX version and
``jax_threefry_partitionable`` setting (JAX changed that flag's default in 0.5.0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from optax_selective import selection
from optax_selective._tree import LeafLayout
from optax_selective.methods import _base, _registry

SEED_BOUND = 2**32


def random_keys(seed: int, leaf_index: int, shape: tuple[int, ...]) -> jax.Array:
    """The float32 sort keys of one leaf's entries (integers in ``[0, 2**24)``)."""
    key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), leaf_index)
    bits = jax.random.bits(key, shape, jnp.uint32)
    return (bits >> 8).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class RandomMask:
    """The random mask: ``budget`` eligible entries drawn uniformly at init (see the module
    docstring for the exact draw), fixed; the same ``seed`` selects the same entries in JAX
    and torch. :func:`optax_selective.selective_random` builds it from checked arguments.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> from optax_selective.methods import RandomMask
      >>> params = {"w": jnp.zeros((3, 4))}
      >>> mask = osel.selected_mask(osel.selective(RandomMask(budget=5, seed=3)).init(params))
      >>> int(mask["w"].sum())
      5
    """

    budget: int
    seed: int = 0
    name: str = "random"
    needs_params: bool = False
    frozen_after = 0  # fixed at init
    k_max = 0

    def init(self, params, layout: LeafLayout):
        b_eff = self._effective_budget(layout)
        mask = _base.choose_all_mask(layout)
        scores = [
            random_keys(self.seed, i, shape) if ok else None
            for i, (shape, ok) in enumerate(zip(layout.shapes, layout.selectable))
        ]
        new = selection.top_k_masks(scores, b_eff, b_eff)
        return [m if n is None else m | n for m, n in zip(mask, new)], ()

    update = staticmethod(_base.frozen_update)

    def _effective_budget(self, layout: LeafLayout) -> int:
        _base.check_not_full(self.name, self.budget, layout)
        return _base.effective_budget(self.name, self.budget, layout, at_least=0)

    def shard_init(self, shards, starts, layout: LeafLayout) -> _base.ShardInit:
        """The same keys as :meth:`init`: a shard's keys are its slice of the leaf's keys,
        drawn one leaf at a time (a transient float32 copy of the largest leaf)."""
        b_eff = self._effective_budget(layout)
        scores = [
            random_keys(self.seed, i, shape).reshape(-1)[st : st + s.size].reshape(s.shape)
            if ok and s is not None else None
            for i, (s, st, shape, ok) in enumerate(zip(shards, starts, layout.shapes, layout.selectable))
        ]
        return _base.ShardInit((), [0] * len(layout.shapes), scores, b_eff)

    def shard_update(self, state, count, grads, params, masks):
        return None, 0, state


@_registry.register("random")
def make_random(*, budget=None, seed=0) -> RandomMask:
    """The random mask from the user's arguments, checked."""
    budget = _base.required_budget("random", budget)
    return RandomMask(budget=budget, seed=_base.check_int("seed", seed, 0, SEED_BOUND - 1))
