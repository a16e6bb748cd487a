"""The compact state's data: slot buffers per parameter dtype, and their static sizes.

Per floating-point dtype of the parameters there is one *slot buffer* of static size
``cap = min(budget, entries of that dtype)``: for each slot, the leaf it points into
(position in leaf order; int16, int32 past 32,767 leaves) and the flat row-major index in
that leaf (int32; ``-1`` where the slot is still empty). Indexing per leaf means no dtype
total is ever formed, so models of any size work; a single leaf needs fewer than 2**31
entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_selective._tree import is_float


class CompactState(NamedTuple):
    """The wrapper form's inner state when compact.

    Attributes:
      slots: one int32 vector per parameter dtype (static size ``min(budget, entries of that
        dtype)``): the flat row-major index of each slot's entry in its leaf, ``-1`` if empty.
      filled: one int32 scalar per dtype, the number of slots in use.
      inner_state: the inner optimizer's state over the tuple of slot vectors.
      leaf: one vector per dtype, shaped like ``slots``: the position (in leaf order) of the
        leaf each slot points into (int16, or int32 for more than 32,767 leaves; 0 if empty).

    Example:
      >>> import jax.numpy as jnp, optax, optax_selective as osel
      >>> tx = osel.selective_pafi(budget=2, inner=optax.sgd(0.1))
      >>> state = osel.find_selective_state(tx.init({"w": jnp.array([3.0, 0.1, -0.2])})).inner_state
      >>> state.slots[0].tolist(), int(state.filled[0])
      ([1, 2], 2)
    """

    slots: tuple[jax.Array, ...]
    filled: tuple[jax.Array, ...]
    inner_state: Any
    leaf: tuple[jax.Array, ...] = ()


class SlotGroup(NamedTuple):
    """The static layout of one dtype's slot buffer (see :func:`slot_groups`): the dtype, its
    leaves' positions and sizes, the slot count ``cap`` and the dtype of per-slot leaf ids.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import compact
      >>> compact.slot_groups([jnp.zeros(4, jnp.bfloat16)], 3)[0].sizes
      (4,)
    """

    dtype: Any
    leaves: tuple[int, ...]  # leaf positions in leaf order
    sizes: tuple[int, ...]
    cap: int
    leaf_dtype: Any  # dtype of the per-slot leaf positions


_MAX_LEAF = 2**31 - 1  # entries of one leaf: its flat indices are int32


def leaf_id_dtype(num_leaves: int):
    """int16 leaf positions while they fit (2 bytes per slot), else int32.

    Example:
      >>> from optax_selective import compact
      >>> compact.leaf_id_dtype(10).__name__, compact.leaf_id_dtype(40_000).__name__
      ('int16', 'int32')
    """
    return jnp.int16 if num_leaves <= np.iinfo(np.int16).max else jnp.int32


def check_leaf_sizes(shapes, what: str, paths=None) -> None:
    """Refuses a leaf whose flat indices do not fit int32, naming it and the way out.

    Example:
      >>> from optax_selective import compact
      >>> compact.check_leaf_sizes([(3, 4), None], "compact state")  # fits: no error
    """
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


def slot_groups(leaves: Sequence[Any], budget: int) -> list[SlotGroup]:
    """One :class:`SlotGroup` per float dtype of ``leaves``, with ``cap = min(budget, entries)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import compact
      >>> (g,) = compact.slot_groups([jnp.zeros(3), jnp.zeros(2, jnp.int32)], 5)
      >>> str(g.dtype), g.leaves, g.cap
      ('float32', (0,), 3)
    """
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
        groups.append(SlotGroup(dtype, tuple(idx), sizes, cap, leaf_id_dtype(len(leaves))))
    return groups


