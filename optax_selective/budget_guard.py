"""The budget invariant under ``jax.jit``: a step never moves more than ``budget`` entries.

A state restored from a checkpoint is data, and data can be forged or damaged: a
``SelectiveState.mask`` set to all true, compact slots pointing outside the mask. Every
``update`` checks, inside the compiled step:

* dense inner state and the chain form: that the mask selects at most ``budget`` entries (an
  O(N) reduction over the bool mask);
* compact inner state: that every filled slot points at an entry of the mask (an O(budget)
  gather). Its slots hold at most ``budget`` entries, so no compact step moves more whatever
  the mask says, and the mask is not counted in the step (that would keep a widened copy of
  every mask leaf alive); :func:`optax_selective.budget_used` raises on a compact state whose
  mask selects more than its slots hold.

When a check fails the step is **refused**: every update is the exact zero update (nothing
moves) and the returned mask is empty (so ``budget_used`` reads 0), and so are the compact
slots. Under ``jax.experimental.checkify`` with
``errors=checkify.user_checks`` the step also raises a ``JaxRuntimeError`` saying so.
:func:`optax_selective.validate_state` checks a restored state on the host, with messages.

Counts are exact for budgets below ``2**31 - 1`` (larger budgets are not checked here).

Example:
  >>> import jax.numpy as jnp
  >>> mask = [jnp.array([True, True, False]), jnp.array([True])]
  >>> [m.tolist() for m in within_budget(mask, 3)[0]]
  [[True, True, False], [True]]
  >>> [m.tolist() for m in within_budget(mask, 2)[0]]  # 3 selected, budget 2: refused
  [[False, False, False], [False]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from optax_selective import sharding
from optax_selective.compact.state import CompactState, slot_groups

_EXACT_LIMIT = 2**31 - 1

OVER_BUDGET_MSG = (
    "optax_selective: the optimizer state's mask selects more entries than the budget of "
    "{budget} (a forged or damaged checkpoint?); this step moved nothing. Check restored "
    "states with optax_selective.validate_state(state, params, budget=...)."
)
SLOTS_MSG = (
    "optax_selective: a compact slot of the optimizer state points outside its mask (a forged "
    "or damaged checkpoint?); this step moved nothing. Check restored states with "
    "optax_selective.validate_state(state, params, budget=...)."
)


def mask_within(mask: Sequence[Any], budget: int) -> jax.Array:
    """A traced bool: whether the bool leaves ``mask`` hold at most ``budget`` true entries.

    Example:
      >>> import jax.numpy as jnp
      >>> bool(mask_within([jnp.ones(3, bool), jnp.zeros(2, bool)], 3))
      True
    """
    cap = jnp.uint32(min(budget + 1, 2**31))
    total = jnp.zeros([], jnp.uint32)
    for m in mask:
        if m is None or jnp.size(m) == 0:
            continue
        s = jnp.sum(m, dtype=jnp.uint32)
        total = jnp.minimum(total + jnp.minimum(s, cap), cap)  # < 2**32: no wrap-around
    return total <= jnp.uint32(budget)


def within_budget(mask: Sequence[Any], budget: int | None) -> tuple[list[Any], jax.Array | bool]:
    """``(mask, ok)``: ``mask`` as it is while it selects at most ``budget`` entries, else all
    false; ``ok`` says which (a traced bool). With ``budget`` None or ``>= 2**31 - 1``
    nothing is checked.

    Example:
      >>> import jax.numpy as jnp
      >>> _, ok = within_budget([jnp.ones(4, bool)], 3)
      >>> bool(ok)
      False
    """
    mask = list(mask)
    if budget is None or budget >= _EXACT_LIMIT:
        return mask, True
    ok = mask_within(mask, budget)
    checkify.debug_check(ok, OVER_BUDGET_MSG.format(budget=budget))
    return [m if m is None else m & ok for m in mask], ok


def slots_in_mask(state: CompactState, mask: Sequence[Any], leaves: Sequence[Any],
                  budget: int) -> jax.Array:
    """A traced bool: whether every filled slot of the compact ``state`` points at a true
    entry of ``mask`` (``leaves``: the gradient or parameter leaves, for the slot layout)."""
    ok = jnp.asarray(True)
    groups = slot_groups(leaves, budget)
    if len(groups) != len(state.slots) or len(state.leaf) != len(state.slots):
        return ok  # another layout: CompactInner refuses it with its own message
    for g, slots, ids in zip(groups, state.slots, state.leaf):
        for i in g.leaves:
            where = (ids == i) & (slots >= 0)
            got = sharding.gather_leaf(mask[i], slots, where, jnp.bool_)
            ok = ok & jnp.all(got | ~where)
    return ok


def guard_compact(state: CompactState, mask: Sequence[Any], leaves: Sequence[Any],
                  budget: int) -> tuple[CompactState, jax.Array]:
    """``(state, ok)``: ``state`` unchanged while every filled slot lies in the mask, else its
    slots emptied (``-1``) so the step that follows moves nothing (the caller then empties the
    mask it returns with ``ok``). Call it before ``CompactInner.update``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optax_selective import compact
      >>> ci = compact.CompactInner(optax.with_extra_args_support(optax.sgd(1.0)), budget=2)
      >>> mask = [jnp.array([False, True, True])]
      >>> state = ci.init([jnp.zeros(3)], mask)
      >>> forged = [jnp.array([True, False, True])]  # slot 0 points at entry 1, not in it
      >>> state2, ok = guard_compact(state, forged, [jnp.zeros(3)], 2)
      >>> state2.slots[0].tolist(), bool(ok)
      ([-1, -1], False)
    """
    # No O(N) count of the mask here: compact slots hold at most ``budget`` entries, so no
    # compact step can move more, and counting a bool mask keeps a widened copy of every
    # mask leaf alive through the step (3x the parameters' bytes at 16 bits, measured).
    ok = slots_in_mask(state, mask, leaves, budget)
    checkify.debug_check(ok, SLOTS_MSG)
    slots = tuple(jnp.where(ok, s, jnp.full_like(s, -1)) for s in state.slots)
    filled = tuple(jnp.where(ok, f, jnp.zeros_like(f)) for f in state.filled)
    return state._replace(slots=slots, filled=filled), ok
