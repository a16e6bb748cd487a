"""Check after training that selective fine-tuning kept its promise."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from optax_selective._tree import leaf_paths, unwrap_nnx
from optax_selective.inspect import selected_mask


class VerificationError(AssertionError):
    """Raised by :func:`verify` when the budget or the mask was not respected."""


def changed_entries(before: Any, after: Any) -> np.ndarray:
    """Bool array: where ``after`` differs from ``before`` (exact; NaN equal to NaN)."""
    a, b = np.asarray(before), np.asarray(after)
    if a.shape != b.shape:
        raise VerificationError(f"shape changed from {a.shape} to {b.shape}")
    same = a == b
    if np.issubdtype(a.dtype, np.inexact) or a.dtype.kind == "V":
        same |= np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64))
    return ~same


def verify(params_before: Any, params_after: Any, opt_state: Any, budget: int) -> None:
    """Checks that at most ``budget`` entries are selected and nothing unselected changed.

    Raises:
      VerificationError: naming each offending leaf and how many entries broke the rule.

    Example:
      >>> import jax.numpy as jnp, optax, optax_selective as osel
      >>> params = {"w": jnp.array([1.0, 0.0])}
      >>> tx = osel.selective_pafi(budget=1, inner=optax.adamw(0.1, weight_decay=0.5))
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)
      >>> osel.verify(params, optax.apply_updates(params, updates), state, budget=1)
    """
    mask = selected_mask(opt_state)
    params_before, params_after = unwrap_nnx(params_before), unwrap_nnx(params_after)
    leaves_b, tree_b = jax.tree.flatten(params_before)
    leaves_a, tree_a = jax.tree.flatten(params_after)
    if tree_a != tree_b:
        raise VerificationError(f"params structure changed: {tree_b} vs {tree_a}")
    leaves_m = tree_b.flatten_up_to(mask)
    used = sum(int(np.sum(np.asarray(m))) for m in leaves_m)
    problems = []
    if used > budget:
        problems.append(f"{used} entries are selected, over the budget of {budget}")
    for path, b, a, m in zip(leaf_paths(params_before), leaves_b, leaves_a, leaves_m):
        bad = int(np.sum(changed_entries(b, a) & ~np.asarray(m)))
        if bad:
            problems.append(f"{path}: {bad} unselected entries changed")
    if problems:
        raise VerificationError("selective fine-tuning check failed:\n  " + "\n  ".join(problems))
