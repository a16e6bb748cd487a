"""BitFit: bias entries only, in leaf order, until the budget is met (DESIGN.md section 3)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from optax_selective._tree import LeafLayout
from optax_selective.methods import _base


def default_is_bias(path: str, shape: tuple[int, ...]) -> bool:
    """A bias leaf is 1-D or 0-D (as in the reference, so LayerNorm scales count too)."""
    del path
    return len(shape) <= 1


@dataclasses.dataclass(frozen=True)
class BitFit:
    budget: int
    is_bias: Callable[[str, tuple[int, ...]], bool] = default_is_bias
    name: str = "bitfit"
    needs_params: bool = False

    def init(self, params, layout: LeafLayout):
        left = _base.effective_budget(self.name, self.budget, layout, at_least=0)
        mask = _base.choose_all_mask(layout)
        for i, (path, shape, ok) in enumerate(zip(layout.paths, layout.shapes, layout.selectable)):
            if not ok or left == 0 or not self.is_bias(path, shape):
                continue
            size = int(np.prod(shape, dtype=np.int64))
            take = min(size, left)  # the last leaf may be taken partly: its first entries
            mask[i] = (jnp.arange(size) < take).reshape(shape)
            left -= take
        return mask, _base.EMPTY

    frozen_after = 0  # fixed at init
    update = staticmethod(_base.frozen_update)
