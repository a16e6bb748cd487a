"""The summary's data types: :class:`SparseSummary`, :class:`SummaryLeaf` and their checks.

A :class:`SparseSummary` holds, for each parameter leaf with selected entries, the leaf's
tree path key (``jax.tree_util.keystr``), shape and dtype, the flat row-major indices of the
selected entries and their values; plus the number of entries selected, the method name and
the library version (DESIGN.md section 5). Building one checks every field, so a summary in
memory is always well formed, whether made, built by hand or loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from optax_selective._version import __version__

_INT32_LIMIT = 2**31

# Leaf dtypes a summary may hold, by the name written to disk. Names are looked up here and
# nowhere else, so a file can never make the loader resolve an arbitrary attribute.
FLOAT_DTYPES: dict[str, np.dtype] = {
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
INDEX_DTYPES = {"int32": np.dtype(np.int32), "int64": np.dtype(np.int64)}


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
    """Index dtype for a leaf of ``size`` entries: int32, or int64 from 2**31 entries up.

    Example:
      >>> from optax_selective.summary import index_dtype
      >>> index_dtype(10).name, index_dtype(2**31).name
      ('int32', 'int64')
    """
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
        if dtype.name not in FLOAT_DTYPES:
            raise ValueError(
                f"SummaryLeaf {self.key}: dtype must be one of {sorted(FLOAT_DTYPES)}, "
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
