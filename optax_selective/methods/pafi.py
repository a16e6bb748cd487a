"""PaFI: the ``budget`` smallest-magnitude entries, fixed at init (DESIGN.md section 3)."""

from __future__ import annotations

import dataclasses

from optax_selective import selection
from optax_selective._tree import LeafLayout
from optax_selective.methods import _base


@dataclasses.dataclass(frozen=True)
class PaFI:
    budget: int
    name: str = "pafi"
    needs_params: bool = False

    def init(self, params, layout: LeafLayout):
        _base.check_not_full(self.name, self.budget, layout)
        b_eff = _base.effective_budget(self.name, self.budget, layout, at_least=0)
        mask = _base.choose_all_mask(layout)
        scores = [
            selection.smallest_magnitude_score(p) if ok else None
            for p, ok in zip(params, layout.selectable)
        ]
        new = selection.top_k_masks(scores, b_eff, b_eff)
        return [m if n is None else m | n for m, n in zip(mask, new)], _base.EMPTY

    frozen_after = 0  # fixed at init
    update = staticmethod(_base.frozen_update)
