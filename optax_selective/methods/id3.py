"""ID3: incrementally unmask the top-k entries by the D3 score (DESIGN.md section 3)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
from jax import lax

from optax_selective import selection
from optax_selective._tree import LeafLayout
from optax_selective.methods import _base


class ID3State(NamedTuple):
    """ID3's own state: the budget left after choose_all, fixed at init."""

    effective_budget: jax.Array  # int32 scalar


@dataclasses.dataclass(frozen=True)
class ID3:
    budget: int
    max_steps: int
    exp: Any = 1.0
    eps: Any = 1e-8
    name: str = "id3"
    needs_params: bool = True

    @property
    def frozen_after(self) -> int:
        """The mask is frozen after ``max_steps`` updates."""
        return self.max_steps

    def init(self, params, layout: LeafLayout):
        _base.check_not_full(self.name, self.budget, layout)
        b_eff = _base.effective_budget(self.name, self.budget, layout, at_least=1)
        return _base.choose_all_mask(layout), ID3State(jax.numpy.asarray(b_eff, jax.numpy.int32))

    def update(self, mask, state: ID3State, count, grads, params, selectable):
        k = selection.id3_increment(count, state.effective_budget, self.max_steps)
        k_max = selection.max_increment(self.budget, self.max_steps)

        def grow(mask):
            scores = [
                selection.exclude(selection.d3_score(g, p, self.exp, self.eps), m) if ok else None
                for g, p, m, ok in zip(grads, params, mask, selectable)
            ]
            new = selection.top_k_masks(scores, k, k_max)
            return [m if n is None else m | n for m, n in zip(mask, new)]

        # After max_steps the mask is frozen: skip the scoring work entirely.
        mask = lax.cond(count < self.max_steps, grow, lambda m: list(m), list(mask))
        return mask, state
