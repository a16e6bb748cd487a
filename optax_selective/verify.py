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
    """Bool array: where ``after``'s bit pattern differs from ``before``'s.

    The one rule of "unchanged" for both frameworks (the torch bridge's ``verify`` calls it
    too): ``0.0 -> -0.0`` is a change, a NaN that keeps its payload is not, another NaN
    payload is. Works for any fixed-size dtype (bfloat16 and float8 included).

    Example:
      >>> import numpy as np
      >>> changed_entries(np.array([0.0, np.nan, 1.0]), np.array([-0.0, np.nan, 1.0])).tolist()
      [True, False, False]
    """
    a, b = np.asarray(before), np.asarray(after)
    if a.shape != b.shape:
        raise VerificationError(f"shape changed from {a.shape} to {b.shape}")
    if a.dtype.itemsize != b.dtype.itemsize:
        raise VerificationError(f"dtype changed from {a.dtype} to {b.dtype}")
    return _bit_view(a) != _bit_view(b) if a.dtype.itemsize in _UINT else (
        (_bit_view(a) != _bit_view(b)).any(axis=-1)
    )


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bit_view(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    width = x.dtype.itemsize
    if width in _UINT:
        return x.view(_UINT[width])
    return x.view(np.uint8).reshape(x.shape + (width,))  # complex128 and wider


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
