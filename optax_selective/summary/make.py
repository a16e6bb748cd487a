"""Making and applying summaries: :func:`make_summary` gathers the selected entries of
``params`` (O(budget) data reaches the host), :func:`apply_summary` writes them into
(pretrained) params after checking every key, shape and dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_selective import sharding
from optax_selective._tree import unwrap_nnx
from optax_selective._version import __version__
from optax_selective.inspect import find_selective_state, warn_budget_shortfall
from optax_selective.methods._base import SpendSchedule
from optax_selective.summary.types import SparseSummary, SummaryLeaf, index_dtype


def _size(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _keyed_leaves(tree: Any, what: str) -> list[tuple[str, Any]]:
    items = [
        (jax.tree_util.keystr(p), x)
        for p, x in jax.tree_util.tree_leaves_with_path(unwrap_nnx(tree))
    ]
    if not items:
        raise ValueError(f"{what} is an empty pytree.")
    return items


def _method_name(state: Any) -> str:
    return type(state).method_name  # declared by the method (Method.name); see SelectiveState


def _in_host_memory(x: Any) -> bool:
    if isinstance(x, np.ndarray | np.generic):
        return True
    if not getattr(x, "is_fully_addressable", True):  # spans other processes: gather on device
        return False
    try:
        return all(d.platform == "cpu" for d in x.devices())
    except AttributeError:  # tracers and other array-likes
        return False


@jax.jit
def _count_selected(masks):
    return [jnp.sum(m, dtype=jnp.int32) for m in masks]


@functools.partial(jax.jit, static_argnums=2)
def _gather_selected(masks, params, counts):
    out = []
    for m, p, n in zip(masks, params, counts):
        (idx,) = jnp.nonzero(jnp.ravel(m), size=n)
        out.append((idx.astype(jnp.int32), jnp.ravel(p)[idx]))
    return out


@jax.jit
def _scatter(leaves, indices, values):
    return [jnp.ravel(x).at[i].set(v).reshape(x.shape) for x, i, v in zip(leaves, indices, values)]


def make_summary(params: Any, opt_state: Any, *, method: str | None = None) -> SparseSummary:
    """Gathers the selected entries of ``params`` into a :class:`SparseSummary`.

    Only the selected indices and values are copied to the host, so the output is
    O(entries selected) whatever the model size. Leaves with no selected entry are left out.

    Args:
      params: the fine-tuned parameters (a pytree, or a ``flax.nnx`` state of ``nnx.Param``).
      opt_state: any optimizer state holding exactly one selective transformation's state
        (chain, wrapper, ``MultiSteps``, ``nnx.Optimizer.opt_state``, ...).
      method: the method name to record. By default the name the method declares
        (``Method.name``: ``"id3"``, ``"pafi"``, ..., or a registered method's own), which
        the selective state keeps.

    Returns:
      The summary.

    Warns:
      BudgetShortfallWarning: (``optax_selective.inspect``) when ID3 or FISH selected fewer
        entries than its budget: fewer updates ran than ``max_steps`` / ``fish_steps`` (e.g.
        ``max_steps`` counted batches under gradient accumulation), or some scheduled updates
        had too few selectable entries with a nonzero, finite score. The message gives used
        vs budget and the likely cause; the selection itself is not changed.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> params = {"w": jnp.array([0.5, -0.1, 2.0, 0.0])}
      >>> state = osel.selective_pafi(budget=2).init(params)
      >>> s = osel.make_summary(params, state)
      >>> s.method
      'pafi'
      >>> s.leaves[0].key, s.leaves[0].indices.tolist(), s.leaves[0].values.tolist()
      ("['w']", [1, 3], [-0.10000000149011612, 0.0])
    """
    state = find_selective_state(opt_state)
    if method is None:
        method = _method_name(state)
    if not isinstance(method, str) or not method:
        raise TypeError(f"method must be a non-empty str, got {method!r}.")
    p_items = _keyed_leaves(params, "params")
    m_items = dict(_keyed_leaves(state.mask, "the optimizer state's mask"))
    p_keys = [k for k, _ in p_items]
    if sorted(p_keys) != sorted(m_items):
        missing = sorted(set(m_items) - set(p_keys))[:5]
        extra = sorted(set(p_keys) - set(m_items))[:5]
        raise ValueError(
            "params does not match the optimizer state's mask: keys only in the mask "
            f"{missing}, keys only in params {extra}. Pass the params the optimizer was built on."
        )
    masks, values = [m_items[k] for k in p_keys], [p for _, p in p_items]
    for key, m, p in zip(p_keys, masks, values):
        if np.shape(m) != np.shape(p):
            raise ValueError(
                f"params{key} has shape {np.shape(p)} but its mask has shape {np.shape(m)}."
            )
    # Leaves on an accelerator: two compiled calls for all of them (count, then gather exactly
    # that many), so only O(budget) data reaches the host. Leaves already in host memory (and
    # leaves of 2**31 entries or more, which need int64 indices) are read with NumPy directly.
    dev = [
        not (_in_host_memory(p) and _in_host_memory(m)) and index_dtype(_size(np.shape(p))) == np.int32
        for m, p in zip(masks, values)
    ]
    counts = iter(int(c) for c in _count_selected([m for m, d in zip(masks, dev) if d]))
    counts = [next(counts) if d else None for d in dev]
    gathered = iter(
        _gather_selected(
            [m for m, n in zip(masks, counts) if n],
            [p for p, n in zip(values, counts) if n],
            tuple(n for n in counts if n),
        )
    )
    leaves = []
    for key, m, p, n in zip(p_keys, masks, values, counts):
        if n is None:
            size = _size(np.shape(p))
            idx = np.flatnonzero(np.asarray(m)).astype(index_dtype(size))
            vals = np.asarray(p).reshape(-1)[idx]
        elif n == 0:
            continue
        else:
            idx, vals = (sharding.to_host(x) for x in next(gathered))
        if idx.size == 0:
            continue
        leaves.append(SummaryLeaf(key, np.shape(p), np.dtype(vals.dtype), idx, vals))
    used = sum(leaf.indices.size for leaf in leaves)
    _warn_if_budget_underused(state, used, method)
    return SparseSummary(leaves=tuple(leaves), budget_used=used, method=method, version=__version__)


def _warn_if_budget_underused(state: Any, used: int, method: str) -> None:
    """Warns (once per place and message) when a method that spends its budget over steps
    (ID3, FISH) ended with fewer entries selected; see :func:`inspect.budget_shortfall_message`."""
    schedule = getattr(state.method_state, "schedule", None)
    # count 0: nothing trained yet (a summary of the starting point), nothing to explain
    if isinstance(schedule, SpendSchedule) and int(state.count) > 0:
        warn_budget_shortfall(
            used, schedule.budget, method, steps_run=int(state.count), max_steps=schedule.steps,
            stacklevel=3,
        )


def apply_summary(params: Any, summary: SparseSummary) -> Any:
    """Returns ``params`` with the summary's entries written in; ``params`` is not modified.

    Every leaf of the summary is checked first: its key must name a leaf of ``params`` with the
    same shape and dtype. If any check fails a ``ValueError`` lists every mismatch and nothing
    is applied. Leaves of ``params`` that the summary does not name are returned unchanged.

    Args:
      params: the parameters to start from (usually the pretrained ones); a pytree or a
        ``flax.nnx`` state (then use ``nnx.update(model, result)``).
      summary: from :func:`make_summary` or :func:`load_summary`.

    Returns:
      New params of the same structure; JAX leaves stay JAX arrays, NumPy leaves NumPy.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> leaf = osel.SummaryLeaf("['w']", (3,), jnp.float32, jnp.array([1], "int32"),
      ...                         jnp.array([9.0], jnp.float32))
      >>> s = osel.SparseSummary((leaf,), budget_used=1, method="pafi")
      >>> osel.apply_summary({"w": jnp.zeros(3)}, s)["w"].tolist()
      [0.0, 9.0, 0.0]
    """
    if not isinstance(summary, SparseSummary):
        raise TypeError(f"summary must be a SparseSummary, got {type(summary).__name__}.")
    leaves, treedef = jax.tree.flatten(params)
    keys = [k for k, _ in _keyed_leaves(params, "params")]
    if len(keys) != len(leaves):  # pragma: no cover - as_pure keeps leaf order and count
        raise ValueError("could not match params leaves to their path keys.")
    position = {k: i for i, k in enumerate(keys)}
    problems = []
    for leaf in summary.leaves:
        i = position.get(leaf.key)
        if i is None:
            near = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            problems.append(f"{leaf.key}: no such leaf in params (params has {near})")
            continue
        shape, dtype = tuple(np.shape(leaves[i])), np.dtype(jnp.result_type(leaves[i]))
        if shape != leaf.shape:
            problems.append(f"{leaf.key}: summary shape {leaf.shape}, params shape {shape}")
        if dtype != leaf.dtype:
            problems.append(
                f"{leaf.key}: summary dtype {leaf.dtype.name}, params dtype {dtype.name}"
            )
    if problems:
        raise ValueError(
            "summary does not fit params; nothing was applied:\n  " + "\n  ".join(problems)
        )
    out = list(leaves)
    on_device = []
    for leaf in summary.leaves:
        i = position[leaf.key]
        x = leaves[i]
        if _in_host_memory(x) or leaf.indices.dtype == np.int64:
            flat = np.array(x).reshape(-1)  # a copy: the input is never written to
            flat[leaf.indices] = leaf.values
            new = flat.reshape(leaf.shape)
            out[i] = new if isinstance(x, np.ndarray) else jax.device_put(new, x.sharding)
        else:
            on_device.append((i, leaf))
    if on_device:  # one compiled scatter for all JAX leaves
        new = _scatter(
            [leaves[i] for i, _ in on_device],
            [leaf.indices for _, leaf in on_device],
            [leaf.values for _, leaf in on_device],
        )
        for (i, _), x in zip(on_device, new):
            out[i] = x
    return jax.tree.unflatten(treedef, out)
