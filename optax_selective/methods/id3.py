"""ID3: incrementally unmask the top-k entries by the D3 score (DESIGN.md section 3)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, NamedTuple

import jax
from jax import lax

from optax_selective import selection, sharding
from optax_selective._tree import LeafLayout
from optax_selective.methods import _base, _registry


@_base.register_with_schedule
class ID3State(NamedTuple):
    """ID3's own state: the budget left after choose_all, fixed at init, and the (static)
    schedule the under-used budget check reads (:func:`optax_selective.make_summary`).

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> params = {"b": jnp.zeros(2), "w": jnp.ones(4)}
      >>> tx = osel.selective_id3(budget=5, max_steps=3, choose_all={"b": True, "w": False})
      >>> method_state = tx.init(params).method_state
      >>> int(method_state.effective_budget)  # 5 minus the 2 entries of the choose_all leaf
      3
    """

    effective_budget: jax.Array  # int32 scalar
    schedule: _base.SpendSchedule | None = None


def check_exp_eps(exp: Any, eps: Any) -> None:
    """Refuses a non-finite ``exp`` or a negative (or NaN) ``eps``; traced values pass.

    Any finite ``exp`` is valid: the ID3 paper's sensitivity sweep uses exp in {-2, -1, 1, 2}
    (a negative exp favours large parameters). ``eps >= 0`` keeps ``|θ| + eps`` positive.
    The one check for both frameworks (:class:`ID3` runs it on construction).
    """
    for name, value in (("exp", exp), ("eps", eps)):
        if isinstance(value, jax.core.Tracer):  # optax.inject_hyperparams: checked by the user
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if isinstance(value, bool) or number is None:
            raise TypeError(f"id3: {name} must be a number, got {value!r}.")
        if name == "exp" and not math.isfinite(number):
            raise ValueError(f"id3: exp must be a finite number (any sign), got {value}.")
        if name == "eps" and not number >= 0:
            raise ValueError(f"id3: eps must be >= 0, got {value}.")


@dataclasses.dataclass(frozen=True)
class ID3:
    """ID3's rule: each of the first ``max_steps`` updates adds the entries with the highest
    D3 score ``|g| / (|θ| + eps) ** exp`` among those not yet selected.

    Update ``t`` adds ``B // max_steps`` entries, one more while ``t < B % max_steps``, where
    ``B`` is the budget left after the choose_all leaves; after ``max_steps`` updates exactly
    ``budget`` entries are selected and the mask is frozen. Build it with checked arguments
    through :func:`optax_selective.selective_id3` or ``methods.build("id3", ...)``; the
    constructor checks ``exp`` and ``eps`` only.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> from optax_selective.methods import ID3
      >>> method = ID3(budget=2, max_steps=1)  # both entries join at the first update
      >>> method.k_max, method.frozen_after
      (2, 1)
      >>> tx = osel.selective(method)  # chain form: zeroes the gradient outside the mask
      >>> params = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}
      >>> _, state = tx.update({"w": jnp.array([4.0, 1.0, 3.0, 0.0])}, tx.init(params), params)
      >>> osel.selected_mask(state)["w"].tolist()  # scores |g| / |θ|: 4, 0.5, 1, 0
      [True, False, True, False]
    """

    budget: int
    max_steps: int
    exp: Any = 1.0
    eps: Any = 1e-8
    name: str = "id3"
    needs_params: bool = True
    leafwise = True  # a LeafwiseMethod: each step is the top-k of the elementwise D3 score

    def __post_init__(self):
        check_exp_eps(self.exp, self.eps)

    @property
    def frozen_after(self) -> int:
        """The mask is frozen after ``max_steps`` updates."""
        return self.max_steps

    # The rule in pieces, shared with the torch FSDP2 runner (torch_bridge.distributed), which
    # scores its shards with `score` and merges candidates with selection.merge_candidates.
    def effective_budget(self, layout: LeafLayout) -> int:
        """``B_eff`` after checking the budget against the (whole) parameters."""
        _base.check_not_full(self.name, self.budget, layout)
        return _base.effective_budget(self.name, self.budget, layout, at_least=1)

    def score(self, grad, param, mask):
        """The D3 score with already selected entries excluded (elementwise)."""
        return selection.exclude(selection.d3_score(grad, param, self.exp, self.eps), mask)

    def increment(self, count, effective_budget):
        """``k_t``: entries to add at update ``count``."""
        return selection.id3_increment(count, effective_budget, self.max_steps)

    @property
    def k_max(self) -> int:
        """Static bound on :meth:`increment`."""
        return selection.max_increment(self.budget, self.max_steps)

    def init(self, params, layout: LeafLayout):
        b_eff = self.effective_budget(layout)
        return _base.choose_all_mask(layout), ID3State(
            jax.numpy.asarray(b_eff, jax.numpy.int32), _base.SpendSchedule(self.budget, self.max_steps)
        )

    def update(self, mask, state: ID3State, count, grads, params, selectable, *, report_added=False):
        shapes = [g if ok else None for g, ok in zip(grads, selectable)]
        if sharding.split_mode(shapes) is None:
            # Not split over devices: the indices form scores inside the selection pass (no
            # full score arrays written), sets the new entries in place and knows them.
            mask, added = self._grow_in_place(mask, state, count, grads, params, selectable)
            return (mask, state, added) if report_added else (mask, state)
        k = self.increment(count, state.effective_budget)
        k_max = self.k_max

        def grow(mask):
            scores = [
                self.score(g, p, m) if ok else None
                for g, p, m, ok in zip(grads, params, mask, selectable)
            ]
            new = selection.top_k_masks(scores, k, k_max)
            return [m if n is None else m | n for m, n in zip(mask, new)]

        # After max_steps the mask is frozen: skip the scoring work entirely.
        mask = lax.cond(count < self.max_steps, grow, lambda m: list(m), list(mask))
        # Split over devices, the entries are not listed (that would gather the scores).
        return (mask, state, None) if report_added else (mask, state)

    def update_with_indices(self, mask, state, count, grads, params, selectable):
        """Deprecated: use ``update(..., report_added=True)``."""
        warnings.warn(
            "ID3.update_with_indices is deprecated; use update(..., report_added=True), which "
            "returns None for the added entries where the leaves are split over devices.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.update(mask, state, count, grads, params, selectable, report_added=True)

    def _grow_in_place(self, mask, state: ID3State, count, grads, params, selectable):
        """The new mask and the entries added, as ``(leaf, index, valid)`` slots (what the
        compact inner state needs), without a pass to find them in the mask."""
        k = self.increment(count, state.effective_budget)
        k_max = self.k_max

        def grow(mask):
            inputs = [(g, p, m) if ok else None for g, p, m, ok in zip(grads, params, mask, selectable)]
            leaf, local, valid = selection.top_k_indices(inputs, k, k_max, score_fn=self.score)
            # Set the new entries in place (no second mask and no OR pass over all entries).
            # A mask typed over size-1 mesh axes is whole on one device: write it untyped, as
            # top_k_masks does, and give the result the mask's type back.
            new = [
                m if not ok else sharding.retype_like(jax.numpy.reshape(
                    jax.numpy.reshape(sharding.unsplit(m), (-1,))
                    .at[jax.numpy.where(valid & (leaf == i), local, m.size)]
                    .set(True, mode="drop"), m.shape), m)
                for i, (m, ok) in enumerate(zip(mask, selectable))
            ]
            return new, (leaf, local, valid)

        def keep(mask):
            z = jax.numpy.zeros((k_max,), jax.numpy.int32)
            return list(mask), (z, z, jax.numpy.zeros((k_max,), bool))

        # After max_steps the mask is frozen: skip the scoring work entirely.
        return lax.cond(count < self.max_steps, grow, keep, list(mask))

    # -- on shards (torch FSDP2): the same score and increment, top-k done by the runner --------
    def shard_init(self, shards, starts, layout: LeafLayout) -> _base.ShardInit:
        del shards, starts
        return _base.ShardInit(self.effective_budget(layout), [0] * len(layout.shapes))

    def shard_update(self, state, count, grads, params, masks):
        if count >= self.max_steps:
            return None, 0, state
        k = int(self.increment(jax.numpy.int32(count), jax.numpy.int32(state)))
        scores = [
            None if g is None else _score_jit(self, g, p, m)
            for g, p, m in zip(grads, params, masks)
        ]
        return scores, k, state


_score_jit = jax.jit(ID3.score, static_argnums=0)


@_registry.register("id3")
def make_id3(*, budget=None, max_steps=None, exp=1.0, eps=1e-8) -> ID3:
    """ID3 from the user's arguments, checked (see :func:`optax_selective.selective_id3`)."""
    budget = _base.required_budget("id3", budget)
    max_steps = _base.require(
        "id3", "max_steps", max_steps, "number of optimizer steps over which the budget is spent"
    )
    max_steps = _base.check_int("max_steps", max_steps, 1)
    check_exp_eps(exp, eps)  # any finite exp, eps >= 0
    exp, eps = (v if isinstance(v, jax.Array) else float(v) for v in (exp, eps))
    return ID3(budget=budget, max_steps=max_steps, exp=exp, eps=eps)
