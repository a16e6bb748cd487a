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
from optax_selective.inspect import find_selective_state

FORMAT_NAME = "optax_selective.SparseSummary"
FORMAT_VERSION = 1
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
    """A summary folder is missing, corrupt, truncated or not a summary at all."""


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
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "values", values)

    @property
    def nbytes(self) -> int:
        """Bytes of the indices and values."""
        return int(self.indices.nbytes + self.values.nbytes)

    def digest(self) -> str:
        """SHA-256 of the indices and values bytes, used to detect corrupt files."""
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
    return SparseSummary(
        leaves=tuple(leaves),
        budget_used=sum(leaf.indices.size for leaf in leaves),
        method=method,
        version=__version__,
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
    """Writes ``summary`` to the folder ``path`` with orbax-checkpoint.

    Leaves with no entries are kept in the JSON metadata only (orbax refuses zero-size
    arrays). Path keys live in the JSON; the arrays get safe names ``leaf_0000``, ...

    Args:
      path: folder to create; it must not exist unless ``overwrite=True``.
      summary: the summary to write.
      overwrite: replace an existing folder.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, optax_selective as osel
      >>> params = {"w": jnp.array([0.5, -0.1, 2.0])}
      >>> s = osel.make_summary(params, osel.selective_pafi(budget=1).init(params))
      >>> path = os.path.join(tempfile.mkdtemp(), "summary")
      >>> osel.save_summary(path, s)
      >>> osel.load_summary(path).leaves[0].indices.tolist()
      [1]
    """
    import orbax.checkpoint as ocp

    if not isinstance(summary, SparseSummary):
        raise TypeError(f"summary must be a SparseSummary, got {type(summary).__name__}.")
    path = _abs_path(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
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
    with _checkpointer() as ckptr:
        ckptr.save(path, ocp.args.Composite(**items), force=overwrite)


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


def _short(e: Exception, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _check_meta(path: str, meta: Any) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _bad(path, f"its metadata does not say format {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _bad(
            path,
            f"format_version {meta.get('format_version')!r} is not supported (this library "
            f"reads version {FORMAT_VERSION}); upgrade optax-selective.",
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
        if leaf["count"] > 0 and not (
            isinstance(leaf.get("array"), str) and leaf["array"].startswith("leaf_")
        ):
            raise _bad(path, f"leaf {leaf['key']}: has {leaf['count']} entries but no array name")
    return meta


def load_summary(path: str | os.PathLike) -> SparseSummary:
    """Reads a summary written by :func:`save_summary`, onto the host (NumPy arrays).

    Only JSON and array data are read; no code from the folder runs. Works whatever device
    saved the summary. Every leaf's digest, shape, dtype and index range is checked.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      SummaryFormatError: (a ``ValueError``) if the folder is corrupt, truncated or not a
        summary, naming the path and what is wrong.

    Example: see :func:`save_summary`.
    """
    import orbax.checkpoint as ocp

    path = _abs_path(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no summary folder at {path}")
    with _checkpointer() as ckptr:
        try:
            meta = ckptr.restore(path, ocp.args.Composite(metadata=ocp.args.JsonRestore()))
            meta = meta["metadata"]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad(path, f"its metadata is not valid JSON ({e})") from e
        except Exception as e:  # orbax raises many types for missing or broken files
            raise _bad(path, f"could not read its metadata ({_short(e)})") from e
        meta = _check_meta(path, meta)
        expected = {
            m["array"]: {
                "indices": ocp.RestoreArgs(restore_type=np.ndarray),
                "values": ocp.RestoreArgs(restore_type=np.ndarray),
            }
            for m in meta["leaves"]
            if m["count"] > 0
        }
        arrays: dict = {}
        for name in expected:  # clearer than orbax's error for a folder with arrays missing
            if not os.path.isdir(os.path.join(path, "arrays", f"{name}.values")):
                raise _bad(path, f"array {name!r} is missing from {os.path.join(path, 'arrays')}")
        if expected:
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
        if leaf.digest() != m["sha256"]:
            raise _bad(
                path,
                f"leaf {m['key']}: its data does not match the recorded SHA-256 "
                "(the files were changed or truncated)",
            )
        leaves.append(leaf)
    try:
        return SparseSummary(tuple(leaves), meta["budget_used"], meta["method"], meta["version"])
    except (TypeError, ValueError) as e:
        raise _bad(path, str(e)) from e
