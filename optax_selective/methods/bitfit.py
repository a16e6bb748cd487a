"""BitFit: bias entries only, in leaf order, until the budget is met (DESIGN.md section 3)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from optax_selective._tree import LeafLayout
from optax_selective.methods import _base, _registry


def default_is_bias(path: str, shape: tuple[int, ...]) -> bool:
    """A bias leaf is 1-D or 0-D (as in the reference, so LayerNorm scales count too).

    Example:
      >>> from optax_selective.methods import default_is_bias
      >>> default_is_bias("dense/bias", (4,)), default_is_bias("dense/kernel", (3, 4))
      (True, False)
    """
    del path
    return len(shape) <= 1


@dataclasses.dataclass(frozen=True)
class BitFit:
    """BitFit's rule: whole bias leaves (``is_bias(path, shape)``), in leaf order, until the
    budget is spent; the last one may be taken in part (its first entries, row-major).

    Chosen at init and fixed. :func:`optax_selective.selective_bitfit` builds it from checked
    arguments.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> from optax_selective.methods import BitFit
      >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(3), "w": jnp.ones((2, 2))}
      >>> mask = osel.selected_mask(osel.selective(BitFit(budget=3)).init(params))
      >>> mask["a"].tolist(), mask["b"].tolist(), bool(mask["w"].any())
      ([True, True], [True, False, False], False)
    """

    budget: int
    is_bias: Callable[[str, tuple[int, ...]], bool] = default_is_bias
    name: str = "bitfit"
    needs_params: bool = False
    frozen_after = 0  # fixed at init
    k_max = 0

    def taken(self, layout: LeafLayout) -> list[int]:
        """How many leading (row-major) entries of each leaf BitFit selects, in leaf order.

        The whole rule; the torch FSDP2 runner applies it to its shards' global indices.
        """
        left = _base.effective_budget(self.name, self.budget, layout, at_least=0)
        out = []
        for path, shape, ok in zip(layout.paths, layout.shapes, layout.selectable):
            if not ok or left == 0 or not self.is_bias(path, shape):
                out.append(0)
                continue
            take = min(int(np.prod(shape, dtype=np.int64)), left)  # the last may be partial
            out.append(take)
            left -= take
        return out

    def init(self, params, layout: LeafLayout):
        mask = _base.choose_all_mask(layout)
        for i, (shape, take) in enumerate(zip(layout.shapes, self.taken(layout))):
            if take:
                size = int(np.prod(shape, dtype=np.int64))
                mask[i] = (jnp.arange(size) < take).reshape(shape)
        return mask, ()

    update = staticmethod(_base.frozen_update)

    def shard_init(self, shards, starts, layout: LeafLayout) -> _base.ShardInit:
        del shards, starts
        return _base.ShardInit((), self.taken(layout))

    def shard_update(self, state, count, grads, params, masks):
        return None, 0, state


@_registry.register("bitfit")
def make_bitfit(*, budget=None, is_bias=default_is_bias) -> BitFit:
    """BitFit from the user's arguments, checked."""
    if not callable(is_bias):
        raise TypeError(f"bitfit: is_bias must be a callable (path, shape) -> bool, got {is_bias!r}.")
    return BitFit(budget=_base.required_budget("bitfit", budget), is_bias=is_bias)
