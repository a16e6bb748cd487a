"""Find the selective state inside any nested optax (or flax.nnx-wrapped) state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from optax_selective._tree import unwrap_nnx
from optax_selective.compact.check import compact_problems
from optax_selective.compact.state import CompactState
from optax_selective.transform import SelectiveState


def find_selective_state(opt_state: Any) -> SelectiveState:
    """The one :class:`SelectiveState` inside ``opt_state`` (chain, MultiSteps, nnx, ...).

    Accepts ``nnx.Optimizer.opt_state`` and ``nnx.state(optimizer)`` too; the latter stores
    the state's fields as a dict (then ``method_state`` is a dict, not the method's type).

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
    if not found:  # nnx.state(optimizer): NamedTuples are stored as dicts of their fields
        found = [_from_fields(d) for d in _mappings(opt_state) if _looks_selective(d)]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one SelectiveState in the optimizer state, found {len(found)}; "
            "build the optimizer with one optax_selective transformation."
        )
    return found[0]


def _mappings(tree: Any):
    """Every dict-like node of ``tree`` (dicts and flax ``State``), outermost first."""
    if isinstance(tree, Mapping):
        yield tree
        for v in tree.values():
            yield from _mappings(v)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from _mappings(v)


def _looks_selective(d: Mapping) -> bool:
    return "count" in d and "mask" in d and set(d) <= set(SelectiveState._fields)


def _from_fields(d: Mapping) -> SelectiveState:
    empty = optax.EmptyState()
    return SelectiveState(d["count"], d["mask"], d.get("method_state", empty), d.get("inner_state", empty))


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
    """Number of entries selected so far, as a Python int.

    With compact inner state the count is checked against the slots (where the updates
    go): a state whose mask and slots disagree (forged or damaged) raises ``ValueError``
    rather than report a number that is not what can change. A state whose mask selects
    more than the budget reads 0 after its first ``update``, which refuses it and moves
    nothing (:mod:`optax_selective.budget_guard`); :func:`optax_selective.validate_state`
    checks a restored state fully.

    Example:
      >>> import jax.numpy as jnp, optax, optax_selective as osel
      >>> tx = optax.chain(osel.selective_bitfit(budget=2), optax.sgd(0.1))
      >>> osel.budget_used(tx.init({"b": jnp.zeros(3), "w": jnp.ones((2, 2))}))
      2
    """
    state = find_selective_state(opt_state)
    masks = jax.tree.leaves(state.mask)
    if isinstance(state.inner_state, CompactState):
        problems = compact_problems(state.inner_state, masks)
        if problems:
            raise ValueError(
                "budget_used: the optimizer state is inconsistent (a forged or damaged "
                f"checkpoint?): {'; '.join(problems[:3])}. Check it with "
                "optax_selective.validate_state(state, params, budget=...)."
            )
    return int(sum(int(np.sum(np.asarray(m))) for m in masks))


class BudgetShortfallWarning(UserWarning):
    """Emitted once when training ends with fewer entries selected than the budget allows.

    :func:`optax_selective.make_summary` (and the torch bridge's ``post_train_work``) warns
    with it; the message names the likely cause.

    Example:
      >>> import warnings, jax.numpy as jnp, optax_selective as osel
      >>> params = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
      >>> tx = osel.selective_id3(budget=4, max_steps=4)  # one entry per update, for 4 updates
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.ones(4)}, state, params)  # but only 1 update ran
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     summary = osel.make_summary(params, state)
      >>> caught[0].category is osel.BudgetShortfallWarning
      True
      >>> str(caught[0].message).split(":")[0]
      'id3 selected 1 of its budget of 4 entries (25.0%)'
    """


def budget_shortfall_message(
    used: int,
    budget: int,
    method_name: str,
    *,
    steps_run: int | None = None,
    max_steps: int | None = None,
) -> str | None:
    """Says why the budget was under-used, or None when ``used >= budget``.

    One rule for both frameworks: :func:`optax_selective.make_summary` calls it, and so does
    the torch bridge (``post_train_work`` / ``get_summary``). Selection is never changed by
    it; the message only says what happened and the likely cause.

    Args:
      used: entries selected (choose_all leaves included).
      budget: the budget the method was built with (choose_all leaves included).
      method_name: ``"id3"``, ``"fish"``, ... (named in the message).
      steps_run: optimizer updates applied so far, if known.
      max_steps: updates over which the method spends its budget (ID3's ``max_steps``,
        FISH's ``fish_steps``), if it has such a schedule.

    Example:
      >>> from optax_selective.inspect import budget_shortfall_message
      >>> msg = budget_shortfall_message(554, 2000, "id3", steps_run=277, max_steps=1000)
      >>> msg.split(":")[0]
      'id3 selected 554 of its budget of 2000 entries (27.7%)'
      >>> budget_shortfall_message(2000, 2000, "id3") is None
      True
    """
    used, budget = int(used), int(budget)
    if used >= budget:
        return None
    head = f"{method_name} selected {used} of its budget of {budget} entries ({100 * used / budget:.1f}%)"
    if max_steps is not None and steps_run is not None and steps_run < max_steps:
        cause = (
            f"only {steps_run} of max_steps={max_steps} optimizer updates ran. Set max_steps to "
            "the number of optimizer updates, not of batches (with gradient accumulation, e.g. "
            "optax.MultiSteps or accumulate_grad_batches, that is batches / accumulation steps)."
        )
    elif max_steps is not None:
        cause = (
            f"some of the first {max_steps} updates had fewer selectable entries with a finite "
            "score than were due that step (non-finite gradients or parameters, e.g. a "
            "skipped overflow step, or parameters that got no gradient in that step); picks "
            "missed in a step are not made up later."
        )
    else:
        cause = "fewer eligible entries with a usable score than the budget."
    return (
        f"{head}: {cause} Selection is unchanged by this warning (it follows the method's "
        "rule exactly)."
    )


def warn_budget_shortfall(
    used: int, budget: int, method_name: str, *, stacklevel: int = 1, **kwargs: Any
) -> str | None:
    """Warns (``BudgetShortfallWarning``) with :func:`budget_shortfall_message`; returns it.

    ``stacklevel`` counts from the caller of this function (1: the caller's line). Python's
    default warning filter shows a given message once per line that triggers it.
    """
    message = budget_shortfall_message(used, budget, method_name, **kwargs)
    if message is not None:
        import warnings

        warnings.warn(message, BudgetShortfallWarning, stacklevel=stacklevel + 1)
    return message
