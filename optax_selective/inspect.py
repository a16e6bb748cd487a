"""Find the selective state inside any nested optax (or flax.nnx-wrapped) state."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from optax_selective._tree import unwrap_nnx
from optax_selective.transform import SelectiveState


def find_selective_state(opt_state: Any) -> SelectiveState:
    """The one :class:`SelectiveState` inside ``opt_state`` (chain, MultiSteps, nnx, ...).

    Example:
      >>> import jax.numpy as jnp, optax, optax_selective as osel
      >>> tx = optax.MultiSteps(optax.chain(osel.selective_pafi(budget=1), optax.sgd(0.1)), 2)
      >>> int(osel.find_selective_state(tx.init({"w": jnp.ones(3)})).count)
      0

    Raises:
      ValueError: if there is none, or more than one.
    """
    opt_state = unwrap_nnx(opt_state)
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SelectiveState))
        if isinstance(s, SelectiveState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one SelectiveState in the optimizer state, found {len(found)}; "
            "build the optimizer with one optax_selective transformation."
        )
    return found[0]


def selected_mask(opt_state: Any) -> Any:
    """The bool mask pytree (shaped like params): true where an entry may change.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> state = osel.selective_pafi(budget=1).init({"w": jnp.array([2.0, -0.5, 1.0])})
      >>> osel.selected_mask(state)["w"].tolist()
      [False, True, False]
    """
    return find_selective_state(opt_state).mask


def budget_used(opt_state: Any) -> int:
    """Number of entries selected so far, as a Python int."""
    return int(sum(int(np.sum(np.asarray(m))) for m in jax.tree.leaves(selected_mask(opt_state))))
