"""The wrapper form's compact inner state at work: the inner optimizer runs on the selected
entries only, O(budget) instead of O(N).

* Each step the raw gradient and the parameters are gathered at the slots into one vector
  per dtype (leaf by leaf, in the leaves' own dtype; nothing is concatenated); empty slots
  get zeros. ``inner`` runs on that tuple of vectors; its updates are scattered back leaf by
  leaf, so every unselected entry gets an exact zero update.
* An empty slot sees a zero gradient from step 0, exactly as an unselected entry does in the
  dense form, so when an entry takes a slot the slot's state (e.g. Adam's moments, zero) is
  the state the dense form would hold for it, and the inner step count is global: late
  entries get Adam's bias correction for the global count, as in the dense form.

Sharding: the slot vectors and the inner state are replicated. Leaves split over devices in
explicit mode are read and written per device block (``sharding.gather_leaf`` /
``scatter_leaf``), so no leaf is ever gathered. In auto mode under a multi-device mesh context
(``sharding.split_mode``) the leaves are indexed with N-d indices, which XLA
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

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_selective import sharding
from optax_selective._tree import zero_update_like
from optax_selective.compact.state import CompactState, SlotGroup, slot_groups


def _in_leaf(slots, leaf_ids, i):
    """Which slots point into leaf ``i`` (empty slots hold -1 and point nowhere)."""
    return (leaf_ids == i) & (slots >= 0)


def _gather(group: SlotGroup, leaves, slots, leaf_ids, dtype):
    """The group's leaves at the slots, one vector in ``dtype``, leaf by leaf."""
    out = jnp.zeros(slots.shape, dtype)
    for i, size in zip(group.leaves, group.sizes):
        if size == 0:
            continue
        ok = _in_leaf(slots, leaf_ids, i)
        out = jnp.where(ok, sharding.gather_leaf(leaves[i], slots, ok, dtype), out)
    return out


def _scatter(group: SlotGroup, values, slots, leaf_ids, like):
    """The group's update leaves, ``values`` placed at the slots, zeros elsewhere."""
    if jnp.dtype(values.dtype).itemsize < 4 and not (
        sharding.split_mode([like[i] for i in group.leaves])
    ):
        return _scatter_16bit(group, values, slots, leaf_ids, like)
    return {i: sharding.scatter_leaf(values, slots, _in_leaf(slots, leaf_ids, i), like[i]) for i in group.leaves}


_CHUNK = 2**31 - 1  # entries per flat update buffer: offsets stay int32


def _scatter_16bit(group: SlotGroup, values, slots, leaf_ids, like):
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



def _slots_from_masks(group: SlotGroup, masks):
    """``(slots, leaf ids, filled)`` holding every true entry of ``masks`` in leaf order."""
    host = all(sharding.host_readable(masks[i]) for i in group.leaves)
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
        idx, count = sharding.nonzero_leaf(masks[i], group.cap)
        slots, leaf_ids, filled = _assign(
            slots, leaf_ids, filled, jnp.full(idx.shape, i), idx, jnp.arange(idx.shape[0]) < count
        )
    return slots, leaf_ids, filled


class CompactInner:
    """Runs ``inner`` on the selected entries only; used by ``transform.selective``.

    ``init`` gives every selected entry a slot, ``add_entries`` gives slots to entries that
    joined the mask, ``update`` gathers the gradient at the slots, runs ``inner`` and scatters
    its updates back (exact zeros elsewhere).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optax_selective import compact
      >>> ci = compact.CompactInner(optax.with_extra_args_support(optax.sgd(1.0)), budget=2)
      >>> mask = [jnp.array([False, True, True])]
      >>> state = ci.init([jnp.zeros(3)], mask)
      >>> updates, state = ci.update([jnp.array([1.0, 2.0, 3.0])], mask, state, [jnp.zeros(3)])
      >>> updates[0].tolist()
      [-0.0, -2.0, -3.0]
    """

    def __init__(self, inner: optax.GradientTransformationExtraArgs, budget: int):
        self.inner = inner
        self.budget = budget

    def init(self, param_leaves, mask_leaves) -> CompactState:
        concrete = not any(isinstance(x, jax.core.Tracer) for x in (*param_leaves, *mask_leaves))
        if concrete and not all(sharding.host_readable(m) for m in mask_leaves):
            # Masks split over devices or processes: the host cannot read them cheaply, and op
            # by op the per-leaf shard_maps would compile hundreds of small programs (~15 s on
            # 8 CPU devices); one compiled program instead (~1 s).
            return jax.jit(self.init)(param_leaves, mask_leaves)
        groups = slot_groups(param_leaves, self.budget)
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
        groups = slot_groups(leaves, self.budget)
        self._checkslot_groups(groups, state)
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
                    idx, count = sharding.nonzero_leaf(new_mask[i] & ~old_mask[i], min(g.cap, most or g.cap))
                    valid = jnp.arange(idx.shape[0]) < count
                    slots[j], leaf_ids[j], filled[j] = _assign(
                        slots[j], leaf_ids[j], filled[j], jnp.full(idx.shape, i), idx, valid
                    )
        return state._replace(slots=tuple(slots), leaf=tuple(leaf_ids), filled=tuple(filled))

    def update(self, grad_leaves, mask_leaves, state: CompactState, param_leaves, **extra_args):
        groups = slot_groups(grad_leaves, self.budget)
        self._checkslot_groups(groups, state)
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
    def _checkslot_groups(groups, state):
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
