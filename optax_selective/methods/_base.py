"""What every selection method provides, and the budget rules they share.

A method works on flat lists of leaves (leaf order), so the optax transform and the torch
bridge drive it the same way. ``init`` returns the first mask and the method's own state;
``update`` returns the mask after one step (the identity for fixed-mask methods).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from optax_selective._tree import LeafLayout

Leaves = list[jax.Array]
MAX_BUDGET = 2**31 - 1


class Method(Protocol):
    name: str
    needs_params: bool  # whether ``update`` reads the current parameters
    # ``update`` is the identity once ``count >= frozen_after`` (0 for fixed masks, None if the
    # mask may change at any step); lets callers such as the torch bridge skip the call.
    frozen_after: int | None

    def init(self, params: Sequence[jax.Array], layout: LeafLayout) -> tuple[Leaves, Any]: ...

    def update(
        self,
        mask: Leaves,
        state: Any,
        count: jax.Array,
        grads: Sequence[jax.Array | None],
        params: Sequence[jax.Array] | None,
        selectable: Sequence[bool],
    ) -> tuple[Leaves, Any]: ...


def check_int(name: str, value: Any, minimum: int, maximum: int = MAX_BUDGET) -> int:
    """Validates an int argument at construction and returns it as a Python int."""
    traced = isinstance(value, jax.core.Tracer)
    if traced or isinstance(value, bool) or not hasattr(value, "__index__"):
        hint = ""
        if traced:  # most likely optax.inject_hyperparams turned it into a traced array
            hint = f" (With optax.inject_hyperparams, add {name!r} to static_args.)"
        raise TypeError(
            f"{name} must be an int, got {value!r} of type {type(value).__name__}.{hint}"
        )
    value = operator.index(value)
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}.")
    return value


def check_budget(budget: Any) -> int:
    """Validates a budget: a positive int that fits the int32 step arithmetic."""
    return check_int("budget", budget, 1)


def effective_budget(method: str, budget: int, layout: LeafLayout, *, at_least: int) -> int:
    """``B_eff = budget - |choose_all|``, checked against the parameters (DESIGN.md section 2)."""
    total = layout.num_choose_all + layout.num_selectable
    if total == 0:
        raise ValueError(
            f"{method}: params has no floating-point leaves, so there is nothing to select."
        )
    b_eff = budget - layout.num_choose_all
    if b_eff < at_least:
        raise ValueError(
            f"{method}: the choose_all leaves hold {layout.num_choose_all} entries but budget is "
            f"{budget}, leaving {b_eff} for selection (needs >= {at_least}). Raise the budget "
            "or choose fewer leaves with choose_all."
        )
    return b_eff


def check_not_full(method: str, budget: int, layout: LeafLayout) -> None:
    """Refuses a budget above the eligible entries (that would be full fine-tuning)."""
    total = layout.num_choose_all + layout.num_selectable
    if total == 0:
        raise ValueError(f"{method}: params has no floating-point leaves, so there is nothing to select.")
    if budget > total:
        raise ValueError(
            f"{method}: budget {budget} is larger than the {total} eligible (floating-point) "
            "entries of params; that is full fine-tuning, use selective_fft() instead."
        )


def choose_all_mask(layout: LeafLayout) -> Leaves:
    """The starting mask: choose_all leaves fully selected, every other leaf empty."""
    return [jnp.full(shape, c, dtype=bool) for shape, c in zip(layout.shapes, layout.choose_all)]


def frozen_update(mask, state, count, grads, params, selectable):
    """``update`` for fixed-mask methods: nothing changes after init."""
    del count, grads, params, selectable
    return mask, state


@dataclasses.dataclass(frozen=True)
class SpendSchedule:
    """Static facts a method's state carries for the under-used budget check.

    ``budget`` is the method's budget (choose_all included); ``steps`` the updates over which
    it is spent (ID3's ``max_steps``, FISH's ``fish_steps``). Registered as a pytree node
    with no leaves, so it adds nothing to checkpoints (states saved before it existed
    restore into targets that have it) and is static under ``jax.jit``.
    """

    budget: int
    steps: int


def register_with_schedule(state_type: type) -> type:
    """Registers a method's state NamedTuple whose last field is a ``SpendSchedule``.

    The schedule goes into the tree definition (static under ``jax.jit``), not the leaves, and
    the other fields keep their namedtuple key paths: checkpoints hold exactly the arrays
    they held before the field existed, and restore into states that have it.
    """
    names = state_type._fields[:-1]
    keys = tuple(jax.tree_util.GetAttrKey(n) for n in names)

    def flatten_with_keys(state):
        return tuple(zip(keys, state[:-1])), state[-1]

    def unflatten(schedule, children):
        return state_type(*children, schedule)

    jax.tree_util.register_pytree_with_keys(
        state_type, flatten_with_keys, unflatten, flatten_func=lambda s: (tuple(s[:-1]), s[-1])
    )
    return state_type


class PaFIState(NamedTuple):
    """PaFI keeps no state of its own; the type names the method (``make_summary`` reads it)."""


class BitFitState(NamedTuple):
    """BitFit keeps no state of its own; the type names the method."""


class RandomState(NamedTuple):
    """The random mask keeps no state of its own; the type names the method."""


class FFTState(NamedTuple):
    """Full fine-tuning keeps no state of its own; the type names the method."""
