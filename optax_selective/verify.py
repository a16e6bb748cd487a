"""Check after training that selective fine-tuning kept its promise."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from optax_selective._tree import unwrap_nnx
from optax_selective.compact.check import compact_problems
from optax_selective.compact.state import CompactState
from optax_selective.inspect import find_selective_state


class VerificationError(AssertionError):
    """Raised by :func:`verify` when the budget or the mask was not respected.

    Example:
      >>> import jax.numpy as jnp, optax, optax_selective as osel
      >>> params = {"w": jnp.array([1.0, 0.0])}
      >>> state = osel.selective_pafi(budget=1, inner=optax.sgd(0.1)).init(params)  # w[1]
      >>> try:
      ...     osel.verify(params, {"w": jnp.array([2.0, 0.0])}, state, budget=1)
      ... except osel.VerificationError as e:
      ...     print(e)
      selective fine-tuning check failed:
        ['w']: 1 unselected entries changed
    """


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

    "Changed" means a different bit pattern (:func:`changed_entries`): ``0.0 -> -0.0`` is a
    change, as in the torch bridge. The one exception the library documents: XLA's CPU
    arithmetic flushes subnormal numbers to zero, so an unselected subnormal can read back
    as zero after an update computed there (docs/concepts-guarantees.md).

    The leaves compared are those the optimizer's mask covers, matched by their key paths,
    so params may be a pytree, ``nnx.state(model, nnx.Param)``, ``nnx.to_pure_dict(...)`` of
    it, or the full ``nnx.state(model)`` (BatchNorm statistics, RNG counters and other leaves
    the optimizer does not update are not compared). ``opt_state`` may be any state that
    holds the selective state, ``nnx.Optimizer.opt_state`` or ``nnx.state(optimizer)``.

    Raises:
      VerificationError: naming each offending leaf and how many entries broke the rule, or
        the leaves the mask covers that ``params_before`` / ``params_after`` lack (or hold
        with another shape). For the chain form it says why unselected entries can move
        (decoupled weight decay) and what to do (``inner=``).

    Example:
      >>> import jax.numpy as jnp, optax, optax_selective as osel
      >>> params = {"w": jnp.array([1.0, 0.0])}
      >>> tx = osel.selective_pafi(budget=1, inner=optax.adamw(0.1, weight_decay=0.5))
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)
      >>> osel.verify(params, optax.apply_updates(params, updates), state, budget=1)
    """
    state = find_selective_state(opt_state)
    masks = _keyed(state.mask)
    before, after = _keyed(params_before), _keyed(params_after)
    structural = []
    for name, tree in (("params_before", before), ("params_after", after)):
        missing = [k for k in masks if k not in tree]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            structural.append(
                f"{name} has no leaf at {shown}, which the optimizer's mask covers "
                f"({len(missing)} of {len(masks)} leaves; {name} has e.g. "
                f"{', '.join(list(tree)[:3]) or 'no leaves'})"
            )
    if structural:
        raise VerificationError(
            "params do not match the optimizer state:\n  " + "\n  ".join(structural)
            + "\nPass the params the optimizer was built on (for flax.nnx: nnx.state(model, "
            "nnx.Param), nnx.to_pure_dict of it, or nnx.state(model))."
        )
    used = sum(int(np.sum(np.asarray(m))) for m in masks.values())
    problems = []
    if used > budget:
        problems.append(f"{used} entries are selected, over the budget of {budget}")
    if isinstance(state.inner_state, CompactState):  # where the compact form's updates go
        problems += compact_problems(state.inner_state, list(masks.values()),
                                     names=list(masks))
    moved = False
    for key, m in masks.items():
        b, a = before[key], after[key]
        for name, x in (("params_before", b), ("params_after", a)):
            if np.shape(x) != np.shape(m):
                raise VerificationError(
                    f"{name}{key} has shape {np.shape(x)} but the optimizer's mask for it has "
                    f"shape {np.shape(m)}; pass the params the optimizer was built on."
                )
        try:
            bad = int(np.sum(changed_entries(b, a) & ~np.asarray(m)))
        except VerificationError as e:
            raise VerificationError(f"{key}: {e}") from None
        if bad:
            moved = True
            problems.append(f"{key}: {bad} unselected entries changed")
    if moved and isinstance(state.inner_state, optax.EmptyState):
        problems.append(CHAIN_FORM_HINT)
    if problems:
        raise VerificationError("selective fine-tuning check failed:\n  " + "\n  ".join(problems))


CHAIN_FORM_HINT = (
    "This optimizer uses the chain form (optax.chain(selective_..., optimizer)), which only "
    "zeroes the gradient of unselected entries. An optimizer that moves entries whose gradient "
    "is zero changes them anyway: decoupled weight decay (optax.adamw, "
    "optax.add_decayed_weights) moves every entry, and Adam in float16 gives NaN. Use the "
    "wrapper form, selective_<method>(..., inner=optax.adamw(...)), which zeroes the "
    "optimizer's updates outside the mask whatever the optimizer does."
)


def _keyed(tree: Any) -> dict[str, Any]:
    """``{key path: leaf}``; nnx Variables unwrapped, so a ``State`` and its pure dict match."""
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(unwrap_nnx(tree))[0]}
