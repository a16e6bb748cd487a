"""Full fine-tuning: every floating-point entry selected; the baseline."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from optax_selective._tree import LeafLayout
from optax_selective.methods import _base, _registry


@dataclasses.dataclass(frozen=True)
class FFT:
    """Full fine-tuning: every floating-point entry is selected at init; no budget.

    The baseline the selective methods are measured against (:func:`optax_selective.selective_fft`).
    Integer leaves (step counters, say) are never selected.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> from optax_selective.methods import FFT
      >>> params = {"w": jnp.ones((2, 3)), "step": jnp.array(0)}
      >>> osel.budget_used(osel.selective(FFT()).init(params)), FFT().budget is None
      (6, True)
    """

    name: str = "fft"
    needs_params: bool = False
    budget = None  # every eligible entry
    frozen_after = 0  # fixed at init
    k_max = 0

    @staticmethod
    def trained(layout: LeafLayout) -> list[bool]:
        """Whether each leaf is selected (every floating-point leaf); errors if none is."""
        if layout.num_selectable + layout.num_choose_all == 0:
            raise ValueError("fft: params has no floating-point leaves, so there is nothing to train.")
        return [s or c for s, c in zip(layout.selectable, layout.choose_all)]

    def init(self, params, layout: LeafLayout):
        flags = self.trained(layout)
        return [jnp.full(shape, f, bool) for shape, f in zip(layout.shapes, flags)], ()

    update = staticmethod(_base.frozen_update)

    def shard_init(self, shards, starts, layout: LeafLayout) -> _base.ShardInit:
        del shards, starts
        sizes = [int(np.prod(s, dtype=np.int64)) for s in layout.shapes]
        return _base.ShardInit((), [n if f else 0 for n, f in zip(sizes, self.trained(layout))])

    def shard_update(self, state, count, grads, params, masks):
        return None, 0, state


@_registry.register("fft")
def make_fft() -> FFT:
    """Full fine-tuning; it takes no arguments (a budget passed to the torch bridge is ignored)."""
    return FFT()
