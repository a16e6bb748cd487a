"""Compact inner state for the wrapper form: state for the selected entries only, O(budget).

Three parts, one job each:

* :mod:`~optax_selective.compact.allowlist`: which inner optimizers run exactly on compact
  state (:func:`compact_refusal`, :func:`check_compact_inner`, :func:`register_elementwise`);
* :mod:`~optax_selective.compact.state`: the slot buffers (:class:`CompactState`) and their
  static sizes per dtype;
* :mod:`~optax_selective.compact.inner`: :class:`CompactInner`, which gathers the gradient at
  the slots, runs the inner optimizer and scatters its updates back.

Where leaves are split over devices, reading and writing them at the slots is
:mod:`optax_selective.sharding`'s job.

Example:
  >>> import jax.numpy as jnp, optax, optax_selective as osel
  >>> tx = osel.selective_id3(budget=2, max_steps=1, inner=optax.adam(1e-2))  # compact=True
  >>> state = tx.init({"w": jnp.ones(4)})
  >>> [int(s.shape[0]) for s in osel.find_selective_state(state).inner_state.slots]
  [2]
"""

from optax_selective.compact.allowlist import (
    check_compact_inner,
    compact_refusal,
    register_elementwise,
)
from optax_selective.compact.inner import CompactInner
from optax_selective.compact.state import (
    CompactState,
    SlotGroup,
    check_leaf_sizes,
    leaf_id_dtype,
    slot_groups,
)

__all__ = [
    "register_elementwise",
    "compact_refusal",
    "check_compact_inner",
    "CompactState",
    "CompactInner",
    "SlotGroup",
    "check_leaf_sizes",
    "leaf_id_dtype",
    "slot_groups",
]
