"""Turns a selection method into an optax ``GradientTransformationExtraArgs``.

Two forms (DESIGN.md section 4):

* chain form, ``inner=None``: zero the gradient outside the mask and pass it on, for use in
  ``optax.chain(selective_id3(...), optax.adam(...))``. Exact only for optimizers whose update
  is zero where the gradient has always been zero; **not** for decoupled weight decay
  (``optax.adamw``), which moves every entry, and not for Adam-like optimizers in float16
  (eps underflows: 0/0 = NaN; ``init`` warns once when a selectable leaf is float16).
* wrapper form, ``inner=tx``: score the raw gradient, run ``tx`` on the masked gradient, then
  replace ``tx``'s updates outside the mask by ``-0.0``, so unselected entries keep their
  bits under ``optax.apply_updates`` (``x + -0.0 == x``, ``-0.0`` included), whatever ``tx``.

docs/concepts-guarantees.md states the guarantees, their one exception (subnormals flushed
to zero by XLA's CPU arithmetic) and the errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_selective import budget_guard, sharding
from optax_selective import methods as _methods
from optax_selective._tree import ChooseAll, is_float, make_layout, zero_outside
from optax_selective.compact import CompactInner, check_compact_inner, check_leaf_sizes

NO_PARAMS_MSG = (
    "This selective transformation needs the current parameters: call "
    "`tx.update(updates, state, params)` with params (optax.apply_updates does not)."
)


class SelectiveState(NamedTuple):
    """State of every selective transformation.

    Attributes:
      count: int32 number of updates applied so far (saturating).
      mask: bool pytree shaped like params; true where an entry may change.
      method_state: the method's own state (e.g. ``ID3State``), ``()`` if none.
      inner_state: the wrapped optimizer's state in the wrapper form, else ``EmptyState()``.

    ``type(state).method_name`` is the name the method declares (``Method.name``; the
    transformation's state is of a subclass per method, so the name is static and the
    arrays, their paths and checkpoints are the same for every method); ``make_summary``
    records it.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> state = osel.selective_pafi(budget=1).init({"w": jnp.array([3.0, -1.0])})
      >>> isinstance(state, osel.SelectiveState), type(state).method_name
      (True, 'pafi')
      >>> int(state.count), state.mask["w"].tolist()
      (0, [False, True])
    """

    count: jax.Array
    mask: optax.Params
    method_state: Any
    inner_state: Any

    method_name = "unknown"  # a class attribute, not a field: see _state_type

    def __reduce__(self):  # pickles by method name: the subclasses are made at run time
        return _restore_state, (self.method_name, tuple(self))


def _restore_state(name: str, fields: tuple) -> SelectiveState:
    return (SelectiveState if name == "unknown" else _state_type(name))(*fields)


_STATE_TYPES: dict[str, type[SelectiveState]] = {}


def _state_type(name: str) -> type[SelectiveState]:
    """The :class:`SelectiveState` subclass that names method ``name`` (one per name, so
    ``jax.jit`` sees the same tree structure from step to step)."""
    if name not in _STATE_TYPES:
        _STATE_TYPES[name] = type(
            "SelectiveState", (SelectiveState,),
            {"__slots__": (), "method_name": name, "__module__": __name__, "__qualname__": "SelectiveState"},
        )
    return _STATE_TYPES[name]


def selective(
    method: _methods.Method | str,
    *,
    choose_all: ChooseAll = None,
    inner: optax.GradientTransformation | None = None,
    compact: bool = True,
    **method_args: Any,
) -> optax.GradientTransformationExtraArgs:
    """Builds the transformation for any method: a registered name or a method object.

    Args:
      method: a name registered with :func:`optax_selective.methods.register` (the
        built-ins: ``"id3"``, ``"pafi"``, ``"bitfit"``, ``"fish"``, ``"random"``, ``"fft"``),
        built from ``method_args`` by its factory; or a
        :class:`~optax_selective.methods.Method` object (then ``method_args`` must be empty).
      choose_all: see :func:`selective_id3`.
      inner: see :func:`selective_id3`.
      compact: with ``inner`` and a method with a ``budget``, keep ``inner``'s state for the
        selected entries only (see :mod:`optax_selective.compact`).
      **method_args: the method's own arguments (``budget``, ``max_steps``, ...).

    Example:
      >>> import jax.numpy as jnp, optax, optax_selective as osel
      >>> tx = osel.selective("pafi", budget=2, inner=optax.sgd(0.1))
      >>> osel.selected_mask(tx.init({"w": jnp.array([0.5, -0.1, 2.0, 0.0])}))["w"].tolist()
      [False, True, False, True]
    """
    if isinstance(inner, optax.MultiSteps):  # not itself a GradientTransformation
        inner = inner.gradient_transformation()
    if isinstance(method, str):
        method = _methods.build(method, **method_args)
    elif method_args:
        raise TypeError(
            f"selective() got method arguments {sorted(method_args)} with a method object; "
            "pass them to the method's constructor, or pass the method's registered name."
        )
    elif not isinstance(method, _methods.Method):
        raise TypeError(
            f"method must be a registered name or a Method (name, budget, needs_params, "
            f"frozen_after, k_max, init, update), got {method!r}."
        )
    if inner is not None and not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"inner must be an optax.GradientTransformation (or optax.MultiSteps), got "
            f"{type(inner).__name__}."
        )
    inner_tx = None if inner is None else optax.with_extra_args_support(inner)
    compact_tx = None
    state_type = _state_type(method.name)
    if inner_tx is not None and compact and method.budget is not None:
        check_compact_inner(inner)
        compact_tx = CompactInner(inner_tx, method.budget)

    def init_fn(params):
        layout = make_layout(params, choose_all)
        if inner_tx is None:
            _warn_float16_chain(params, layout, f"selective_{method.name}")
        leaves, treedef = jax.tree.flatten(params)
        # Selection and the mask writes index entries within a leaf with int32 (per leaf, so
        # models of any total size work); refuse a single leaf too large for that, clearly.
        check_leaf_sizes([jnp.shape(x) if is_float(x) else None for x in leaves], "selection", layout.paths)
        mask, method_state = method.init(leaves, layout)
        mask = [sharding.place_like(m, p) for m, p in zip(mask, leaves)]  # sharded like the params
        if compact_tx is not None:
            inner_state = compact_tx.init(leaves, mask)
        else:
            inner_state = optax.EmptyState() if inner_tx is None else inner_tx.init(params)
        state = state_type(
            count=jnp.zeros([], jnp.int32),
            mask=jax.tree.unflatten(treedef, mask),
            method_state=method_state,
            inner_state=inner_state,
        )
        return _replicate_on_params_mesh(state, leaves)

    def update_fn(updates, state: SelectiveState, params=None, **extra_args):
        if method.needs_params and params is None:
            raise ValueError(NO_PARAMS_MSG)
        grads, treedef = jax.tree.flatten(updates)
        mask = treedef.flatten_up_to(state.mask)
        param_leaves = None if params is None else treedef.flatten_up_to(params)
        selectable = [is_float(g) and g.dtype != jax.dtypes.float0 for g in grads]
        if compact_tx is not None:
            masked, mask, method_state, inner_state = _compact_update(
                compact_tx, method, state, grads, mask, param_leaves, selectable, extra_args
            )
            mask = [sharding.place_like(m, g) for m, g in zip(mask, grads)]
            return treedef.unflatten(masked), state_type(
                count=optax.safe_int32_increment(state.count),
                mask=treedef.unflatten(mask),
                method_state=method_state,
                inner_state=inner_state,
            )
        mask, method_state = method.update(
            mask, state.method_state, state.count, grads, param_leaves, selectable
        )
        mask, _ = budget_guard.within_budget(mask, method.budget)  # forged states move nothing
        mask = [sharding.place_like(m, g) for m, g in zip(mask, grads)]  # keeps the state's type stable
        masked = [zero_outside(m, g) for m, g in zip(mask, grads)]
        inner_state = state.inner_state
        if inner_tx is not None:
            inner_updates, inner_state = inner_tx.update(
                treedef.unflatten(masked), inner_state, params, **extra_args
            )
            masked = [
                zero_outside(m, u, negative=True)
                for m, u in zip(mask, treedef.flatten_up_to(inner_updates))
            ]
        new_state = state_type(
            count=optax.safe_int32_increment(state.count),
            mask=treedef.unflatten(mask),
            method_state=method_state,
            inner_state=inner_state,
        )
        return treedef.unflatten(masked), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _replicate_on_params_mesh(state: SelectiveState, param_leaves) -> SelectiveState:
    """Puts state leaves that init left on one device (counts, compact slots, ...) on the
    params' mesh, replicated, so a jitted step returns every leaf with its input's sharding
    (XLA would otherwise return them replicated over the mesh). Eager init only."""
    mesh = next(
        (
            x.sharding.mesh
            for x in param_leaves
            if isinstance(x, jax.Array)
            and not isinstance(x, jax.core.Tracer)
            and isinstance(x.sharding, jax.sharding.NamedSharding)
            and x.sharding.mesh.size > 1
            and x.is_fully_addressable  # one process: several use a jitted init instead
        ),
        None,
    )
    if mesh is None:
        return state
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and len(x.sharding.device_set) == 1:
            return jax.device_put(x, replicated)
        return x

    return jax.tree.map(place, state)


FLOAT16_CHAIN_MSG = (
    "float16 parameters in the chain form (optax.chain(selective_..., optimizer)): the "
    "optimizer after the selective transformation sees a zero gradient for unselected "
    "entries, and optimizers that divide by a running statistic (Adam and its relatives) "
    "compute 0/0 = NaN there once eps underflows in float16, moving entries the method did "
    "not select. Use the wrapper form, {name}(..., inner=optimizer), which zeroes the "
    "optimizer's updates outside the mask whatever it computes. Leaves: {leaves}."
)


def _warn_float16_chain(params, layout, name: str) -> None:
    """Warns once per ``init`` when a selectable leaf is float16 in the chain form."""
    leaves = jax.tree.leaves(params)
    half = [
        path for path, x, ok in zip(layout.paths, leaves, layout.selectable)
        if ok and jnp.result_type(x) == jnp.float16
    ]
    if half:
        import warnings

        shown = ", ".join(half[:3]) + (f" and {len(half) - 3} more" if len(half) > 3 else "")
        warnings.warn(
            FLOAT16_CHAIN_MSG.format(name=name, leaves=shown), UserWarning, stacklevel=3
        )


def _compact_update(compact_tx, method, state, grads, old_mask, params, selectable, extra_args):
    """The wrapper form's update with compact inner state (optax_selective.compact)."""
    args = (old_mask, state.method_state, state.count, grads, params, selectable)
    inner_state = state.inner_state
    mask, method_state, added = method.update(*args, report_added=True)
    if added is not None:  # e.g. ID3 on unsplit leaves: the new entries come with the mask
        inner_state = compact_tx.add_entries(inner_state, grads, new_entries=added)
    elif method.frozen_after != 0:  # not listed (sharded leaves, FISH): compare the masks
        inner_state = compact_tx.add_entries(
            inner_state, grads, old_mask=old_mask, new_mask=mask, most=method.k_max
        )
    inner_state, ok = budget_guard.guard_compact(inner_state, mask, grads, method.budget)
    updates, inner_state = compact_tx.update(grads, mask, inner_state, params, **extra_args)
    # a refused step also empties the mask it returns
    return updates, [m if m is None else m & ok for m in mask], method_state, inner_state


def selective_id3(
    budget: int,
    max_steps: int,
    *,
    exp: float = 1.0,
    eps: float = 1e-8,
    choose_all: ChooseAll = None,
    inner: optax.GradientTransformation | None = None,
    compact: bool = True,
    score_decay: float | None = None,
    leaf_share: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """ID3: unmask the entries with the highest D3 score, a few each step.

    At update ``t < max_steps`` the ``k_t`` not-yet-selected entries with the highest score
    ``|g| / (|θ| + eps) ** exp`` over all leaves together join the mask, with
    ``k_t = B // T + (t < B % T)`` and ``B = budget - |choose_all|``, so exactly ``budget``
    entries are selected after ``max_steps`` updates; then the mask is frozen. Ties go to the
    lower global index; non-finite scores are never chosen.

    Args:
      budget: the most entries that may ever change, choose_all leaves included.
      max_steps: number of updates ``T`` over which the budget is spent.
      exp: exponent of the parameter magnitude in the score; any finite number (negative
        values favour large parameters, as in the paper's sensitivity sweep).
      eps: added to ``|θ|`` in the score; ``>= 0``.
      choose_all: leaves trainable from step 0 (bool pytree prefix of params or a callable
        returning one), e.g. a new classifier head. They count toward ``budget``.
      inner: optional optimizer to wrap. With it, unselected entries are guaranteed never to
        move (use this form for ``optax.adamw``); without it, chain with an optimizer.
      compact: with ``inner``, keep ``inner``'s state for the selected entries only
        (O(budget) memory, same results; see :mod:`optax_selective.compact`). Elementwise
        optimizers (sgd, momentum, adam, adamw, adagrad, rmsprop, lion, ...), also inside
        ``optax.chain`` after ``optax.clip_by_global_norm``, in ``optax.apply_if_finite``
        or ``optax.MultiSteps`` (passed as is); others are refused with an error.
        ``compact=False`` keeps a full-size (dense) inner state.
      score_decay: option, off by default (the paper's ID3). A decay ``beta`` in (0, 1):
        rank by the running average ``a_t = beta * a_(t-1) + (1 - beta) * s_t`` of the D3
        score instead of this step's score alone (fewer picks decided by one batch). Costs
        one float32 per selectable entry in the state, for the whole run.
      leaf_share: option, off by default. A fraction in (0, 1]: no leaf holds more than
        ``ceil(leaf_share * budget)`` selected entries (outside choose_all); each step takes
        the ``k_t`` highest scores under those caps. Refused at init if the caps leave less
        room than the budget.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`SelectiveState`.
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_selective as osel
      >>> params = {"w": jnp.array([1.0, 2.0, 3.0, 4.0]), "b": jnp.zeros(2)}
      >>> tx = optax.chain(osel.selective_id3(budget=2, max_steps=2), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.array([4.0, 1.0, 3.0, 0.0]), "b": jnp.array([0.5, 0.0])}
      >>> for _ in range(2):
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> osel.budget_used(state)
      2

    References:
      Agarwal et al., "Step-by-Step Unmasking for Parameter-Efficient Fine-tuning of Large
      Language Models", 2024. https://arxiv.org/abs/2408.14470
    """
    method = _methods.get("id3")(budget=budget, max_steps=max_steps, exp=exp, eps=eps,
                                 score_decay=score_decay, leaf_share=leaf_share)
    return selective(method, choose_all=choose_all, inner=inner, compact=compact)


def selective_pafi(
    budget: int,
    *,
    choose_all: ChooseAll = None,
    inner: optax.GradientTransformation | None = None,
    compact: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """PaFI: the ``budget`` entries with the smallest ``|θ|`` at init, fixed afterwards.

    Args:
      budget: entries that may change, choose_all leaves included.
      choose_all: see :func:`selective_id3`.
      inner: see :func:`selective_id3`.
      compact: see :func:`selective_id3`.

    Example:
      >>> import jax.numpy as jnp, optax, optax_selective as osel
      >>> params = {"w": jnp.array([0.5, -0.1, 2.0, 0.0])}
      >>> state = osel.selective_pafi(budget=2).init(params)
      >>> osel.selected_mask(state)["w"].tolist()
      [False, True, False, True]

    References:
      Liao et al., "Parameter-Efficient Fine-Tuning without Introducing New Latency", ACL 2023.
    """
    method = _methods.get("pafi")(budget=budget)
    return selective(method, choose_all=choose_all, inner=inner, compact=compact)


def selective_bitfit(
    budget: int,
    *,
    is_bias: Callable[[str, tuple[int, ...]], bool] = _methods.default_is_bias,
    choose_all: ChooseAll = None,
    inner: optax.GradientTransformation | None = None,
    compact: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """BitFit: entries of bias leaves, in leaf order, until ``budget`` is met; fixed.

    Args:
      budget: entries that may change, choose_all leaves included. If the bias leaves hold
        fewer entries, all of them are selected; the last leaf may be taken partly.
      is_bias: ``(path, shape) -> bool`` deciding which leaves are biases; by default 1-D and
        0-D leaves (as in the reference, so LayerNorm scales count too).
      choose_all: see :func:`selective_id3`.
      inner: see :func:`selective_id3`.
      compact: see :func:`selective_id3`.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> params = {"b": jnp.zeros(3), "w": jnp.ones((2, 3))}
      >>> osel.budget_used(osel.selective_bitfit(budget=10).init(params))
      3

    References:
      Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
      Masked Language-models", ACL 2022.
    """
    method = _methods.get("bitfit")(budget=budget, is_bias=is_bias)
    return selective(method, choose_all=choose_all, inner=inner, compact=compact)


def selective_fft(
    *, inner: optax.GradientTransformation | None = None
) -> optax.GradientTransformationExtraArgs:
    """Full fine-tuning baseline: every floating-point entry is selected.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> osel.budget_used(osel.selective_fft().init({"w": jnp.ones((2, 2))}))
      4
    """
    return selective(_methods.get("fft")(), inner=inner)


def selective_fish(
    budget: int,
    fish_steps: int,
    *,
    choose_all: ChooseAll = None,
    inner: optax.GradientTransformation | None = None,
    compact: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """FISH mask: the entries with the highest empirical Fisher information, then fixed.

    The score of an entry is the mean of its squared raw gradient over the first
    ``fish_steps`` updates. During updates ``t < fish_steps - 1`` only choose_all leaves are
    trained, so every scoring gradient is taken at the initial values of the other entries
    (the paper computes the mask before training). At update ``t = fish_steps - 1``, after
    adding that step's gradient, the ``B = budget - |choose_all|`` highest scores over all
    leaves together (ties to the lower global index, non-finite scores never chosen) join the
    mask, and that update already uses it; the mask is fixed from then on. So exactly
    ``budget`` entries are selected after ``fish_steps`` updates (fewer only if fewer than
    ``B`` scores are finite).

    The reference implementation squares per-example gradients (a batch size of 1 during
    scoring, ``fish_steps`` = number of examples); with batches of ``n`` examples the score is
    the squared batch-mean gradient instead, a coarser estimate. Feed single examples during
    the first ``fish_steps`` updates to reproduce the paper.

    The inner optimizer sees a zero gradient outside choose_all during the first
    ``fish_steps - 1`` updates, and its step count (Adam's bias correction, learning-rate
    schedules) includes them, as for ID3 (DESIGN.md section 4). The running sum of squared
    gradients is kept in the state: one float32 per selectable entry, for the life of the
    state (static shapes under ``jax.jit`` do not allow freeing it after scoring).

    Args:
      budget: the most entries that may ever change, choose_all leaves included; must leave at
        least one entry after choose_all, and may not exceed the floating-point entries.
      fish_steps: number of updates whose gradients make up the Fisher score (the paper's
        number of samples, counted in batches); ``>= 1``.
      choose_all: see :func:`selective_id3`.
      inner: see :func:`selective_id3`.
      compact: see :func:`selective_id3`. The compact inner state is exact here too: slots
        are filled when the mask is chosen, and until then every entry outside choose_all
        sees a zero gradient, as in the dense form.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`SelectiveState`
      with a :class:`~optax_selective.methods.FishState` as ``method_state``.

    Example:
      >>> import jax.numpy as jnp, optax, optax_selective as osel
      >>> params = {"w": jnp.zeros(4)}
      >>> tx = osel.selective_fish(budget=2, fish_steps=2, inner=optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> for g in ([3.0, 0.0, 1.0, 2.0], [0.0, 1.0, 1.0, 2.0]):  # Fisher sums 9, 1, 2, 8
      ...     updates, state = tx.update({"w": jnp.array(g)}, state, params)
      >>> osel.selected_mask(state)["w"].tolist()
      [True, False, False, True]

    References:
      Sung, Nair and Raffel, "Training Neural Networks with Fixed Sparse Masks", NeurIPS 2021.
      https://arxiv.org/abs/2111.09839
    """
    method = _methods.get("fish")(budget=budget, fish_steps=fish_steps)
    return selective(method, choose_all=choose_all, inner=inner, compact=compact)


def selective_random(
    budget: int,
    *,
    seed: int = 0,
    choose_all: ChooseAll = None,
    inner: optax.GradientTransformation | None = None,
    compact: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """R-Mask: ``budget - |choose_all|`` eligible entries drawn uniformly at random, fixed.

    Every entry of a selectable leaf gets a random key from ``seed`` and its leaf's position
    in leaf order (see :mod:`optax_selective.methods.random` for the exact draw); the highest
    keys over all leaves together are chosen at init, ties to the lower global index. The
    torch bridge runs the same code, so the same seed selects the same entries there.

    Args:
      budget: entries that may change, choose_all leaves included; may not exceed the
        floating-point entries.
      seed: Python int in ``[0, 2**32)``; the same seed and parameter shapes give the same mask.
      choose_all: see :func:`selective_id3`.
      inner: see :func:`selective_id3`.
      compact: see :func:`selective_id3`.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> params = {"b": jnp.zeros(3), "w": jnp.ones((4, 5))}
      >>> state = osel.selective_random(budget=6, seed=1).init(params)
      >>> osel.budget_used(state)
      6
      >>> again = osel.selective_random(budget=6, seed=1).init(params)
      >>> bool((osel.selected_mask(again)["w"] == osel.selected_mask(state)["w"]).all())
      True

    References:
      Sung, Nair and Raffel, "Training Neural Networks with Fixed Sparse Masks", NeurIPS 2021
      (random-mask baseline). https://arxiv.org/abs/2111.09839
    """
    method = _methods.get("random")(budget=budget, seed=seed)
    return selective(method, choose_all=choose_all, inner=inner, compact=compact)
