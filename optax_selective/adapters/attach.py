"""Attach and detach JAX summaries: :func:`attach` returns an :class:`AttachedSummary` whose
``params`` have the summary's values written in and whose :meth:`~AttachedSummary.detach`
writes the saved base values back, bit for bit. Only the O(budget) old values of the touched
entries are kept.

Several summaries may be attached one after another (each to the ``params`` the previous
attach returned) and detached in any order, as long as they touch disjoint entries; an attach
that would overlap an attached summary is refused, since the order of detaching would then
matter. The bookkeeping follows the arrays: the leaves an attach returns remember which
attached summaries they hold.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import numpy as np

from optax_selective.adapters import core
from optax_selective.adapters.pretrained import gather_base, model_signature, to_entries
from optax_selective.summary.make import apply_summary
from optax_selective.summary.types import SparseSummary

# id(leaf array) -> (weak reference to it, the attached summaries it holds)
_HOLDS: dict[int, tuple[Any, tuple[AttachedSummary, ...]]] = {}
_COUNTER = itertools.count(1)


def _holds(x: Any) -> tuple[AttachedSummary, ...]:
    got = _HOLDS.get(id(x))
    if got is None or got[0]() is not x:
        return ()
    return got[1]


def _remember(x: Any, holds: tuple[AttachedSummary, ...]) -> None:
    if not holds:
        _HOLDS.pop(id(x), None)
        return
    try:
        key = id(x)
        ref = weakref.ref(x, lambda _r, holds=_HOLDS: holds.pop(key, None))
    except TypeError:  # pragma: no cover - every array type we return supports weak refs
        return
    _HOLDS[id(x)] = (ref, holds)


def _keyed(params: Any) -> dict[str, Any]:
    import jax

    from optax_selective._tree import unwrap_nnx

    return {jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_leaves_with_path(unwrap_nnx(params))}


class AttachedSummary:
    """A summary attached to params by :func:`attach`.

    Attributes:
      params: the params with the summary's values written in.
      summary: the attached summary.
      saved: the base values of the touched entries (a summary of the same indices).
      attached: whether :meth:`detach` has not run yet.

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax_selective as osel
      >>> leaf = osel.SummaryLeaf("['w']", (2,), np.float32, np.array([0], np.int32),
      ...                         np.array([5.0], np.float32))
      >>> h = osel.attach({"w": jnp.ones(2)}, osel.SparseSummary((leaf,), 1, "pafi"))
      >>> h.saved.leaves[0].values.tolist(), h.attached
      ([1.0], True)
    """

    def __init__(self, params: Any, summary: SparseSummary, saved: SparseSummary, label: str):
        self.params, self.summary, self.saved, self.label = params, summary, saved, label
        self.attached = True

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"AttachedSummary({self.label}, {self.summary.budget_used} entries, {state})"

    def detach(self, params: Any = None) -> Any:
        """Returns params with the saved base values written back at the summary's entries.

        Args:
          params: the params holding this summary (by default ``self.params``): e.g. what a
            later :func:`attach` returned, or what another handle's ``detach`` returned.

        Raises:
          AdapterError: if this summary was detached already, or ``params`` come from
            before it was attached.
        """
        if not self.attached:
            raise core.AdapterError(f"{self.label} was detached already.")
        params = self.params if params is None else params
        keyed = _keyed(params)
        for leaf in self.summary.leaves:
            x = keyed.get(leaf.key)
            holds = _holds(x) if x is not None else ()
            if x is not None and any(h is not self for h in holds) and self not in holds:
                raise core.AdapterError(
                    f"{self.label} is not attached to these params ({leaf.key} holds "
                    f"{', '.join(h.label for h in holds)}); pass the params that hold it.")
        out = apply_summary(params, self.saved)
        new = _keyed(out)
        for leaf in self.summary.leaves:
            old = keyed[leaf.key]
            _remember(new[leaf.key], tuple(h for h in _holds(old) if h is not self))
        self.attached = False
        self.params = None
        return out


def attach(params: Any, summary: SparseSummary, *, label: str | None = None) -> AttachedSummary:
    """Writes ``summary`` into (a copy of) ``params`` and keeps what it overwrote.

    Args:
      params: the params (a pytree or ``flax.nnx`` state); not modified.
      summary: the summary to attach (checked against ``params`` first).
      label: a name for error messages (default ``"summary #N"``).

    Returns:
      The handle: ``handle.params`` are the new params, ``handle.detach(params)`` returns
      params with the base values back.

    Raises:
      ValueError: the summary does not fit ``params`` (naming the first differing parameter).
      AdapterError: it touches an entry an attached summary holds.

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax_selective as osel
      >>> base = {"w": jnp.array([1.0, 2.0, 3.0])}
      >>> leaf = osel.SummaryLeaf("['w']", (3,), np.float32, np.array([1], np.int32),
      ...                         np.array([9.0], np.float32))
      >>> h = osel.attach(base, osel.SparseSummary((leaf,), 1, "pafi"))
      >>> h.params["w"].tolist()
      [1.0, 9.0, 3.0]
      >>> h.detach()["w"].tolist()
      [1.0, 2.0, 3.0]
    """
    if not isinstance(summary, SparseSummary):
        raise TypeError(f"summary must be a SparseSummary, got {type(summary).__name__}.")
    label = label or f"summary #{next(_COUNTER)} ({summary.method})"
    core.check_fits(to_entries(summary), model_signature(params), where=label)
    keyed = _keyed(params)
    for leaf in summary.leaves:
        for h in _holds(keyed[leaf.key]):
            other = {lf.key: lf for lf in h.summary.leaves}[leaf.key]
            at = core.first_overlap(other.indices.astype(np.int64), leaf.indices.astype(np.int64))
            if at is not None:
                raise core.overlap_error(leaf.key, at, h.label)
    saved = gather_base(params, summary)
    out = apply_summary(params, summary)
    handle = AttachedSummary(out, summary, saved, label)
    new = _keyed(out)
    for leaf in summary.leaves:
        _remember(new[leaf.key], _holds(keyed[leaf.key]) + (handle,))
    return handle
