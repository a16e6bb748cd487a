"""PaFI: the ``budget`` smallest-magnitude entries, fixed at init (DESIGN.md section 3)."""

from __future__ import annotations

import dataclasses

import jax

from optax_selective import selection
from optax_selective._tree import LeafLayout
from optax_selective.methods import _base, _registry


@dataclasses.dataclass(frozen=True)
class PaFI:
    """PaFI's rule: the ``budget`` entries of smallest magnitude, chosen at init and fixed.

    Choose_all leaves count towards ``budget``; ties go to the lower global index.
    :func:`optax_selective.selective_pafi` builds it from checked arguments.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> from optax_selective.methods import PaFI
      >>> state = osel.selective(PaFI(budget=2)).init({"w": jnp.array([0.5, -0.1, 2.0, 0.0])})
      >>> osel.selected_mask(state)["w"].tolist()
      [False, True, False, True]
    """

    budget: int
    name: str = "pafi"
    needs_params: bool = False
    frozen_after = 0  # fixed at init
    k_max = 0
    leafwise_init = True  # a LeafwiseInitMethod: the top-k of the elementwise score below

    def init_scores(self, params, layout: LeafLayout):
        """``(scores, k)``: PaFI chooses the ``k`` highest of ``scores`` (``None``: no part).

        Checks the budget against ``layout`` (the whole parameters); ``params`` may be local
        shards, as in the torch FSDP2 runner, which merges the shards' candidates.
        """
        b_eff = self.effective_budget(layout)
        return _scores([p if ok else None for p, ok in zip(params, layout.selectable)]), b_eff

    # The rule in pieces, for selection one leaf (chunk) at a time (torch_bridge.leafwise):
    # the k = effective_budget highest `score`s over the selectable leaves, ties to the lower
    # global index, merged with selection.merge_candidates.
    def effective_budget(self, layout: LeafLayout) -> int:
        """``B_eff`` (the budget left after choose_all) after checking the budget."""
        _base.check_not_full(self.name, self.budget, layout)
        return _base.effective_budget(self.name, self.budget, layout, at_least=0)

    @staticmethod
    def score(param):
        """PaFI's elementwise score (``-|θ|`` in float32; the highest are chosen)."""
        return selection.smallest_magnitude_score(param)

    def init(self, params, layout: LeafLayout):
        scores, b_eff = self.init_scores(params, layout)
        mask = _base.choose_all_mask(layout)
        new = _smallest(scores, b_eff)
        return [m if n is None else m | n for m, n in zip(mask, new)], ()

    update = staticmethod(_base.frozen_update)

    def shard_init(self, shards, starts, layout: LeafLayout) -> _base.ShardInit:
        del starts
        scores, b_eff = self.init_scores(shards, layout)
        return _base.ShardInit((), [0] * len(layout.shapes), scores, b_eff)

    def shard_update(self, state, count, grads, params, masks):
        return None, 0, state


@_registry.register("pafi")
def make_pafi(*, budget=None) -> PaFI:
    """PaFI from the user's arguments, checked."""
    return PaFI(budget=_base.required_budget("pafi", budget))


def _smallest(scores, k):
    """The k smallest |θ|: the scores are written once by one compiled program, then the
    O(N) selection (compiled too) reads them; fusing both into one program made XLA redo
    the score work in every pass of the selection, about twice as slow."""
    return selection.top_k_masks(scores, k, k)


@jax.jit
def _scores(params):
    return [None if p is None else PaFI.score(p) for p in params]
