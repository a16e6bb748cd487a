"""Where arrays live across devices: every layout decision of the package, in one place.

Selection and the compact state must never gather a leaf that is split over devices. They
ask one question, :func:`split_mode`, and take the path that suits its answer:

* ``None``: the arrays are whole on one device (or replicated); the fast single-device
  paths run (``lax.top_k``, reshapes, flat gathers).
* ``"explicit"``: some array's type splits it over several devices (``AxisType.Explicit``).
  JAX refuses reshapes, gathers and sorts along a split axis, so work goes per device block
  through ``shard_map`` (:func:`gather_leaf`, :func:`scatter_leaf`, :func:`nonzero_leaf`).
* ``"auto"``: XLA's partitioner may split them (``AxisType.Auto``: under a multi-device
  ``jax.set_mesh``, a traced value typed with such a mesh, or a concrete array split over
  devices). Work uses operations the partitioner splits without resharding a leaf: reductions,
  N-d gathers and scatters at O(budget) indices, and ``custom_partitioning`` to list a mask.

The other helpers retype values without moving data (:func:`unsplit`, :func:`retype_like`),
place masks like their parameters (:func:`place_like`), say what a concrete array allows
(:func:`host_readable`, :func:`spans_processes`) and copy O(budget) values to the host
(:func:`to_host`). Nothing here chooses entries: the rules live in
:mod:`optax_selective.selection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning

from optax_selective._tree import zero_update_like

SplitMode = Literal["explicit", "auto"] | None


# ---------------------------------------------------------------------- the one question


def split_mode(xs: Sequence[Any]) -> SplitMode:
    """How the arrays ``xs`` are (or may be) split over devices: ``None``, ``"explicit"`` or ``"auto"``.

    ``"explicit"`` if some array's type splits it over more than one device in explicit mode
    (axes of size 1 do not count: such an array is whole on its device); else ``"auto"`` if
    XLA's partitioner may split them (a multi-device ``AxisType.Auto`` mesh context, a value
    typed with such a mesh, e.g. a jitted argument placed with a ``NamedSharding``, or a
    concrete array already split over devices); else ``None``. ``None`` entries are ignored.
    Without a mesh context, a traced value's placement is unknown at trace time and the
    answer is ``None``: the single-device paths are traced and XLA partitions them.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import sharding
      >>> print(sharding.split_mode([jnp.zeros(4), None]))
      None
    """
    xs = [x for x in xs if x is not None]
    if any(_explicitly_sharded(x) for x in xs):
        return "explicit"
    if _split_by_partitioner(xs):
        return "auto"
    return None


def _explicitly_sharded(x: jax.Array) -> bool:
    """Whether ``x``'s type splits it over more than one device (explicit mode).

    Axes of size 1 do not count: an array "sharded" over a 1-device mesh is whole on that
    device, and the fast paths (top_k, reshape, gather) run on it unchanged.
    """
    try:
        sharding = jax.typeof(x).sharding
        spec, sizes = sharding.spec, dict(sharding.mesh.shape)
    except Exception:  # noqa: BLE001 - older jax or non-array: treat as unsharded
        return False
    for p in spec:
        for axis in () if p is None else (p if isinstance(p, tuple) else (p,)):
            if sizes.get(axis, 1) > 1:
                return True
    return False


def _auto_mesh_context() -> bool:
    """Whether tracing runs under a mesh context (``jax.set_mesh``) that splits some
    ``AxisType.Auto`` axis over more than one device.

    In auto mode a traced value's type carries no sharding, so under ``jax.jit`` this is the
    one thing known at trace time: XLA's partitioner will lay the arrays out over that mesh.
    Inside ``shard_map`` the mapped axes are Manual and do not count.
    """
    try:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return False
        auto = jax.sharding.AxisType.Auto
        return any(t == auto and n > 1 for t, n in zip(mesh.axis_types, mesh.axis_sizes))
    except Exception:  # noqa: BLE001 - older jax: no abstract mesh
        return False


def _typed_over_auto_mesh(x) -> bool:
    """Whether ``x``'s type names a mesh with an ``AxisType.Auto`` axis over several devices.

    Under ``jax.jit`` without ``jax.set_mesh`` (how most users write a step), an argument
    placed with a ``NamedSharding`` is traced with that mesh in its type (its layout, the
    spec, is not: auto mode), and values computed from it inherit the mesh. So the step
    knows XLA's partitioner will lay it out over that mesh, as under a mesh context.
    """
    try:
        mesh = jax.typeof(x).sharding.mesh
        auto = jax.sharding.AxisType.Auto
        return any(t == auto and n > 1 for t, n in zip(mesh.axis_types, mesh.axis_sizes))
    except Exception:  # noqa: BLE001 - older jax or an untyped value
        return False


def _spread(x) -> bool:
    """Whether ``x`` is a concrete array split over several devices (any mode)."""
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return False
    try:
        return len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
    except Exception:  # noqa: BLE001
        return False


def _split_by_partitioner(xs) -> bool:
    """Whether XLA's SPMD partitioner (auto mode) may split these arrays over devices.

    True under a multi-device auto mesh context (:func:`_auto_mesh_context`), when a value's
    type names such a mesh (:func:`_typed_over_auto_mesh`: jitted arguments placed with a
    ``NamedSharding``, no ``jax.set_mesh`` needed), or when a concrete array is already split
    over devices without an explicit-mode type. Selection then takes
    the paths that partition without resharding a leaf: reductions and elementwise
    operations (the counting top-k), N-d gathers and scatters at O(budget) indices, and
    ``custom_partitioning`` where entries must be listed. Without a mesh context, a traced
    value's placement is unknown at trace time and the fast single-device paths are traced.
    """
    xs = [x for x in xs if x is not None]
    if not xs:
        return False
    if _auto_mesh_context() or any(_typed_over_auto_mesh(x) for x in xs):
        return True
    return any(_spread(x) and not _explicitly_sharded(x) for x in xs)


def unsplit(x):
    """``x`` retyped as unsharded if its explicit-mode type names only size-1 mesh axes.

    Explicit mode refuses reshapes and gathers that would be free on such an array (its whole
    value is on one device); the retyping moves no data. Anything else is returned as is.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import sharding
      >>> x = jnp.arange(3.0)
      >>> sharding.unsplit(x) is x  # untyped: nothing to drop
      True
    """
    if x is None or _explicitly_sharded(x):
        return x
    try:
        sharding = jax.typeof(x).sharding
        named = any(p is not None for p in sharding.spec)
        explicit = jax.sharding.AxisType.Explicit in tuple(sharding.mesh.axis_types)
    except Exception:  # noqa: BLE001 - not a typed array
        return x
    if not (named and explicit):
        return x
    return jax.sharding.reshard(x, sharding.update(spec=jax.sharding.PartitionSpec()))


def retype_like(out, ref):
    """``out`` resharded to ``ref``'s explicit type when :func:`unsplit` dropped it.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import sharding
      >>> out = jnp.ones(3)
      >>> sharding.retype_like(out, jnp.zeros(3)) is out  # ref has no explicit type
      True
    """
    if out is None or ref is None or unsplit(ref) is ref:
        return out
    return jax.sharding.reshard(out, jax.typeof(ref).sharding)


# -------------------------------------------------------- gather / scatter by flat index
#
# A leaf split over devices in explicit mode (``AxisType.Explicit``) is never gathered: each
# device reads the slots that fall in its own block and the results are summed over the
# devices that split the leaf (one nonzero term per slot, summed as integer bit patterns, so
# exact, -0.0 and NaN payloads included); scattering writes each device's block locally.
# Only O(cap) values and indices cross devices. Unsplit leaves use plain indexing.


def _split(x) -> tuple[Any, Any] | None:
    """``(mesh, spec)`` if ``x``'s type splits it over more than one device, else None."""
    if not _explicitly_sharded(x):
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


def gather_leaf(x, index, ok, dtype):
    """``x.reshape(-1)[index]`` in ``dtype`` where ``ok`` (replicated, like ``index``), zeros elsewhere.

    A leaf split over devices is read per device block (explicit mode: ``shard_map``; auto
    mode: N-d indices the partitioner splits): only O(len(index)) values cross devices.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import sharding
      >>> x = jnp.arange(6.0).reshape(2, 3)
      >>> sharding.gather_leaf(x, jnp.array([4, 0]), jnp.array([True, False]), jnp.float32)
      Array([4., 0.], dtype=float32)
    """
    if jnp.dtype(dtype) == jnp.bool_:  # masks: summed over devices as uint8 (no bool psum)
        return gather_leaf(x, index, ok, jnp.uint8) != 0
    split = _split(x)
    if split is None and np.ndim(x) > 0 and split_mode([x]) == "auto":
        return _gather_leaf_auto(x, index, ok, dtype)
    if split is None:
        # lax.gather straight on the slots: XLA clamps out-of-range starts itself, so every
        # leaf reads through the one slot vector and no per-leaf index array is written.
        flat = jnp.reshape(unsplit(x), (-1,))
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
    """:func:`gather_leaf` for a leaf that XLA's partitioner may split (auto mode).

    Indexed with N-d indices (a flat view of a leaf split over two dimensions is not a
    block of it, and reshaping would reshard it): the partitioner then gathers on each
    device from its own block, zeros what lies outside it, and sums over the devices,
    O(cap) values. The gather reads the leaf's bits as unsigned integers, so that sum of one
    nonzero term is exact (-0.0 and NaN payloads included).
    """
    shape = np.shape(x)
    size = int(np.prod(shape, dtype=np.int64))
    idx = jnp.unravel_index(jnp.clip(index, 0, size - 1), shape)
    if jnp.dtype(x.dtype) == jnp.bool_:  # no payload bits to keep (and no bool bitcast)
        return jnp.where(ok, x[idx].astype(dtype), jnp.zeros((), dtype))
    width = jnp.dtype(x.dtype).itemsize
    bits = lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * width}"))
    got = lax.bitcast_convert_type(bits[idx], x.dtype).astype(dtype)
    return jnp.where(ok, got, jnp.zeros((), dtype))


def scatter_leaf(values, index, ok, like):
    """Zeros shaped and sharded like ``like``, with ``values`` at the flat ``index`` where ``ok``.

    The zeros are ``-0.0`` (the update that leaves every other entry bit-identical), and a
    leaf split over devices is written per device block.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import sharding
      >>> out = sharding.scatter_leaf(jnp.array([5.0]), jnp.array([2]), jnp.array([True]), jnp.zeros((2, 2)))
      >>> out.tolist()
      [[-0.0, -0.0], [5.0, -0.0]]
    """
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


def nonzero_leaf(mask, most: int):
    """The first ``most`` true flat indices of ``mask`` (ascending, int32) and how many are true.

    Padding slots hold 0 and are past the count. For a split mask each device lists its own
    block's first ``most`` and the devices exchange these lists only (O(devices * most)).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import sharding
      >>> idx, count = sharding.nonzero_leaf(jnp.array([[False, True], [True, True]]), 2)
      >>> idx.tolist(), int(count)
      ([1, 2], 3)
    """
    shape = np.shape(mask)
    size = int(np.prod(shape, dtype=np.int64))
    most = min(most, size)
    split = _split(mask)
    if split is None and len(shape) > 0 and split_mode([mask]) == "auto":
        both = _nonzero_partitioned(mask, most)
        return both[:most], both[most]
    if split is None:
        return _nonzero_whole(unsplit(mask), most)
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



# ------------------------------------------------------------------- placement and host


def place_like(x: jax.Array, ref: Any) -> jax.Array:
    """``x`` with the sharding of ``ref`` (same shape), where that sharding is known.

    Known means: ``ref`` is a concrete ``jax.Array`` (its ``.sharding``), or a traced value whose
    type carries an explicit-mode sharding (``jax.sharding.AxisType.Explicit``). Under ``jit`` in
    auto mode the sharding of a tracer is not known here; ``x`` is returned as is and XLA's
    propagation (or the caller's ``out_shardings``) decides. Masks and other per-entry state go
    through this so that they are sharded like the parameters they describe.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import sharding
      >>> ref = jnp.zeros(3)
      >>> sharding.place_like(jnp.ones(3, bool), ref).sharding == ref.sharding
      True
    """
    if np.shape(x) != np.shape(ref):
        return x
    if isinstance(ref, jax.core.Tracer):
        sharding = jax.typeof(ref).sharding
        axis_types = getattr(sharding.mesh, "axis_types", ())
        if any(t == jax.sharding.AxisType.Explicit for t in axis_types):
            return jax.sharding.reshard(x, sharding)
        return x
    if isinstance(ref, jax.Array) and not isinstance(x, jax.core.Tracer):
        if x.sharding != ref.sharding:
            return jax.device_put(x, ref.sharding)
    return x


def spans_processes(x: Any) -> bool:
    """Whether ``x`` is a concrete array that this process cannot read whole.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import sharding
      >>> sharding.spans_processes(jnp.zeros(3))
      False
    """
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.is_fully_addressable


def host_readable(x: Any) -> bool:
    """Whether ``x`` is a concrete value this process holds whole (on one device, replicated
    or in NumPy), so ``np.asarray(x)`` reads it without any cross-device work.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import sharding
      >>> sharding.host_readable(jnp.zeros(3))
      True
    """
    if isinstance(x, jax.core.Tracer) or spans_processes(x):
        return False
    return not (_split(x) or _spread(x))


def to_host(x: jax.Array) -> np.ndarray:
    """``x`` (O(budget) entries) as NumPy, also when its shards sit in other processes.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import sharding
      >>> sharding.to_host(jnp.arange(3)).tolist()
      [0, 1, 2]
    """
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
