"""ID3: incrementally unmask the top-k entries by the D3 score (DESIGN.md section 3)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial
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


@_base.register_with_schedule
class ID3OptionsState(NamedTuple):
    """ID3's state when an option is on (:class:`ID3` with ``score_decay`` or ``leaf_share``).

    Attributes:
      effective_budget: int32 scalar, the budget left after choose_all, fixed at init.
      score_avg: one float32 array per leaf (leaf order): with ``score_decay``, the running
        average of the D3 score, shaped like the leaf for selectable leaves; shape ``(0,)``
        for the other leaves, and for every leaf without ``score_decay``.
      schedule: static, for the under-used budget check.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> params = {"w": jnp.ones(3)}
      >>> tx = osel.selective_id3(budget=1, max_steps=2, score_decay=0.5)
      >>> _, state = tx.update({"w": jnp.array([2.0, -4.0, 0.0])}, tx.init(params), params)
      >>> state.method_state.score_avg[0].tolist()  # 0.5 * 0 + 0.5 * |g| / |θ|
      [1.0, 2.0, 0.0]
    """

    effective_budget: jax.Array
    score_avg: list[jax.Array]
    schedule: _base.SpendSchedule | None = None


def check_options(score_decay: Any, leaf_share: Any) -> None:
    """Refuses a ``score_decay`` outside (0, 1) or a ``leaf_share`` outside (0, 1]
    (``None`` turns an option off).

    Example:
      >>> from optax_selective.methods.id3 import check_options
      >>> check_options(0.9, None)
      >>> check_options(1.0, None)
      Traceback (most recent call last):
      ...
      ValueError: id3: score_decay must be in (0, 1) or None (off), got 1.0.
    """
    for name, value, top_open in (("score_decay", score_decay, True),
                                  ("leaf_share", leaf_share, False)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"id3: {name} must be a Python number or None (off), got {value!r} "
                f"(it is static: it fixes the compiled program)."
            )
        ok = 0 < value < 1 if top_open else 0 < value <= 1
        if not ok:
            rng = "(0, 1)" if top_open else "(0, 1]"
            raise ValueError(f"id3: {name} must be in {rng} or None (off), got {value}.")


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
    score_decay: float | None = None
    leaf_share: float | None = None

    def __post_init__(self):
        check_exp_eps(self.exp, self.eps)
        check_options(self.score_decay, self.leaf_share)

    @property
    def leafwise(self) -> bool:
        """A LeafwiseMethod (each step the top-k of the elementwise D3 score) unless an
        option is on: the smoothed score needs the method's state and the per-leaf cap
        counts per leaf, so those run whole-model."""
        return self.score_decay is None and self.leaf_share is None

    @property
    def leaf_cap(self) -> int | None:
        """With ``leaf_share``: the most entries any one leaf may hold outside choose_all,
        ``ceil(leaf_share * budget)`` (static); ``None`` without the option."""
        if self.leaf_share is None:
            return None
        return max(1, math.ceil(self.leaf_share * self.budget))

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
        schedule = _base.SpendSchedule(self.budget, self.max_steps)
        if self.leafwise:  # the paper's ID3 (state unchanged since 0.4-compatible releases)
            return _base.choose_all_mask(layout), ID3State(
                jax.numpy.asarray(b_eff, jax.numpy.int32), schedule
            )
        self._check_caps(layout, b_eff)
        avg = [
            jax.numpy.zeros_like(p, jax.numpy.float32)
            if ok and self.score_decay is not None else jax.numpy.zeros((0,), jax.numpy.float32)
            for p, ok in zip(params, layout.selectable)
        ]
        state = ID3OptionsState(jax.numpy.asarray(b_eff, jax.numpy.int32), avg, schedule)
        return _base.choose_all_mask(layout), state

    def _check_caps(self, layout: LeafLayout, b_eff: int) -> None:
        """Refuses a ``leaf_share`` whose caps leave less room than the budget."""
        cap = self.leaf_cap
        if cap is None:
            return
        room = sum(min(cap, math.prod(shape))
                   for shape, ok in zip(layout.shapes, layout.selectable) if ok)
        if room < b_eff:
            raise ValueError(
                f"id3: leaf_share={self.leaf_share} caps each leaf at {cap} entries, so the "
                f"selectable leaves hold at most {room} entries, fewer than the {b_eff} to "
                "select. Raise leaf_share (or lower the budget)."
            )

    def update(self, mask, state: ID3State, count, grads, params, selectable, *, report_added=False):
        if not self.leafwise:
            mask, state, added = self._update_options(mask, state, count, grads, params, selectable)
            return (mask, state, added) if report_added else (mask, state)
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

    # -- with an option on: the whole model at once ---------------------------------------------
    def _update_options(self, mask, state: ID3OptionsState, count, grads, params, selectable):
        """One step with ``score_decay`` and / or ``leaf_share``: ``(mask, state, added)``,
        ``added`` as :data:`Added` slots, or ``None`` where the leaves are split over devices."""
        k = self.increment(count, state.effective_budget)
        k_max = self.k_max
        split = sharding.split_mode([g if ok else None for g, ok in zip(grads, selectable)])
        decay = self.score_decay

        def grow(carry):
            mask, avg = carry
            raw = [
                selection.d3_score(g, p, self.exp, self.eps) if ok else None
                for g, p, ok in zip(grads, params, selectable)
            ]
            if decay is not None:
                # The running average: a * decay + s * (1 - decay), float32. A non-finite score
                # is -inf and keeps the average at -inf (never chosen again).
                avg = [
                    a if s is None or a.size == 0
                    else a * jax.numpy.float32(decay) + s * jax.numpy.float32(1.0 - decay)
                    for a, s in zip(avg, raw)
                ]
                raw = [None if s is None else a for s, a in zip(raw, avg)]
            scores = [None if s is None else selection.exclude(s, m) for s, m in zip(raw, mask)]
            scores = self._capped(scores, mask)
            if split is not None:
                new = selection.top_k_masks(scores, k, k_max)
                mask = [m if n is None else m | n for m, n in zip(mask, new)]
                return (mask, avg), _no_slots(k_max)
            leaf, local, valid = selection.top_k_indices(scores, k, k_max)
            mask = [
                m if s is None else sharding.retype_like(jax.numpy.reshape(
                    jax.numpy.reshape(sharding.unsplit(m), (-1,))
                    .at[jax.numpy.where(valid & (leaf == i), local, m.size)]
                    .set(True, mode="drop"), m.shape), m)
                for i, (m, s) in enumerate(zip(mask, scores))
            ]
            return (mask, avg), (leaf, local, valid)

        def keep(carry):
            mask, avg = carry
            return (list(mask), list(avg)), _no_slots(k_max)

        (mask, avg), added = lax.cond(
            count < self.max_steps, grow, keep, (list(mask), list(state.score_avg))
        )
        return mask, state._replace(score_avg=avg), None if split is not None else added

    def _capped(self, scores, mask):
        """``leaf_share``: each leaf offers only its best ``cap - held`` entries (at most
        ``k_max``), so that the global top-k of what is offered is the top-k under the caps."""
        cap = self.leaf_cap
        if cap is None:
            return scores
        out = []
        for s, m in zip(scores, mask):
            if s is None or s.size <= cap:  # a leaf no larger than the cap: never bound
                out.append(s)
                continue
            kk = min(self.k_max, s.size)
            held = jax.numpy.sum(m, dtype=jax.numpy.int32)
            room = jax.numpy.clip(cap - held, 0, kk)
            (offered,) = selection.top_k_masks([s], room, kk)
            out.append(jax.numpy.where(offered, s, selection.NEG_INF))
        return out

    # -- on shards (torch FSDP2): the same score and increment, top-k done by the runner --------
    def shard_init(self, shards, starts, layout: LeafLayout) -> _base.ShardInit:
        del starts
        if self.leaf_share is not None:
            raise ValueError(
                "id3: leaf_share is not supported on FSDP2-sharded (DTensor) parameters (the "
                "cap needs each leaf's top entries across ranks); use leaf_share=None there."
            )
        b_eff = self.effective_budget(layout)
        if self.score_decay is None:
            return _base.ShardInit(b_eff, [0] * len(layout.shapes))
        avgs = [
            jax.numpy.zeros(s.shape, jax.numpy.float32) if ok and s is not None else None
            for s, ok in zip(shards, layout.selectable)
        ]
        return _base.ShardInit((b_eff, avgs), [0] * len(layout.shapes))

    def shard_update(self, state, count, grads, params, masks):
        if count >= self.max_steps:
            return None, 0, state
        if self.score_decay is None:
            k = int(self.increment(jax.numpy.int32(count), jax.numpy.int32(state)))
            scores = [
                None if g is None else _score_jit(self, g, p, m)
                for g, p, m in zip(grads, params, masks)
            ]
            return scores, k, state
        b_eff, avgs = state
        k = int(self.increment(jax.numpy.int32(count), jax.numpy.int32(b_eff)))
        avgs = [
            a if a is None or g is None else _average_jit(self, a, g, p)
            for a, g, p in zip(avgs, grads, params)
        ]
        scores = [
            None if g is None or a is None else selection.exclude(a, m)
            for a, g, m in zip(avgs, grads, masks)
        ]
        return scores, k, (b_eff, avgs)


_score_jit = jax.jit(ID3.score, static_argnums=0)


@partial(jax.jit, static_argnums=0)
def _average_jit(method: ID3, avg, grad, param):
    s = selection.d3_score(grad, param, method.exp, method.eps)
    decay = method.score_decay
    return avg * jax.numpy.float32(decay) + s * jax.numpy.float32(1.0 - decay)


def _no_slots(k_max: int) -> _base.Added:
    z = jax.numpy.zeros((k_max,), jax.numpy.int32)
    return z, z, jax.numpy.zeros((k_max,), bool)


@_registry.register("id3")
def make_id3(*, budget=None, max_steps=None, exp=1.0, eps=1e-8, score_decay=None,
             leaf_share=None) -> ID3:
    """ID3 from the user's arguments, checked (see :func:`optax_selective.selective_id3`)."""
    budget = _base.required_budget("id3", budget)
    max_steps = _base.require(
        "id3", "max_steps", max_steps, "number of optimizer steps over which the budget is spent"
    )
    max_steps = _base.check_int("max_steps", max_steps, 1)
    check_exp_eps(exp, eps)  # any finite exp, eps >= 0
    exp, eps = (v if isinstance(v, jax.Array) else float(v) for v in (exp, eps))
    check_options(score_decay, leaf_share)
    if score_decay is not None:
        score_decay = float(score_decay)
    if leaf_share is not None:
        leaf_share = float(leaf_share)
    return ID3(budget=budget, max_steps=max_steps, exp=exp, eps=eps, score_decay=score_decay,
               leaf_share=leaf_share)
