"""Sparse summaries: the selected entries of a fine-tuned model, O(budget) in size.

A :class:`SparseSummary` holds, for each parameter leaf with selected entries, the leaf's
tree path key (``jax.tree_util.keystr``), shape and dtype, the flat row-major indices of the
selected entries and their values; plus the number of entries selected, the method name and
the library version (DESIGN.md section 5).

* :func:`make_summary` reads the mask from any optimizer state holding one selective
  transformation and gathers the selected values of ``params``.
* :func:`apply_summary` writes them into (pretrained) params, after checking every key,
  shape and dtype; on any mismatch it raises and changes nothing.
* :func:`save_summary` / :func:`load_summary` store a summary with orbax-checkpoint: the
  arrays in an orbax PyTree item with safe names (``leaf_0000``), everything else in a JSON
  item. Loading reads only JSON and array data (no pickle, no code), restores onto the host
  (NumPy) whatever device saved it, and checks a SHA-256 digest of every leaf, so a corrupt
  or truncated folder raises :class:`SummaryFormatError` instead of loading wrong values.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from optax_selective._tree import unwrap_nnx
from optax_selective._version import __version__
from optax_selective.inspect import find_selective_state, warn_budget_shortfall
from optax_selective.methods._base import SpendSchedule

FORMAT_NAME = "optax_selective.SparseSummary"
FORMAT_VERSION = 2  # 2: digests cover key, shape and dtype too; version 1 folders still load
_READABLE_VERSIONS = (1, 2)
_MAX_JSON_BYTES = 64 * 2**20
_MAX_ZARRAY_BYTES = 64 * 2**10
_MAX_CHUNKS = 4096
_ZARR_DTYPES = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "bfloat16": "bfloat16",
                "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
                "int32": "<i4", "int64": "<i8"}
_INT32_LIMIT = 2**31

# Leaf dtypes a summary may hold, by the name written to disk. Names are looked up here and
# nowhere else, so a file can never make the loader resolve an arbitrary attribute.
_FLOAT_DTYPES: dict[str, np.dtype] = {
    np.dtype(t).name: np.dtype(t)
    for t in (
        np.float16,
        np.float32,
        np.float64,
        ml_dtypes.bfloat16,
        ml_dtypes.float8_e4m3fn,
        ml_dtypes.float8_e5m2,
    )
}
_INDEX_DTYPES = {"int32": np.dtype(np.int32), "int64": np.dtype(np.int64)}


class SummaryFormatError(ValueError):
    """A summary folder is missing, corrupt, truncated or not a summary at all.

    Example:
      >>> import tempfile, optax_selective as osel
      >>> try:
      ...     osel.load_summary(tempfile.mkdtemp())   # an empty folder is no summary
      ... except osel.SummaryFormatError as e:
      ...     print("refused")
      refused
    """


def index_dtype(size: int) -> np.dtype:
    """Index dtype for a leaf of ``size`` entries: int32, or int64 from 2**31 entries up."""
    return np.dtype(np.int32) if size < _INT32_LIMIT else np.dtype(np.int64)


def _size(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True, eq=False)
class SummaryLeaf:
    """The selected entries of one parameter leaf.

    Attributes:
      key: the leaf's tree path string, ``jax.tree_util.keystr(path)``, e.g. ``"['w']"``.
      shape: the full leaf's shape.
      dtype: the leaf's dtype (a floating-point NumPy dtype; bfloat16 included).
      indices: 1-D int32 (int64 for leaves of 2**31 entries or more) flat row-major indices,
        strictly increasing.
      values: 1-D array of ``dtype``, the entries at ``indices``.

    Example:
      >>> import numpy as np, optax_selective as osel
      >>> leaf = osel.SummaryLeaf("['w']", (2, 2), np.dtype(np.float32),
      ...                         np.array([1, 2], np.int32), np.array([0.5, -1.0], np.float32))
      >>> leaf.nbytes
      16
    """

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    indices: np.ndarray
    values: np.ndarray

    def __post_init__(self):
        if not isinstance(self.key, str):
            raise TypeError(f"SummaryLeaf.key must be a str, got {self.key!r}.")
        try:
            shape = tuple(int(d) for d in self.shape)
        except TypeError:
            raise TypeError(
                f"SummaryLeaf {self.key}: shape must be a sequence of ints, got {self.shape!r}."
            ) from None
        if any(d < 0 for d in shape):
            raise ValueError(f"SummaryLeaf {self.key}: negative dimension in shape {shape}.")
        dtype = np.dtype(self.dtype)
        if dtype.name not in _FLOAT_DTYPES:
            raise ValueError(
                f"SummaryLeaf {self.key}: dtype must be one of {sorted(_FLOAT_DTYPES)}, "
                f"got {dtype.name}."
            )
        indices = np.asarray(self.indices)
        values = np.asarray(self.values)
        size = _size(shape)
        want = index_dtype(size)
        if indices.ndim != 1 or indices.dtype != want:
            raise ValueError(
                f"SummaryLeaf {self.key}: indices must be a 1-D {want.name} array for a leaf of "
                f"{size} entries, got shape {indices.shape} dtype {indices.dtype.name}."
            )
        if values.shape != indices.shape or values.dtype != dtype:
            raise ValueError(
                f"SummaryLeaf {self.key}: values must be a 1-D {dtype.name} array as long as "
                f"indices ({indices.size}), got shape {values.shape} dtype {values.dtype.name}."
            )
        if indices.size and (
            indices[0] < 0 or indices[-1] >= size or np.any(np.diff(indices) <= 0)
        ):
            raise ValueError(
                f"SummaryLeaf {self.key}: indices must be strictly increasing and within "
                f"[0, {size}) for shape {shape}."
            )
        # Own read-only copies: once checked, the entries cannot be changed in place (an index
        # set to -1 afterwards would otherwise be applied as "the last entry").
        indices, values = np.array(indices), np.array(values)
        indices.flags.writeable = False
        values.flags.writeable = False
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "values", values)

    @property
    def nbytes(self) -> int:
        """Bytes of the indices and values."""
        return int(self.indices.nbytes + self.values.nbytes)

    def digest(self) -> str:
        """SHA-256 over the leaf's key, shape, dtype and index dtype (as JSON) and its indices
        and values bytes; a file whose data or metadata was changed no longer matches it."""
        head = [self.key, list(self.shape), self.dtype.name, self.indices.dtype.name]
        h = hashlib.sha256(json.dumps(head).encode())
        h.update(b"\0")
        h.update(np.ascontiguousarray(self.indices).tobytes())
        h.update(np.ascontiguousarray(self.values).tobytes())
        return h.hexdigest()

    def _digest_v1(self) -> str:
        # format_version 1 files: the digest covered the indices and values bytes only.
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.indices).tobytes())
        h.update(np.ascontiguousarray(self.values).tobytes())
        return h.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class SparseSummary:
    """What selective fine-tuning changed, O(entries selected) in size.

    Attributes:
      leaves: one :class:`SummaryLeaf` per leaf with selected entries, in leaf order.
      budget_used: number of entries selected (the total length of all ``indices``).
      method: the selection method's name, e.g. ``"id3"``.
      version: the optax-selective version that made the summary.

    Example:
      >>> import jax.numpy as jnp, optax_selective as osel
      >>> params = {"w": jnp.array([0.5, -0.1, 2.0])}
      >>> summary = osel.make_summary(params, osel.selective_pafi(budget=1).init(params))
      >>> summary.budget_used, summary.method, [leaf.key for leaf in summary.leaves]
      (1, 'pafi', ["['w']"])
    """

    leaves: tuple[SummaryLeaf, ...]
    budget_used: int
    method: str
    version: str = __version__

    def __post_init__(self):
        leaves = tuple(self.leaves)
        for leaf in leaves:
            if not isinstance(leaf, SummaryLeaf):
                raise TypeError(f"SparseSummary.leaves must hold SummaryLeaf, got {leaf!r}.")
        keys = [leaf.key for leaf in leaves]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"SparseSummary has duplicate leaf keys: {dupes}.")
        total = sum(leaf.indices.size for leaf in leaves)
        if self.budget_used != total:
            raise ValueError(
                f"SparseSummary.budget_used is {self.budget_used} but its leaves hold {total} "
                "entries."
            )
        object.__setattr__(self, "leaves", leaves)
        object.__setattr__(self, "budget_used", int(self.budget_used))

    @property
    def nbytes(self) -> int:
        """Bytes of all indices and values (the in-memory payload)."""
        return sum(leaf.nbytes for leaf in self.leaves)

    def __repr__(self) -> str:
        return (
            f"SparseSummary(method={self.method!r}, budget_used={self.budget_used}, "
            f"leaves={len(self.leaves)}, nbytes={self.nbytes}, version={self.version!r})"
        )


# --------------------------------------------------------------------------------------------
# make / apply


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


def _to_host(x: jax.Array) -> np.ndarray:
    """``x`` (O(budget) entries) as NumPy, also when its shards sit in other processes."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
        not (_in_host_memory(p) and _in_host_memory(m)) and _size(np.shape(p)) < _INT32_LIMIT
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
            idx, vals = (_to_host(x) for x in next(gathered))
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


# --------------------------------------------------------------------------------------------
# save / load with orbax


def _abs_path(path: str | os.PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}.")
    return os.path.abspath(os.fspath(path))


def _array_name(i: int) -> str:
    return f"leaf_{i:04d}"


def save_summary(
    path: str | os.PathLike, summary: SparseSummary, *, overwrite: bool = False
) -> None:
    """Writes ``summary`` to the folder ``path`` with orbax-checkpoint, atomically.

    Leaves with no entries are kept in the JSON metadata only (orbax refuses zero-size
    arrays). Path keys live in the JSON; the arrays get safe names ``leaf_0000``, ...

    The folder is written under a temporary name next to ``path`` (``.NAME.optax-selective-
    tmp-*``), flushed to disk, and then moved to ``path``; an existing summary there is
    swapped out in one atomic step (Linux ``renameat2``) and deleted. So a reader, or a crash
    at any point, sees the old summary or the new one, never a mix or nothing, and of two
    concurrent writers the last to finish wins. With several JAX processes, call it in every
    process (as orbax requires): they write one temporary folder and process 0 moves it.

    Args:
      path: folder to create; it must not exist unless ``overwrite=True``.
      summary: the summary to write.
      overwrite: replace an existing summary folder. Anything else at ``path`` (a file, a
        folder that is not a summary) is never replaced: ``FileExistsError``.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, optax_selective as osel
      >>> params = {"w": jnp.array([0.5, -0.1, 2.0])}
      >>> s = osel.make_summary(params, osel.selective_pafi(budget=1).init(params))
      >>> path = os.path.join(tempfile.mkdtemp(), "summary")
      >>> osel.save_summary(path, s)
      >>> osel.load_summary(path).leaves[0].indices.tolist()
      [1]
    """
    import secrets
    import shutil

    import orbax.checkpoint as ocp

    from optax_selective.atomic import fsync_tree, replace_dir, temp_sibling

    if not isinstance(summary, SparseSummary):
        raise TypeError(f"summary must be a SparseSummary, got {type(summary).__name__}.")
    path = _abs_path(path)
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
        why = _not_replaceable(path)
        if why:
            raise FileExistsError(why)
    meta_leaves, arrays = [], {}
    for i, leaf in enumerate(summary.leaves):
        name = _array_name(i) if leaf.indices.size else None
        if name is not None:
            arrays[name] = {"indices": leaf.indices, "values": leaf.values}
        meta_leaves.append(
            {
                "key": leaf.key,
                "shape": list(leaf.shape),
                "dtype": leaf.dtype.name,
                "index_dtype": leaf.indices.dtype.name,
                "count": int(leaf.indices.size),
                "array": name,
                "sha256": leaf.digest(),
            }
        )
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": summary.method,
        "version": summary.version,
        "budget_used": summary.budget_used,
        "leaves": meta_leaves,
    }
    items = {"metadata": ocp.args.JsonSave(meta)}
    if arrays:
        items["arrays"] = ocp.args.PyTreeSave(arrays)
    if jax.process_count() == 1:
        tmp = temp_sibling(path)
        try:
            with _checkpointer() as ckptr:
                ckptr.save(tmp, ocp.args.Composite(**items))
            fsync_tree(tmp)
            replace_dir(tmp, path, overwrite=overwrite, is_replaceable=_not_replaceable)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return
    # Several JAX processes: orbax's save is collective, so every process writes into one
    # temporary folder (a name process 0 draws), then process 0 alone moves it into place.
    from jax.experimental import multihost_utils

    token = multihost_utils.broadcast_one_to_all(np.asarray(secrets.randbits(31), np.int32))
    tmp = temp_sibling(path, token=f"jax-{int(token):08x}")
    try:
        with _checkpointer() as ckptr:
            ckptr.save(tmp, ocp.args.Composite(**items))
        if jax.process_index() == 0:
            fsync_tree(tmp)
            replace_dir(tmp, path, overwrite=overwrite, is_replaceable=_not_replaceable)
    finally:
        if jax.process_index() == 0 and os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        multihost_utils.sync_global_devices(f"optax_selective.save_summary {tmp}")


def _not_replaceable(path: str) -> str | None:
    """Why ``save_summary(overwrite=True)`` must not replace what is at ``path`` (None: it is
    a summary folder). Never lists what the folder holds."""
    refuse = (f"{path} exists and is not an optax_selective summary folder; overwrite=True "
              "only replaces summaries. Remove it yourself or choose another path.")
    if os.path.islink(path) or not os.path.isdir(path):
        return refuse
    try:
        meta = _read_json(path)
    except SummaryFormatError:
        return refuse
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        return refuse
    return None


def _checkpointer():
    import orbax.checkpoint as ocp

    # Plain zarr arrays (no OCDBT): OCDBT keeps a second copy of the data per process, which
    # would double a summary's bytes on disk.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    arrays = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
    registry.add("arrays", ocp.args.PyTreeSave, arrays)
    registry.add("arrays", ocp.args.PyTreeRestore, arrays)
    meta = ocp.JsonCheckpointHandler()
    registry.add("metadata", ocp.args.JsonSave, meta)
    registry.add("metadata", ocp.args.JsonRestore, meta)
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def _bad(path: str, why: str) -> SummaryFormatError:
    return SummaryFormatError(f"{path} is not a valid optax_selective summary: {why}")


def _short(e: Exception, limit: int = 200) -> str:
    # First line only: orbax and tensorstore messages can quote paths and file listings.
    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _inside(root: str, p: str) -> bool:
    real = os.path.realpath(p)
    return real == root or real.startswith(root + os.sep)


def _regular_file(path: str, rel: str, limit: int) -> bytes:
    """The bytes of ``path/rel``: a regular file inside the folder, at most ``limit`` bytes."""
    f = os.path.join(path, rel)
    if not os.path.lexists(f):
        raise FileNotFoundError(rel)
    if not _inside(os.path.realpath(path), f) or not os.path.isfile(f):
        raise _bad(path, f"{rel} is not a regular file inside the summary folder")
    size = os.path.getsize(f)
    if size > limit:
        raise _bad(path, f"{rel} has {size} bytes (at most {limit} expected)")
    with open(f, "rb") as fh:
        return fh.read(limit + 1)


def _read_json(path: str) -> Any:
    try:
        raw = _regular_file(path, os.path.join("metadata", "metadata"), _MAX_JSON_BYTES)
    except FileNotFoundError:
        raise _bad(path, "could not read its metadata (no metadata/metadata file)") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(path, f"its metadata is not valid JSON ({e})") from None


def _check_meta(path: str, meta: Any) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _bad(path, f"its metadata does not say format {FORMAT_NAME!r}")
    if meta.get("format_version") not in _READABLE_VERSIONS:
        raise _bad(
            path,
            f"format_version {meta.get('format_version')!r} is not supported (this library "
            f"reads versions {list(_READABLE_VERSIONS)}); upgrade optax-selective.",
        )
    fields = {"method": str, "version": str, "budget_used": int, "leaves": list}
    for name, typ in fields.items():
        if not isinstance(meta.get(name), typ):
            raise _bad(path, f"metadata field {name!r} is missing or not a {typ.__name__}")
    leaf_fields = {
        "key": str,
        "shape": list,
        "dtype": str,
        "index_dtype": str,
        "count": int,
        "sha256": str,
    }
    names = set()
    for j, leaf in enumerate(meta["leaves"]):
        if not isinstance(leaf, dict):
            raise _bad(path, f"metadata leaf {j} is not an object")
        for name, typ in leaf_fields.items():
            if not isinstance(leaf.get(name), typ):
                raise _bad(
                    path, f"metadata leaf {j} field {name!r} is missing or not a {typ.__name__}"
                )
        if leaf["dtype"] not in _FLOAT_DTYPES or leaf["index_dtype"] not in _INDEX_DTYPES:
            raise _bad(
                path,
                f"leaf {leaf['key']}: unsupported dtype {leaf['dtype']!r} or index "
                f"dtype {leaf['index_dtype']!r}",
            )
        shape = leaf["shape"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _bad(path, f"leaf {leaf['key']}: shape {shape!r} is not a list of ints >= 0")
        if not 0 <= leaf["count"] <= _size(shape):
            raise _bad(path, f"leaf {leaf['key']}: count {leaf['count']} does not fit shape "
                             f"{shape}")
        if leaf["count"] > 0:
            name = leaf.get("array")
            if not (isinstance(name, str) and len(name) <= 32 and name.startswith("leaf_")
                    and name[5:].isdigit()) or name in names:
                raise _bad(path, f"leaf {leaf['key']}: has {leaf['count']} entries but no "
                                 "valid array name of its own")
            names.add(name)
    return meta


def _check_stored_array(path: str, rel: str, count: int, dtype: str) -> None:
    """Checks the zarr metadata of one stored array against the (digest-covered) JSON before
    orbax reads it, so a forged file cannot make the reader allocate more than the JSON
    declares (``count`` entries, itself at most the leaf's size)."""
    try:
        raw = _regular_file(path, os.path.join(rel, ".zarray"), _MAX_ZARRAY_BYTES)
        zarray = json.loads(raw)
    except FileNotFoundError:
        raise _bad(path, f"could not read its arrays ({rel} has no .zarray)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad(path, f"could not read its arrays ({rel}/.zarray is not JSON)") from None
    if not isinstance(zarray, dict):
        raise _bad(path, f"could not read its arrays ({rel}/.zarray is not an object)")
    shape, chunks = zarray.get("shape"), zarray.get("chunks")
    if shape != [count]:
        raise _bad(path, f"leaf array {rel}: expected {count} entries, its stored array has "
                         f"shape {str(shape)[:40]}")
    if not (isinstance(chunks, list) and len(chunks) == 1 and isinstance(chunks[0], int)
            and 0 < chunks[0] <= max(count, 1) and -(-count // chunks[0]) <= _MAX_CHUNKS):
        raise _bad(path, f"leaf array {rel}: stored in chunks {str(chunks)[:40]}, expected at "
                         f"most {_MAX_CHUNKS} chunks of its {count} entries")
    if zarray.get("dtype") != _ZARR_DTYPES[dtype]:
        raise _bad(path, f"leaf array {rel}: stored dtype {str(zarray.get('dtype'))[:20]!r}, "
                         f"the metadata says {dtype}")
    for c in range(-(-count // chunks[0])):
        chunk = os.path.join(path, rel, str(c))
        if os.path.lexists(chunk) and (
                not _inside(os.path.realpath(path), chunk) or not os.path.isfile(chunk)):
            raise _bad(path, f"{rel}/{c} is not a regular file inside the summary folder")


def _check_links(path: str, limit: int) -> None:
    """Refuses symbolic links that leave the folder; walks at most ``limit`` entries."""
    root, seen = os.path.realpath(path), 0
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            seen += 1
            if seen > limit:
                raise _bad(path, f"it holds more than {limit} files")
            p = os.path.join(folder, name)
            if os.path.islink(p) and not _inside(root, p):
                rel = os.path.relpath(p, path)
                raise _bad(path, f"{rel} is a symbolic link out of the summary folder")


def load_summary(path: str | os.PathLike) -> SparseSummary:
    """Reads a summary written by :func:`save_summary`, onto the host (NumPy arrays).

    Only JSON and array data are read; no code from the folder runs. Works whatever device
    saved the summary. Before any array is read, the JSON metadata is checked and every stored
    array's shape, chunking, dtype and size on disk is compared with it, so a forged folder
    is refused in milliseconds with bounded memory. Then every leaf's SHA-256 (over its key,
    shape, dtype, indices and values), index range and order are checked. Symbolic links out
    of the folder are refused. The returned arrays are read-only.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      SummaryFormatError: (a ``ValueError``) if the folder is corrupt, truncated, forged or not
        a summary, naming the path and what is wrong (never listing what the folder holds).

    Example: see :func:`save_summary`.
    """
    path = _abs_path(path)
    for attempt in range(3):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no summary folder at {path}")
        before = _identity(path)
        try:
            return _load_once(path)
        except SummaryFormatError:
            # A concurrent save_summary swapped a new folder in while this one was read: read
            # the new one (the digests caught the mix).
            if attempt == 2 or _identity(path) == before:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _load_once(path: str) -> SparseSummary:
    import orbax.checkpoint as ocp

    meta = _check_meta(path, _read_json(path))
    _check_links(path, 1024 + 16 * len(meta["leaves"]))
    expected = {}
    for m in meta["leaves"]:
        if m["count"] > 0:
            name = m["array"]
            if not os.path.isdir(os.path.join(path, "arrays", f"{name}.values")):
                raise _bad(path, f"array {name!r} is missing from its arrays folder")
            _check_stored_array(path, os.path.join("arrays", f"{name}.indices"), m["count"],
                                m["index_dtype"])
            _check_stored_array(path, os.path.join("arrays", f"{name}.values"), m["count"],
                                m["dtype"])
            expected[name] = {
                "indices": ocp.RestoreArgs(restore_type=np.ndarray),
                "values": ocp.RestoreArgs(restore_type=np.ndarray),
            }
    arrays: dict = {}
    if expected:
        try:
            for rel in ("_METADATA", "_CHECKPOINT_METADATA"):
                for where in (os.path.join("arrays", rel), rel):
                    if os.path.lexists(os.path.join(path, where)):
                        _regular_file(path, where, _MAX_JSON_BYTES)
        except FileNotFoundError:  # pragma: no cover - checked with lexists above
            pass
        with _checkpointer() as ckptr:
            try:
                arrays = ckptr.restore(
                    path,
                    ocp.args.Composite(
                        arrays=ocp.args.PyTreeRestore(item=expected, restore_args=expected)
                    ),
                )["arrays"]
            except Exception as e:
                raise _bad(path, f"could not read its arrays ({_short(e)})") from e
    leaves = []
    for m in meta["leaves"]:
        dtype, idx_dtype = _FLOAT_DTYPES[m["dtype"]], _INDEX_DTYPES[m["index_dtype"]]
        if m["count"] > 0:
            try:
                got = arrays[m["array"]]
                idx, vals = np.asarray(got["indices"]), np.asarray(got["values"])
            except (KeyError, TypeError) as e:
                raise _bad(path, f"leaf {m['key']}: array {m['array']!r} is missing") from e
        else:
            idx, vals = np.zeros([0], idx_dtype), np.zeros([0], dtype)
        if idx.shape != (m["count"],) or vals.shape != (m["count"],):
            raise _bad(
                path,
                f"leaf {m['key']}: expected {m['count']} entries, found "
                f"{idx.shape} indices and {vals.shape} values",
            )
        if idx.dtype != idx_dtype or vals.dtype != dtype:
            raise _bad(
                path,
                f"leaf {m['key']}: stored dtypes {idx.dtype.name}/{vals.dtype.name} "
                f"differ from the metadata's {idx_dtype.name}/{dtype.name}",
            )
        try:
            leaf = SummaryLeaf(m["key"], tuple(m["shape"]), dtype, idx, vals)
        except (TypeError, ValueError) as e:
            raise _bad(path, str(e)) from e
        digest = leaf.digest() if meta["format_version"] >= 2 else leaf._digest_v1()
        if digest != m["sha256"]:
            raise _bad(
                path,
                f"leaf {m['key']}: its data or metadata does not match the recorded SHA-256 "
                "(the files were changed or truncated)",
            )
        leaves.append(leaf)
    try:
        return SparseSummary(tuple(leaves), meta["budget_used"], meta["method"], meta["version"])
    except (TypeError, ValueError) as e:
        raise _bad(path, str(e)) from e
