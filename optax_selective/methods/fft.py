"""Full fine-tuning: every floating-point entry selected; the baseline."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from optax_selective._tree import LeafLayout
from optax_selective.methods import _base


@dataclasses.dataclass(frozen=True)
class FFT:
    name: str = "fft"
    needs_params: bool = False

    @staticmethod
    def trained(layout: LeafLayout) -> list[bool]:
        """Whether each leaf is selected (every floating-point leaf); errors if none is."""
        if layout.num_selectable + layout.num_choose_all == 0:
            raise ValueError("fft: params has no floating-point leaves, so there is nothing to train.")
        return [s or c for s, c in zip(layout.selectable, layout.choose_all)]

    def init(self, params, layout: LeafLayout):
        flags = self.trained(layout)
        return [jnp.full(shape, f, bool) for shape, f in zip(layout.shapes, flags)], _base.FFTState()

    frozen_after = 0  # fixed at init
    update = staticmethod(_base.frozen_update)
