"""Sparse summaries: the selected entries of a fine-tuned model, O(budget) in size.

Four parts, one job each: :mod:`~optax_selective.summary.types` (the data types and their
checks), :mod:`~optax_selective.summary.make` (make / apply), :mod:`~optax_selective.summary.io`
(orbax save / load) and ``_format`` (the on-disk format and the checks a folder passes before
it is read). Every public name is importable from here.

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

from optax_selective.summary._format import FORMAT_NAME, FORMAT_VERSION
from optax_selective.summary.io import load_summary, save_summary
from optax_selective.summary.make import apply_summary, make_summary
from optax_selective.summary.types import (
    SparseSummary,
    SummaryFormatError,
    SummaryLeaf,
    index_dtype,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SparseSummary",
    "SummaryLeaf",
    "SummaryFormatError",
    "index_dtype",
    "make_summary",
    "apply_summary",
    "save_summary",
    "load_summary",
]
