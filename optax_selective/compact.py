"""Compact inner state for the wrapper form: the inner optimizer keeps state for selected
entries only, O(budget) instead of O(N).

How it works (DESIGN.md section 4 is the contract):

* Per floating-point dtype of the parameters there is one *slot buffer* of static size
  ``cap = min(budget, entries of that dtype)``: for each slot, the leaf it points into
  (position in leaf order; int16, int32 past 32,767 leaves) and the flat row-major index in
  that leaf (int32; ``-1`` where the slot is still empty). Indexing per leaf means no dtype
  total is ever formed, so models of any size work; a single leaf needs fewer than 2**31
  entries. Entries take a slot when they join the mask (at init for PaFI / BitFit /
  choose_all, at the step they are unmasked for ID3) and keep it for good.
* Each step the raw gradient and the parameters are gathered at the slots into one vector
  per dtype (leaf by leaf, in the leaves' own dtype; nothing is concatenated); empty slots
  get zeros. ``inner`` runs on that tuple of vectors; its updates are scattered back leaf by
  leaf, so every unselected entry gets an exact zero update.
* An empty slot sees a zero gradient from step 0, exactly as an unselected entry does in the
  dense form, so when an entry takes a slot the slot's state (e.g. Adam's moments, zero) is
  the state the dense form would hold for it, and the inner step count is global: late
  entries get Adam's bias correction for the global count, as in the dense form.

This is exact for *elementwise* inner transformations (an entry's update depends on its own
gradient, parameter and state and on shared scalars: count, hyperparameters) and for those
that read a global statistic of the gradient that zero entries leave unchanged (the global
norm of ``clip_by_global_norm``, the finiteness test of ``apply_if_finite`` and of
``MultiSteps``' optax skip rules): the gathered selected entries give the same value as the
masked full gradient. :func:`compact_refusal` decides with an allow-list of optax's own
building blocks, recognised by the code of the functions their factories return (so a user
function that happens to be called ``scale`` is not mistaken for optax's), walking through
``chain``, ``named_chain``, ``with_extra_args_support``, ``apply_if_finite``,
``MultiSteps`` and ``inject_hyperparams``; then a numeric probe (the same entries must get
the same updates alone and embedded among unselected ones: zero gradient, nonzero values).
Everything else (``masked``, ``multi_transform``, factored or shape-aware optimizers such as
Adafactor, Muon or Shampoo, and any user-defined transformation) is refused with an error
that points to ``compact=False``. :func:`register_elementwise` extends the allow-list.
``tests/test_compact_inner_allowlist.py`` pins this against the installed optax: a new
optax release that changes these closures makes those tests fail rather than the check
accept something silently (the check itself refuses what it does not recognise).

Sharding: the slot vectors and the inner state are replicated. Leaves split over devices in
explicit mode are read and written per device block (see "gather / scatter by flat index"
below), so no leaf is ever gathered. In auto mode under a multi-device mesh context
(``selection.split_by_partitioner``) the leaves are indexed with N-d indices, which XLA
partitions per block, and the mask's entries are listed through ``custom_partitioning``,
which sees the real layout; without a context XLA partitions the plain flat indexing
(correct, but it may reshard a leaf).

Memory: the mask (1 byte per parameter) plus 6 bytes per slot plus the inner state of the
slots (Adam's two moments in the parameters' dtype), about ``N + 14 * budget`` bytes for
float32. A step's temporaries: for float32 / float64 leaves, O(budget) per leaf (XLA turns
``params + updates`` into an in-place scatter-add); for bfloat16 / float16 leaves, one
16-bit copy of the update (see ``_scatter_16bit``) plus O(budget). ``benchmarks/memory_jax.py``
reads XLA's compiled memory at Llama shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning

from optax_selective import selection
from optax_selective._tree import is_float, zero_update_like

# The allow-list is keyed by the *code objects* of the init / update functions that optax's
# own factories return (every call of a factory returns closures over the same code), found
# by calling each factory once: a user function that happens to be called ``scale`` or
# ``clip`` is not on it, and a renamed private optax helper still is. Kinds:
#   "leaf":    elementwise in the gradient / params / state, with state that stays the same
#              function of the step count while the gradient is zero;
#   "global":  reads a global statistic of the whole gradient that zero entries do not change
#              (the global norm, finiteness), so the gathered selected entries give it exactly;
#   "wrapper": combines inner transformations (walked through).
_ELEMENTWISE: set[str] = set()  # names added with register_elementwise (user factories)
_KNOWN: dict[Any, str] | None = None
_INJECT = "inject"


def _known_codes() -> dict[Any, str]:
    global _KNOWN
    if _KNOWN is None:
        leaf = [
            optax.identity(),
            optax.scale(1.0),
            optax.scale_by_schedule(lambda count: 1.0),
            optax.scale_by_adam(),
            optax.scale_by_adamax(),
            optax.scale_by_amsgrad(),
            optax.scale_by_lion(),
            optax.scale_by_rms(),
            optax.scale_by_stddev(),
            optax.scale_by_rss(),
            optax.trace(0.9),
            optax.add_decayed_weights(0.1),
            optax.clip(1.0),
        ]
        glob = [optax.clip_by_global_norm(1.0)]
        wrap = [
            optax.chain(optax.identity()),
            optax.named_chain(("a", optax.identity())),
            optax.with_extra_args_support(optax.GradientTransformation(*optax.identity())),
            optax.apply_if_finite(optax.identity(), 1),
        ]
        known: dict[Any, str] = {}
        for kind, txs in (("leaf", leaf), ("global", glob), ("wrapper", wrap)):
            for tx in txs:
                for fn in (tx.init, tx.update):
                    code = getattr(fn, "__code__", None)
                    if code is not None and code not in known:
                        known[code] = kind
        inject = optax.inject_hyperparams(optax.scale)(step_size=1.0)
        known.setdefault(inject.init.__code__, _INJECT)
        known.setdefault(inject.update.__code__, _INJECT)
        _KNOWN = known
    return _KNOWN


_UNREADABLE = object()


def register_elementwise(name: str) -> None:
    """Allows compact state for transformations built by *your* factory called ``name``.

    ``name`` is the factory's ``__qualname__`` (e.g. ``"scale_by_my_rule"`` for functions
    ``scale_by_my_rule.<locals>.update_fn``). Only do this for transformations whose update
    of each entry depends on that entry's gradient, parameter and state alone. The numeric
    probe still runs. optax's own elementwise transformations need no registration.
    """
    _ELEMENTWISE.add(name)


def _head(fn) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__).split(".<locals>")[0]


def _cells(fn):
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, optax.GradientTransformation):
                yield v.init
                yield v.update
            elif callable(v) and not isinstance(v, type):
                yield v


def _walk(fn, seen) -> str | None:
    """Reason the transformation behind ``fn`` is not known to be exact on compact state."""
    if id(fn) in seen:
        return None
    seen.add(id(fn))
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, optax.MultiSteps):
        return _walk_multisteps(owner, seen)
    kind = _known_codes().get(getattr(fn, "__code__", None))
    if kind in ("leaf", "global"):
        return None
    if kind == "wrapper":
        for sub in _cells(fn):
            reason = _walk(sub, seen)
            if reason:
                return reason
        return None
    if kind == _INJECT:
        return _walk_inject(fn, seen)
    if _head(fn) in _ELEMENTWISE:
        return None  # registered by the user
    return f"{getattr(fn, '__module__', '') or ''}.{_head(fn)}"


def _walk_multisteps(ms: optax.MultiSteps, seen) -> str | None:
    """MultiSteps accumulates gradients entry by entry; its skip rule must be optax's own
    (finiteness or the global norm, which zero entries do not change)."""
    skip = getattr(ms, "_should_skip_update_fn", _UNREADABLE)  # no public accessor
    if skip is _UNREADABLE:
        return "optax.MultiSteps (this optax version hides its skip rule)"
    skip = getattr(skip, "func", skip)  # functools.partial(skip_large_updates, ...)
    default = getattr(optax.MultiSteps(optax.identity(), 1), "_should_skip_update_fn", None)
    known = (optax.skip_not_finite, optax.skip_large_updates)
    if skip is not None and not (
        any(skip is f for f in known) or getattr(skip, "__code__", 0) is getattr(default, "__code__", 1)
    ):
        return f"optax.MultiSteps(should_skip_update_fn={_head(skip)})"
    inner = ms.inner_opt
    return _walk(inner.init, seen) or _walk(inner.update, seen)


def _walk_inject(fn, seen) -> str | None:
    cells = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            cells[name] = cell.cell_contents
        except ValueError:
            pass
    factory = cells.get("inner_factory")
    if factory is None:
        return "optax.inject_hyperparams (unrecognised closure)"
    if "numeric_hps" not in cells:
        return None  # update_fn: the values live in init_fn's closure, which is checked too
    kwargs = dict(cells.get("other_hps", {}))
    kwargs.update(cells.get("numeric_hps", {}))
    kwargs.update({k: 1e-3 for k in cells.get("sched_hps", {})})
    try:
        tx = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - report, do not crash the check
        return f"inject_hyperparams({_head(factory)}) could not be rebuilt: {e}"
    return _walk(tx.init, seen) or _walk(tx.update, seen)


def _probe(inner: optax.GradientTransformation) -> str | None:
    """Same entries alone and embedded among unselected ones (zero gradient, nonzero values)
    must get the same updates (3 steps)."""
    tx = optax.with_extra_args_support(inner)
    rng = np.random.default_rng(0)
    n, extra = 5, 4
    place = np.array([1, 2, 4, 6, 7])
    with jax.ensure_compile_time_eval():
        p_small = jnp.asarray(rng.normal(size=n), jnp.float32)
        p_big = jnp.asarray(rng.normal(size=n + extra), jnp.float32).at[place].set(p_small)
        s_small, s_big = tx.init((p_small,)), tx.init((p_big,))
        for _ in range(3):
            g_small = jnp.asarray(rng.normal(size=n), jnp.float32)
            # the other entries are unselected: zero gradient, any value
            g_big = jnp.zeros(n + extra, jnp.float32).at[place].set(g_small)
            (u_small,), s_small = tx.update((g_small,), s_small, (p_small,))
            (u_big,), s_big = tx.update((g_big,), s_big, (p_big,))
            if not np.allclose(np.asarray(u_small), np.asarray(u_big)[place], rtol=1e-5, atol=1e-7):
                return "numeric probe: an entry's update depends on other entries"
    return None


def compact_refusal(inner: optax.GradientTransformation) -> str | None:
    """Why ``inner`` cannot run on compact state exactly, or None if it can."""
    seen: set[int] = set()
    reason = _walk(inner.init, seen) or _walk(inner.update, seen)
    if reason:
        return f"{reason} is not on the allow-list of elementwise transformations"
    try:
        return _probe(inner)
    except Exception as e:  # noqa: BLE001
        return f"numeric probe failed: {type(e).__name__}: {e}"


def check_compact_inner(inner: optax.GradientTransformation) -> None:
    """Raises ``ValueError`` if ``inner`` cannot run on compact state exactly."""
    reason = compact_refusal(inner)
    if reason:
        raise ValueError(
            f"compact=True (the default of the wrapper form) needs an elementwise inner "
            f"optimizer, but {reason}. Pass compact=False to keep the inner optimizer's state "
            "dense (full size, exact for any optimizer), or use an elementwise optimizer "
            "(sgd, momentum, adam, adamw without mask, adagrad, rmsprop, lion, adamax, "
            "amsgrad), optionally inside chain / inject_hyperparams / apply_if_finite / "
            "MultiSteps and after clip_by_global_norm."
        )


# ------------------------------------------------------------------------------ the state


class CompactState(NamedTuple):
    """The wrapper form's inner state when compact.

    Attributes:
      slots: one int32 vector per parameter dtype (static size ``min(budget, entries of that
        dtype)``): the flat row-major index of each slot's entry in its leaf, ``-1`` if empty.
      filled: one int32 scalar per dtype, the number of slots in use.
      inner_state: the inner optimizer's state over the tuple of slot vectors.
      leaf: one vector per dtype, shaped like ``slots``: the position (in leaf order) of the
        leaf each slot points into (int16, or int32 for more than 32,767 leaves; 0 if empty).
    """

    slots: tuple[jax.Array, ...]
    filled: tuple[jax.Array, ...]
    inner_state: Any
    leaf: tuple[jax.Array, ...] = ()


class _Group(NamedTuple):
    dtype: Any
    leaves: tuple[int, ...]  # leaf positions in leaf order
    sizes: tuple[int, ...]
    cap: int
    leaf_dtype: Any  # dtype of the per-slot leaf positions


_MAX_LEAF = 2**31 - 1  # entries of one leaf: its flat indices are int32


def leaf_id_dtype(num_leaves: int):
    """int16 leaf positions while they fit (2 bytes per slot), else int32."""
    return jnp.int16 if num_leaves <= np.iinfo(np.int16).max else jnp.int32


def check_leaf_sizes(shapes, what: str, paths=None) -> None:
    """Refuses a leaf whose flat indices do not fit int32, naming it and the way out."""
    for i, shape in enumerate(shapes):
        if shape is None:
            continue
        size = int(np.prod(shape, dtype=np.int64))
        if size > _MAX_LEAF:
            name = f"leaf {i}" if paths is None else f"leaf {paths[i]}"
            raise ValueError(
                f"{what} indexes entries within each leaf with int32, but {name} of shape "
                f"{tuple(shape)} holds {size} entries (> 2**31 - 1). Split that parameter into "
                "smaller leaves (e.g. reshape it into a tuple of row blocks) or leave it out of "
                "the selection."
            )


def _groups(leaves: Sequence[Any], budget: int) -> list[_Group]:
    by_dtype: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        # zero-size leaves hold no entry to select: they get empty updates, no slots
        if x is not None and is_float(x) and jnp.result_type(x) != jax.dtypes.float0 and np.size(x):
            by_dtype.setdefault(jnp.dtype(jnp.result_type(x)), []).append(i)
    check_leaf_sizes([np.shape(leaves[i]) for idx in by_dtype.values() for i in idx], "compact state")
    groups = []
    for dtype, idx in by_dtype.items():
        sizes = tuple(int(np.prod(np.shape(leaves[i]), dtype=np.int64)) for i in idx)
        cap = min(budget, sum(sizes))  # Python ints: totals past 2**31 are fine
        groups.append(_Group(dtype, tuple(idx), sizes, cap, leaf_id_dtype(len(leaves))))
    return groups


# -------------------------------------------------------- gather / scatter by flat index
#
# A leaf split over devices in explicit mode (``AxisType.Explicit``) is never gathered: each
# device reads the slots that fall in its own block and the results are summed over the
# devices that split the leaf (one nonzero term per slot, summed as integer bit patterns, so
# exact, -0.0 and NaN payloads included); scattering writes each device's block locally.
# Only O(cap) values and indices cross devices. Unsplit leaves use plain indexing.


def _split(x) -> tuple[Any, Any] | None:
    """``(mesh, spec)`` if ``x``'s type splits it over more than one device, else None."""
    if not selection._explicitly_sharded(x):
        return None
    sharding = x.sharding if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) else None
    if not isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.typeof(x).sharding
    spec = tuple(sharding.spec) + (None,) * (np.ndim(x) - len(sharding.spec))
    sizes = dict(sharding.mesh.shape)
    for d, p in enumerate(spec):
        parts = int(np.prod([sizes[a] for a in _axes(p)], dtype=np.int64))
        if np.shape(x)[d] % parts:
            raise ValueError(
                f"compact=True needs explicitly sharded leaves whose dimensions divide evenly over "
                f"the mesh, but a leaf of shape {np.shape(x)} has dimension {d} split "
                f"{parts} ways. Pass compact=False (the dense inner state has no such limit)."
            )
    return sharding.mesh, jax.sharding.PartitionSpec(*spec)


def _axes(p) -> tuple[str, ...]:
    return () if p is None else tuple(p) if isinstance(p, tuple) else (p,)


def _block(mesh, spec, shape):
    """Inside ``shard_map``: this device's block shape and its start along every dimension."""
    sizes = dict(mesh.shape)
    block, start = [], []
    for n, p in zip(shape, spec):
        parts, pos = 1, jnp.zeros([], jnp.int32)
        for a in _axes(p):  # major to minor, as PartitionSpec tuples are laid out
            pos = pos * sizes[a] + lax.axis_index(a)
            parts *= sizes[a]
        block.append(n // parts)
        start.append(pos * (n // parts))
    return tuple(block), start


def _to_local(index, shape, block, start):
    """Flat indices in the whole leaf -> ``(flat index in this block, inside this block)``."""
    local = jnp.zeros_like(index)
    inside = (index >= 0) & (index < int(np.prod(shape, dtype=np.int64)))
    rest = index
    for d in reversed(range(len(shape))):
        coord = rest % shape[d] - start[d]
        rest = rest // shape[d]
        inside = inside & (coord >= 0) & (coord < block[d])
        local = local + coord * int(np.prod(block[d + 1 :], dtype=np.int64))
    return local, inside


def _to_global(local, shape, block, start):
    """Flat indices in this block -> flat indices in the whole leaf (int32)."""
    out = jnp.zeros_like(local)
    rest = local
    for d in reversed(range(len(shape))):
        out = out + (rest % block[d] + start[d]) * int(np.prod(shape[d + 1 :], dtype=np.int64))
        rest = rest // block[d]
    return out


_BITS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _sum_one_term(x, axes):
    """psum over ``axes`` of values that are zero bits on every device but (at most) one."""
    if not axes:
        return x
    width = jnp.dtype(x.dtype).itemsize
    bits = lax.bitcast_convert_type(x, _BITS[width])  # float64: a trailing dimension of 2
    total = lax.psum(bits.astype(jnp.uint32), axes).astype(_BITS[width])
    return lax.bitcast_convert_type(total, x.dtype)


_FLAT_GATHER = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))


def _gather_leaf(x, index, ok, dtype):
    """``x.reshape(-1)[index]`` where ``ok`` (replicated, like ``index``), zeros elsewhere."""
    split = _split(x)
    if split is None and np.ndim(x) > 0 and selection.split_by_partitioner([x]):
        return _gather_leaf_auto(x, index, ok, dtype)
    if split is None:
        # lax.gather straight on the slots: XLA clamps out-of-range starts itself, so every
        # leaf reads through the one slot vector and no per-leaf index array is written.
        flat = jnp.reshape(selection._unsplit(x), (-1,))
        got = lax.gather(
            flat, index[:, None], _FLAT_GATHER, (1,), mode=lax.GatherScatterMode.CLIP,
        )
        return jnp.where(ok, got.astype(dtype), jnp.zeros((), dtype))
    mesh, spec = split
    shape = np.shape(x)
    axes = tuple(a for p in spec for a in _axes(p))

    def local(xb, index, ok):
        block, start = _block(mesh, spec, shape)
        where, inside = _to_local(index, shape, block, start)
        flat = jnp.reshape(xb, (-1,))
        got = flat[jnp.clip(where, 0, flat.shape[0] - 1)].astype(dtype)
        return _sum_one_term(jnp.where(ok & inside, got, jnp.zeros((), dtype)), axes)

    p0 = jax.sharding.PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, p0, p0), out_specs=p0)(x, index, ok)


def _gather_leaf_auto(x, index, ok, dtype):
    """:func:`_gather_leaf` for a leaf that XLA's partitioner may split (auto mode).

    Indexed with N-d indices (a flat view of a leaf split over two dimensions is not a
    block of it, and reshaping would reshard it): the partitioner then gathers on each
    device from its own block, zeros what lies outside it, and sums over the devices,
    O(cap) values. The gather reads the leaf's bits as unsigned integers, so that sum of one
    nonzero term is exact (-0.0 and NaN payloads included).
    """
    shape = np.shape(x)
    size = int(np.prod(shape, dtype=np.int64))
    width = jnp.dtype(x.dtype).itemsize
    bits = lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * width}"))
    idx = jnp.unravel_index(jnp.clip(index, 0, size - 1), shape)
    got = lax.bitcast_convert_type(bits[idx], x.dtype).astype(dtype)
    return jnp.where(ok, got, jnp.zeros((), dtype))


def _scatter_leaf(values, index, ok, like):
    """Zeros shaped and sharded like ``like``, with ``values`` at the flat ``index`` where ``ok``."""
    shape = np.shape(like)
    size = int(np.prod(shape, dtype=np.int64))
    split = _split(like)
    if split is None and len(shape) > 0 and size > 0:
        # A scatter-*add* into zeros of the leaf's own shape (N-d indices, no reshape): XLA's
        # algebraic simplifier then turns ``params + updates`` (``optax.apply_updates`` in the
        # same jit) into an in-place scatter-add, so the full-size zeros are never written
        # (CPU, 25M parameters: 1.6 ms instead of 95 ms). Slots are unique, so add == set
        # (-0.0 + v == v bitwise). The zeros are -0.0: the update that leaves every
        # unselected entry bit-identical, -0.0 included.
        idx = jnp.unravel_index(jnp.where(ok, index, 0), shape)
        idx = (jnp.where(ok, idx[0], shape[0]),) + tuple(idx[1:])  # row shape[0]: dropped
        return zero_update_like(values, shape).at[idx].add(values, mode="drop")
    if split is None:  # a scalar or zero-size leaf
        target = jnp.where(ok, index, size)  # size: dropped
        return zero_update_like(values, (size,)).at[target].set(values, mode="drop").reshape(shape)
    mesh, spec = split

    def local(values, index, ok):
        block, start = _block(mesh, spec, shape)
        where, inside = _to_local(index, shape, block, start)
        n = int(np.prod(block, dtype=np.int64))
        target = jnp.where(ok & inside, where, n)
        return zero_update_like(values, (n,)).at[target].set(values, mode="drop").reshape(block)

    p0 = jax.sharding.PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(p0, p0, p0), out_specs=spec)(values, index, ok)


def _nonzero_leaf(mask, most: int):
    """The first ``most`` true flat indices of ``mask`` (ascending, int32) and how many are true.

    Padding slots hold 0 and are past the count. For a split mask each device lists its own
    block's first ``most`` and the devices exchange these lists only (O(devices * most)).
    """
    shape = np.shape(mask)
    size = int(np.prod(shape, dtype=np.int64))
    most = min(most, size)
    split = _split(mask)
    if split is None and len(shape) > 0 and selection.split_by_partitioner([mask]):
        both = _nonzero_partitioned(mask, most)
        return both[:most], both[most]
    if split is None:
        return _nonzero_whole(selection._unsplit(mask), most)
    mesh, spec = split
    p0 = jax.sharding.PartitionSpec()
    local = _nonzero_blocks(mesh, spec, shape, most, to="invarying")
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,), out_specs=(p0, p0))(mask)


def _nonzero_whole(mask, most):
    flat = jnp.reshape(mask, (-1,))
    (idx,) = jnp.nonzero(flat, size=most, fill_value=0)
    return idx.astype(jnp.int32), jnp.sum(flat, dtype=jnp.int32)


def _nonzero_blocks(mesh, spec, shape, most, **all_gather_kw):
    """The per-device body of a split nonzero: each device lists its block's first ``most``
    true entries (as indices in the whole leaf), the lists are exchanged and merged."""
    axes = tuple(a for p in spec for a in _axes(p))
    big = jnp.iinfo(jnp.int32).max

    def local(mb):
        block, start = _block(mesh, spec, shape)
        flat = jnp.reshape(mb, (-1,))
        n_local = min(most, flat.shape[0])
        (idx,) = jnp.nonzero(flat, size=n_local, fill_value=0)
        count = jnp.sum(flat, dtype=jnp.int32)
        mine = jnp.where(jnp.arange(n_local) < count, _to_global(idx.astype(jnp.int32), shape, block, start), big)
        if axes:
            mine = lax.all_gather(mine, axes, tiled=True, **all_gather_kw)
            count = lax.psum(count, axes)
        every = jnp.sort(mine)[:most]
        return jnp.where(every == big, 0, every), count

    return local


# Auto mode: a traced leaf's sharding is unknown when the step is traced, but XLA's
# partitioner knows it. ``custom_partitioning`` hands it to ``_nonzero_partition``, which runs
# the per-device body above on the real blocks (a single device runs the plain body).


@partial(custom_partitioning, static_argnums=(1,))
def _nonzero_cp(mask, most):
    idx, count = _nonzero_whole(mask, most)
    return jnp.concatenate([idx, count[None]])


def _nonzero_partition(most, mesh, arg_shapes, result_shape):
    del result_shape
    (arg,) = arg_shapes
    sharding, shape = arg.sharding, tuple(arg.shape)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if not isinstance(sharding, jax.sharding.NamedSharding) or any(
        n % int(np.prod([dict(mesh.shape)[a] for a in _axes(p)], dtype=np.int64))
        for n, p in zip(shape, tuple(sharding.spec) + (None,) * len(shape))
    ):  # no named layout, or uneven blocks: take the whole mask (correct, not O(budget))
        return mesh, lambda m: _nonzero_cp.fun(m, most), replicated, (replicated,)
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    body = _nonzero_blocks(mesh, spec, shape, most)

    def lower(mb):
        idx, count = body(mb)
        return jnp.concatenate([idx, count[None]])

    return mesh, lower, replicated, (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)),)


def _nonzero_infer(most, mesh, arg_shapes, result_shape):
    del most, arg_shapes, result_shape
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _nonzero_rule(most, mesh, operand_types, result_types):
    """Shardy rule: the mask's dimensions are free factors, the output is its own factor."""
    del most, mesh, result_types
    return " ".join(f"d{i}" for i in range(len(operand_types[0].shape))) + " -> out"


_nonzero_cp.def_partition(
    _nonzero_partition, infer_sharding_from_operands=_nonzero_infer, sharding_rule=_nonzero_rule
)


@partial(jax.jit, static_argnums=(1,))
def _nonzero_partitioned(mask, most):
    """``(first most true flat indices, count)`` of ``mask`` as one int32 vector of most + 1."""
    return _nonzero_cp(mask, most)


def _in_leaf(slots, leaf_ids, i):
    """Which slots point into leaf ``i`` (empty slots hold -1 and point nowhere)."""
    return (leaf_ids == i) & (slots >= 0)


def _gather(group: _Group, leaves, slots, leaf_ids, dtype):
    """The group's leaves at the slots, one vector in ``dtype``, leaf by leaf."""
    out = jnp.zeros(slots.shape, dtype)
    for i, size in zip(group.leaves, group.sizes):
        if size == 0:
            continue
        ok = _in_leaf(slots, leaf_ids, i)
        out = jnp.where(ok, _gather_leaf(leaves[i], slots, ok, dtype), out)
    return out


def _scatter(group: _Group, values, slots, leaf_ids, like):
    """The group's update leaves, ``values`` placed at the slots, zeros elsewhere."""
    if jnp.dtype(values.dtype).itemsize < 4 and not (
        selection.split_by_partitioner([like[i] for i in group.leaves])
        or any(_split(like[i]) for i in group.leaves)
    ):
        return _scatter_16bit(group, values, slots, leaf_ids, like)
    return {i: _scatter_leaf(values, slots, _in_leaf(slots, leaf_ids, i), like[i]) for i in group.leaves}


_CHUNK = 2**31 - 1  # entries per flat update buffer: offsets stay int32


def _scatter_16bit(group: _Group, values, slots, leaf_ids, like):
    """:func:`_scatter` for bfloat16 / float16 leaves on one device.

    XLA:CPU widens a 16-bit float scatter (and the whole leaf it writes into) to float32, and
    schedules every leaf's O(budget) scatter indices before the first scatter; leaf by leaf
    that was two float32 copies of the parameters plus 4 bytes x budget x leaves (1.2 GiB of
    temporaries at 200M bf16 parameters). Here the values' bit patterns are written, as
    unsigned integers (no arithmetic, so no widening and every bit kept), into one flat
    buffer per run of leaves (one index vector for all of them), and each leaf's update is
    a slice of it, which ``params + updates`` reads in place: the temporaries are the update
    (the parameters' size in their own dtype) and O(budget).
    """
    bits = jnp.dtype(f"uint{8 * jnp.dtype(values.dtype).itemsize}")
    payload = lax.bitcast_convert_type(values, bits)
    sign_bit = np.array(1 << (8 * bits.itemsize - 1), bits)
    runs, run, total = [], [], 0
    for i, size in zip(group.leaves, group.sizes):
        if run and total + size > _CHUNK:
            runs.append(run)
            run, total = [], 0
        run.append((i, total, size))
        total += size
    runs.append(run)
    out = {}
    num_leaves = len(like)
    for run in runs:
        total = sum(size for _, _, size in run)
        offset = np.zeros(num_leaves, np.int32)
        member = np.zeros(num_leaves, bool)
        for i, off, _ in run:
            offset[i], member[i] = off, True
        ids = leaf_ids.astype(jnp.int32)
        ok = jnp.asarray(member)[ids] & (slots >= 0)
        target = jnp.where(ok, jnp.asarray(offset)[ids] + slots, total)  # total: dropped
        # Filled with -0.0's bit pattern (the sign bit): the update that leaves every
        # unselected entry bit-identical, -0.0 included (see _tree.zero_update_like).
        flat = jnp.full((total,), sign_bit, bits).at[target].set(payload, mode="drop")
        for i, off, size in run:
            leaf = lax.slice(flat, (off,), (off + size,))
            out[i] = lax.bitcast_convert_type(leaf, values.dtype).reshape(np.shape(like[i]))
    return out


def _assign(slots, leaf_ids, filled, leaf, local, valid):
    """Appends the valid entries ``(leaf, local)`` after the ``filled`` slots."""
    rank = jnp.cumsum(valid.astype(jnp.int32)) - 1
    pos = jnp.where(valid, filled + rank, slots.shape[0])
    slots = slots.at[pos].set(local.astype(jnp.int32), mode="drop")
    leaf_ids = leaf_ids.at[pos].set(leaf.astype(leaf_ids.dtype), mode="drop")
    return slots, leaf_ids, filled + jnp.sum(valid, dtype=jnp.int32)


def _spans_processes(x) -> bool:
    """Whether ``x`` is a concrete array that this process cannot read whole."""
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.is_fully_addressable


def _slots_from_masks(group: _Group, masks):
    """``(slots, leaf ids, filled)`` holding every true entry of ``masks`` in leaf order."""
    host = not any(
        isinstance(masks[i], jax.core.Tracer)
        or _spans_processes(masks[i])
        or _split(masks[i])
        or selection._spread(masks[i])
        for i in group.leaves
    )
    if host:  # the usual eager init on one device: a host pass is far cheaper than on device
        found = [np.flatnonzero(np.asarray(masks[i])) for i in group.leaves]
        n = sum(f.size for f in found)
        if n > group.cap:
            raise ValueError(
                f"the initial mask selects {n} {group.dtype} entries but compact "
                f"state has room for {group.cap} (the budget); this is a bug in the method."
            )
        slots = np.full(group.cap, -1, np.int32)
        leaf_ids = np.zeros(group.cap, group.leaf_dtype)
        if n:
            slots[:n] = np.concatenate(found)
            leaf_ids[:n] = np.concatenate([np.full(f.size, i) for i, f in zip(group.leaves, found)])
        return jnp.asarray(slots), jnp.asarray(leaf_ids), jnp.asarray(n, jnp.int32)
    slots = jnp.full((group.cap,), -1, jnp.int32)
    leaf_ids = jnp.zeros((group.cap,), group.leaf_dtype)
    filled = jnp.zeros([], jnp.int32)
    for i, size in zip(group.leaves, group.sizes):
        if size == 0:
            continue
        idx, count = _nonzero_leaf(masks[i], group.cap)
        slots, leaf_ids, filled = _assign(
            slots, leaf_ids, filled, jnp.full(idx.shape, i), idx, jnp.arange(idx.shape[0]) < count
        )
    return slots, leaf_ids, filled


class CompactInner:
    """Runs ``inner`` on the selected entries only; used by ``transform.selective``."""

    def __init__(self, inner: optax.GradientTransformationExtraArgs, budget: int):
        self.inner = inner
        self.budget = budget

    def init(self, param_leaves, mask_leaves) -> CompactState:
        if any(_spans_processes(x) for x in param_leaves):
            # Several processes: run on device (the host cannot read the whole masks), once.
            return jax.jit(self.init)(param_leaves, mask_leaves)
        groups = _groups(param_leaves, self.budget)
        found = [_slots_from_masks(g, mask_leaves) for g in groups]
        slots, leaf_ids, filled = (tuple(x) for x in zip(*found)) if groups else ((), (), ())
        compact_params = tuple(
            _gather(g, param_leaves, s, ids, g.dtype) for g, s, ids in zip(groups, slots, leaf_ids)
        )
        return CompactState(slots, filled, self.inner.init(compact_params), leaf_ids)

    def add_entries(
        self, state: CompactState, leaves, new_entries=None, old_mask=None, new_mask=None, most=None
    ):
        """Gives slots to entries that joined the mask this step.

        ``new_entries`` is ``(leaf, index, valid)`` as from ``selection.top_k_indices``; without
        it, the new entries are found by comparing ``old_mask`` and ``new_mask`` (slower); at
        most ``most`` of them per leaf (default: the slot count), e.g. ID3's ``k_max``.
        """
        groups = _groups(leaves, self.budget)
        self._check_groups(groups, state)
        slots, leaf_ids, filled = list(state.slots), list(state.leaf), list(state.filled)
        for j, g in enumerate(groups):
            if new_entries is not None:
                leaf, local, valid = new_entries
                member = np.zeros(len(leaves), bool)
                member[list(g.leaves)] = True
                in_group = valid & jnp.asarray(member)[leaf]
                slots[j], leaf_ids[j], filled[j] = _assign(slots[j], leaf_ids[j], filled[j], leaf, local, in_group)
            else:
                for i, size in zip(g.leaves, g.sizes):
                    if size == 0:
                        continue
                    idx, count = _nonzero_leaf(new_mask[i] & ~old_mask[i], min(g.cap, most or g.cap))
                    valid = jnp.arange(idx.shape[0]) < count
                    slots[j], leaf_ids[j], filled[j] = _assign(
                        slots[j], leaf_ids[j], filled[j], jnp.full(idx.shape, i), idx, valid
                    )
        return state._replace(slots=tuple(slots), leaf=tuple(leaf_ids), filled=tuple(filled))

    def update(self, grad_leaves, mask_leaves, state: CompactState, param_leaves, **extra_args):
        groups = _groups(grad_leaves, self.budget)
        self._check_groups(groups, state)
        c_grads = tuple(
            _gather(g, grad_leaves, s, ids, g.dtype) for g, s, ids in zip(groups, state.slots, state.leaf)
        )
        c_params = None
        if param_leaves is not None:
            c_params = tuple(
                _gather(g, param_leaves, s, ids, jnp.result_type(param_leaves[g.leaves[0]]))
                for g, s, ids in zip(groups, state.slots, state.leaf)
            )
        c_updates, inner_state = self.inner.update(c_grads, state.inner_state, c_params, **extra_args)
        out: list[Any] = [None] * len(grad_leaves)
        for g, s, ids, u in zip(groups, state.slots, state.leaf, c_updates):
            out_g = _scatter(g, u, s, ids, grad_leaves)
            for i in g.leaves:
                out[i] = out_g[i]
        for i, x in enumerate(grad_leaves):
            if out[i] is None:  # non-float and zero-size leaves (float0 passes through)
                out[i] = x if x.dtype == jax.dtypes.float0 else zero_update_like(x)
        return out, state._replace(inner_state=inner_state)

    @staticmethod
    def _check_groups(groups, state):
        caps = tuple(g.cap for g in groups)
        have = tuple(int(s.shape[0]) for s in state.slots)
        if len(state.leaf) != len(state.slots):
            raise ValueError(
                "compact state has no per-slot leaf positions (CompactState.leaf): it was saved "
                "by an older optax-selective; build the state again with tx.init(params)."
            )
        if caps != have:
            raise ValueError(
                f"compact state was built for parameter dtypes with slot sizes {have}, but these "
                f"gradients give {caps}; gradients must have the dtypes of the parameters."
            )
