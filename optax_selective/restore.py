"""Checking an optimizer state restored from a checkpoint before training on it.

A checkpoint is data: a forged or damaged one can hold a ``SelectiveState.mask`` over the
budget, compact slots outside the mask, a negative step count or NaN optimizer moments.
Every ``update`` refuses a state over the budget inside the compiled step
(:mod:`optax_selective.budget_guard`: nothing moves); :func:`validate_state` says what is
wrong, on the host, before the first step. Call it right after the restore (orbax, pickle,
``flax.serialization``; see docs/guides/checkpointing.md).

Example:
  >>> import jax, jax.numpy as jnp, optax, optax_selective as osel
  >>> params = {"w": jnp.arange(1.0, 6.0)}
  >>> tx = osel.selective_pafi(budget=2, inner=optax.sgd(0.1))
  >>> state = tx.init(params)
  >>> osel.validate_state(state, params, budget=2, tx=tx)  # a good state: no error
  >>> forged = state._replace(mask=jax.tree.map(jnp.ones_like, state.mask))
  >>> osel.validate_state(forged, params, budget=2)
  Traceback (most recent call last):
  optax_selective.restore.StateValidationError: optimizer state: its mask selects 5 entries, more than the budget of 2 (a forged or damaged checkpoint; restore another one).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_selective._tree import is_float, unwrap_nnx
from optax_selective.compact.check import compact_problems
from optax_selective.compact.state import CompactState
from optax_selective.inspect import find_selective_state

_SECOND_MOMENT = re.compile(r"\.nu(\[|\.|$)")  # optax's Adam-family second moments
_FIX = "(a forged or damaged checkpoint; restore another one)"


class StateValidationError(ValueError):
    """Raised by :func:`validate_state`, naming the field of the state that is wrong.

    Example:
      >>> issubclass(StateValidationError, ValueError)
      True
    """


def _keyed(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(unwrap_nnx(tree))[0]}


def validate_state(opt_state: Any, params: Any, *, budget: int | None,
                   tx: Any = None) -> None:
    """Checks a restored optimizer state against ``params`` and the ``budget``; raises if a
    step on it could do anything but what an honest state does.

    Checks: the selective state's ``count`` is an int32 ``>= 0``; its mask is bool, shaped
    like ``params`` leaf by leaf, true only on floating-point leaves and at most ``budget``
    entries; with compact inner state, every filled slot points at a distinct masked entry
    in range and every masked entry has its slot; every floating-point leaf of the whole
    state is finite and optax's second moments (``nu``) are ``>= 0``. With ``tx`` (the
    transformation the state belongs to, e.g. the whole ``optax.chain``) the state's tree
    structure, shapes and dtypes must equal those of ``tx.init(params)`` (computed
    abstractly, nothing runs).

    Args:
      opt_state: the restored state (any state holding one :class:`SelectiveState`).
      params: the parameters it will train (a pytree, or ``nnx.state(model, nnx.Param)``).
      budget: the budget the transformation was built with (None: ``selective_fft``).
      tx: optionally, the transformation, for the structure check.

    Raises:
      StateValidationError: naming every field that is wrong (the first 20).

    Example:
      >>> import jax.numpy as jnp, optax, optax_selective as osel
      >>> params = {"w": jnp.ones(3)}
      >>> tx = osel.selective_pafi(budget=1, inner=optax.adam(0.1))
      >>> osel.validate_state(tx.init(params), params, budget=1, tx=tx)
    """
    problems: list[str] = []
    if tx is not None:
        problems += _structure_problems(opt_state, tx, params)
        if problems:
            _raise(problems)
    state = find_selective_state(opt_state)
    count = np.asarray(state.count)
    if count.shape != () or count.dtype != np.int32 or int(count) < 0:
        problems.append(f"count {count!r} is not an int32 scalar >= 0")
    mask, ps = _keyed(state.mask), _keyed(params)
    missing = [k for k in mask if k not in ps]
    if missing or len(mask) != len(ps):
        _raise([f"its mask covers leaves {sorted(mask)[:3]}, params have {sorted(ps)[:3]} "
                f"({len(mask)} and {len(ps)} leaves)"])
    total = 0
    for k, m in mask.items():
        m = np.asarray(m)
        if m.dtype != np.bool_ or m.shape != np.shape(ps[k]):
            problems.append(f"mask{k} is {m.dtype} {m.shape}, expected bool {np.shape(ps[k])}")
            continue
        n = int(m.sum())
        if n and not is_float(ps[k]):
            problems.append(f"mask{k} selects {n} entries of a {np.asarray(ps[k]).dtype} leaf")
        total += n
    if budget is not None and total > budget:
        problems.append(f"its mask selects {total} entries, more than the budget of {budget}")
    if not problems and isinstance(state.inner_state, CompactState):
        keys = list(mask)
        problems += compact_problems(state.inner_state, [mask[k] for k in keys],
                                     [ps[k] for k in keys], budget, names=keys)
    problems += _value_problems(opt_state)
    if problems:
        _raise(problems)


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise StateValidationError(f"optimizer state: {problems[0]} {_FIX}.")
    raise StateValidationError(
        f"optimizer state {_FIX}:\n  " + "\n  ".join(problems[:20])
        + (f"\n  and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _structure_problems(opt_state: Any, tx: Any, params: Any) -> list[str]:
    expected = jax.eval_shape(tx.init, params)
    got_def, want_def = jax.tree.structure(opt_state), jax.tree.structure(expected)
    if got_def != want_def:
        return [f"its tree structure differs from tx.init(params)'s ({got_def.num_leaves} "
                f"leaves, expected {want_def.num_leaves}): saved by another optimizer?"]
    out = []
    got = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    for (path, x), want in zip(got, jax.tree.leaves(expected)):
        shape = np.shape(x)
        dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
        if shape != tuple(want.shape) or dtype != want.dtype:
            out.append(f"{jax.tree_util.keystr(path)} is {dtype} {shape}, tx.init gives "
                       f"{want.dtype} {tuple(want.shape)}")
    return out


def _value_problems(opt_state: Any) -> list[str]:
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(unwrap_nnx(opt_state))[0]:
        try:
            a = np.asarray(x)
        except Exception:  # noqa: BLE001  (not an array: nothing to check)
            continue
        name = jax.tree_util.keystr(path)
        if jnp.issubdtype(a.dtype, jnp.inexact) and a.size and not np.isfinite(a).all():
            out.append(f"{name} holds NaN or infinity")
        elif _SECOND_MOMENT.search(name) and jnp.issubdtype(a.dtype, jnp.floating) and (a < 0).any():
            out.append(f"{name} (a second moment) holds negative values")
        elif name.endswith(".count") and np.issubdtype(a.dtype, np.integer) and (a < 0).any():
            out.append(f"{name} is negative")
    return out
