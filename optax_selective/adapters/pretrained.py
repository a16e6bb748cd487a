"""JAX adapter folders and merging: :func:`save_pretrained`, :func:`load_pretrained`,
:func:`read_pretrained`, :func:`merge_summaries` and :func:`merge_folders`.

A folder holds the summary as written by :func:`optax_selective.save_summary` (``summary/``),
optionally the base model's values at the same entries (``base/``, the same format), and
``adapter_config.json`` (:mod:`optax_selective.adapters.core`). Reading goes through
:func:`optax_selective.load_summary`, so every check of that reader applies; then the
summary is compared with the config (parameters, digests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from optax_selective._tree import unwrap_nnx
from optax_selective.adapters import core
from optax_selective.adapters.core import Pretrained
from optax_selective.summary.io import load_summary, save_summary
from optax_selective.summary.types import SparseSummary, SummaryLeaf, index_dtype


def _keyed(params: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): x
            for p, x in jax.tree_util.tree_leaves_with_path(unwrap_nnx(params))}


def model_signature(params: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{path key: (shape, dtype name)}`` of a params pytree (or ``flax.nnx`` state).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective.adapters import pretrained
      >>> pretrained.model_signature({"w": jnp.zeros((2, 3))})
      {"['w']": ((2, 3), 'float32')}
    """
    return {k: (tuple(np.shape(x)), np.dtype(x.dtype).name) for k, x in _keyed(params).items()}


def to_entries(summary: SparseSummary, base: SparseSummary | None = None) -> list[core.ParamEntries]:
    """The summary as framework-neutral entries (with ``base``'s values when given)."""
    if not isinstance(summary, SparseSummary):
        raise TypeError(f"summary must be a SparseSummary, got {type(summary).__name__}.")
    bases = {}
    if base is not None:
        bases = {leaf.key: leaf for leaf in base.leaves}
    out = []
    for leaf in summary.leaves:
        b = None
        if base is not None:
            bl = bases.get(leaf.key)
            if bl is None or not np.array_equal(bl.indices, leaf.indices):
                raise core.AdapterError(f"base values for {leaf.key} do not cover the summary's "
                                        "entries.")
            b = bl.values
        out.append(core.ParamEntries(leaf.key, leaf.shape, leaf.dtype.name, leaf.indices,
                                     leaf.values, b))
    return out


def from_entries(entries: Sequence[core.ParamEntries], *, method: str,
                 base: bool = False) -> SparseSummary:
    """A :class:`~optax_selective.SparseSummary` of the entries' values (or base values)."""
    leaves = []
    for e in entries:
        vals = e.base if base else e.values
        idx = e.indices.astype(index_dtype(int(np.prod(e.shape, dtype=np.int64))))
        leaves.append(SummaryLeaf(e.name, e.shape, np.dtype(vals.dtype), idx, vals))
    return SparseSummary(tuple(leaves), sum(e.count for e in entries), method)


def gather_base(params: Any, summary: SparseSummary) -> SparseSummary:
    """The values of ``params`` at the summary's entries, as a summary (method ``"base"``).

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax_selective as osel
      >>> from optax_selective.adapters import pretrained
      >>> leaf = osel.SummaryLeaf("['w']", (3,), np.float32, np.array([2], np.int32),
      ...                         np.array([9.0], np.float32))
      >>> s = osel.SparseSummary((leaf,), 1, "pafi")
      >>> pretrained.gather_base({"w": jnp.array([1.0, 2.0, 3.0])}, s).leaves[0].values.tolist()
      [3.0]
    """
    entries = to_entries(summary)
    core.check_fits(entries, model_signature(params), where="summary")
    keyed = _keyed(params)
    leaves = []
    for leaf in summary.leaves:
        x = keyed[leaf.key]
        if isinstance(x, np.ndarray):
            vals = x.reshape(-1)[leaf.indices]
        else:
            vals = np.asarray(jax.numpy.ravel(x)[jax.numpy.asarray(leaf.indices)])
        leaves.append(SummaryLeaf(leaf.key, leaf.shape, leaf.dtype, leaf.indices,
                                  np.asarray(vals, leaf.dtype)))
    return SparseSummary(tuple(leaves), summary.budget_used, "base", summary.version)


def save_pretrained(
    summary: SparseSummary,
    folder: str | os.PathLike,
    *,
    base_model: Any = None,
    base: Any = None,
    hyperparameters: Mapping[str, Any] | None = None,
    budget: int | None = None,
    naming: str | None = None,
    overwrite: bool = False,
) -> str:
    """Writes ``summary`` as an adapter folder, atomically; returns the folder's path.

    The folder holds ``summary/`` (:func:`~optax_selective.save_summary`'s format),
    ``adapter_config.json`` (library version, method, ``hyperparameters``, ``budget`` and
    entries used, ``base_model``, each parameter's name, shape, dtype and entries, the
    summary's digest) and, with ``base``, ``base/``: the base model's values at the same
    entries, which :func:`merge_summaries` needs to take deltas.

    Args:
      summary: from :func:`~optax_selective.make_summary` or a load.
      folder: the folder to create (must not exist unless ``overwrite=True``, which
        replaces adapter folders only).
      base_model: an identifier, ``"org/name"`` or ``"org/name@revision"``, or a dict with
        ``id`` and ``revision``; recorded in the config.
      base: the base (pretrained) params, or a summary of their values at the same entries.
      hyperparameters: the method's hyperparameters, recorded as given (JSON values).
      budget: the budget the method was given (``budget_used`` is recorded anyway).
      naming: the naming scheme recorded (default ``"jax-keystr"``), e.g. the name mapping a
        summary moved from torch went through.
      overwrite: replace an existing adapter folder.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, optax_selective as osel
      >>> base = {"w": jnp.array([0.5, -0.1, 2.0])}
      >>> tuned = {"w": jnp.array([0.5, 0.7, 2.0])}
      >>> s = osel.make_summary(tuned, osel.selective_pafi(budget=1).init(base))
      >>> folder = os.path.join(tempfile.mkdtemp(), "adapter")
      >>> _ = osel.save_pretrained(s, folder, base_model="me/tiny@v1", base=base,
      ...                          hyperparameters={"budget": 1})
      >>> osel.load_pretrained(folder).leaves[0].values.tolist()
      [0.699999988079071]
    """
    if not isinstance(summary, SparseSummary):
        raise TypeError(f"summary must be a SparseSummary, got {type(summary).__name__}.")
    if jax.process_count() > 1:
        raise NotImplementedError("save_pretrained runs in one JAX process; call it in process 0 "
                                  "with the summary (make_summary gathers it to every host).")
    base_summary = None
    if base is not None:
        base_summary = base if isinstance(base, SparseSummary) else gather_base(base, summary)
    entries = to_entries(summary, base_summary)
    cfg = core.build_config(
        framework="jax", entries=entries, method=summary.method,
        budget_used=summary.budget_used, summary_version=summary.version,
        base_model=base_model, hyperparameters=hyperparameters, budget=budget,
        base_fingerprint=getattr(summary, "base_fingerprint", None), naming=naming)

    def payload(tmp: str) -> None:
        save_summary(os.path.join(tmp, cfg["summary_file"]), summary)
        if base_summary is not None:
            save_summary(os.path.join(tmp, cfg["base_file"]), base_summary)

    return core.write_folder(folder, cfg, payload, overwrite=overwrite)


def read_pretrained(folder: str | os.PathLike, params: Any = None) -> Pretrained:
    """Reads an adapter folder (summary, base values, config) and checks each against the
    others; with ``params``, also checks the summary fits them.

    Raises:
      FileNotFoundError: no folder at ``folder``.
      AdapterError: the config is malformed or does not match the summary (a tampered
        folder), or the folder is a torch adapter (use ``torch_bridge.load_pretrained``).
      SummaryFormatError: the summary files themselves are invalid.
      ValueError: the summary does not fit ``params``, naming the first differing parameter.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, optax_selective as osel
      >>> params = {"w": jnp.array([0.5, -0.1, 2.0])}
      >>> s = osel.make_summary(params, osel.selective_pafi(budget=1).init(params))
      >>> folder = osel.save_pretrained(s, os.path.join(tempfile.mkdtemp(), "a"), base=params)
      >>> p = osel.read_pretrained(folder, params)
      >>> p.config["method"], p.base.leaves[0].values.tolist()
      ('pafi', [-0.10000000149011612])
    """
    path = os.path.abspath(os.fspath(folder))
    cfg = core.read_config(path)
    if cfg["framework"] != "jax":
        raise core.AdapterError(
            f"{path} holds a {cfg['framework']} adapter; load it with torch_bridge.load_pretrained "
            "(or convert it with torch_bridge.adapters.to_jax).")
    summary = load_summary(os.path.join(path, cfg["summary_file"]))
    base = None
    if cfg["base_file"] is not None:
        base = load_summary(os.path.join(path, cfg["base_file"]))
    try:
        entries = to_entries(summary, base)
    except core.AdapterError as e:
        raise core.AdapterError(f"{path} is not a valid adapter folder: {e}") from None
    core.check_entries_match_config(path, cfg, entries)
    if summary.method != cfg["method"] or summary.budget_used != cfg["budget_used"]:
        raise core.AdapterError(f"{path} is not a valid adapter folder: its summary's method or "
                                "budget_used differs from the config")
    if params is not None:
        core.check_fits(entries, model_signature(params), where=f"{path}:")
    return Pretrained(summary, base, cfg)


def load_pretrained(folder: str | os.PathLike, params: Any = None) -> SparseSummary:
    """The summary of an adapter folder written by :func:`save_pretrained`, checked against
    its config (and against ``params`` when given); see :func:`read_pretrained`.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, optax_selective as osel
      >>> params = {"w": jnp.array([0.5, -0.1, 2.0])}
      >>> s = osel.make_summary(params, osel.selective_pafi(budget=1).init(params))
      >>> folder = osel.save_pretrained(s, os.path.join(tempfile.mkdtemp(), "a"))
      >>> try:
      ...     osel.load_pretrained(folder, {"w": jnp.zeros(4)})
      ... except ValueError as e:
      ...     print(str(e).replace(folder, "<folder>"))
      <folder>: parameter "['w']": shape (3,), the model's (4,).
    """
    return read_pretrained(folder, params).summary


def _with_base(item: Any, base: Any, i: int) -> list[core.ParamEntries]:
    if isinstance(item, (str, os.PathLike)):
        p = read_pretrained(item)
        s, b = p.summary, p.base
    elif isinstance(item, Pretrained):
        s, b = item.summary, item.base
    elif isinstance(item, SparseSummary):
        s, b = item, None
    else:
        raise TypeError(f"summaries[{i}] must be a SparseSummary, a Pretrained or a folder, got "
                        f"{type(item).__name__}.")
    if base is not None:
        from_params = gather_base(base, s)
        if b is not None:
            for x, y in zip(to_entries(s, b), to_entries(s, from_params)):
                if x.base.view(np.uint8).tobytes() != y.base.view(np.uint8).tobytes():
                    raise core.AdapterError(
                        f"summaries[{i}]: the base values it recorded for {x.name} differ from "
                        "base=; it was fine-tuned from another base model.")
        b = from_params
    if b is None:
        raise core.AdapterError(
            f"summaries[{i}] has no base values: pass base=params, or save it with "
            "save_pretrained(..., base=params).")
    return to_entries(s, b)


def merge_pretrained(summaries: Sequence[Any], weights: Sequence[float] | None = None, *,
                     rule: str = "sum", budget: int | None = None,
                     base: Any = None) -> Pretrained:
    """:func:`merge_summaries`, returning the merged summary with its base values."""
    core.check_rule(rule)
    summaries = [read_pretrained(s) if isinstance(s, (str, os.PathLike)) else s
                 for s in summaries]
    core.check_same_base([s.config if isinstance(s, Pretrained) else None for s in summaries])
    entries = [_with_base(s, base, i) for i, s in enumerate(summaries)]
    merged = core.merge_entries(entries, weights, rule=rule, budget=budget)
    method = f"merge-{rule}"
    summary = from_entries(merged, method=method)
    return Pretrained(summary, from_entries(merged, method="base", base=True), {})


def merge_summaries(summaries: Sequence[Any], weights: Sequence[float] | None = None, *,
                    rule: str = "sum", budget: int | None = None,
                    base: Any = None) -> SparseSummary:
    """Merges summaries fine-tuned from one base model (see
    :func:`optax_selective.adapters.core.merge_entries` for the rules).

    Deltas are taken against the base values: pass ``base`` (the base params), or pass
    adapter folders (or :class:`Pretrained`) saved with their base values; where both are
    given, and wherever two summaries share an entry, the base values must agree bit for bit.

    Args:
      summaries: summaries, :class:`Pretrained` or adapter folder paths.
      weights: one float per summary (default 1 each), scaling its deltas.
      rule: ``"sum"`` (task arithmetic), ``"mean"`` or ``"ties"`` (sign consensus).
      budget: keep only the entries with the largest merged deltas, at most this many.
      base: the base params.

    Returns:
      A summary of ``base + merged delta`` at the union of the inputs' entries, method
      ``"merge-<rule>"``.

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax_selective as osel
      >>> base = {"w": jnp.zeros(4)}
      >>> def one(i, v):
      ...     leaf = osel.SummaryLeaf("['w']", (4,), np.float32, np.array(i, np.int32),
      ...                             np.array(v, np.float32))
      ...     return osel.SparseSummary((leaf,), len(i), "pafi")
      >>> a, b = one([0, 1], [1.0, 2.0]), one([1, 2], [4.0, -1.0])
      >>> m = osel.merge_summaries([a, b], rule="mean", base=base)
      >>> m.leaves[0].indices.tolist(), m.leaves[0].values.tolist()
      ([0, 1, 2], [1.0, 3.0, -1.0])
    """
    return merge_pretrained(summaries, weights, rule=rule, budget=budget, base=base).summary


def merge_folders(out: str | os.PathLike, inputs: Sequence[str | os.PathLike],
                  weights: Sequence[float] | None = None, *, rule: str = "sum",
                  budget: int | None = None, overwrite: bool = False) -> str:
    """Merges adapter folders saved with their base values into the folder ``out``.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, optax_selective as osel
      >>> from optax_selective.adapters import merge_folders
      >>> root, base = tempfile.mkdtemp(), {"w": jnp.array([4.0, 0.0, 2.0])}
      >>> tuned = {"w": jnp.array([4.0, 1.0, 2.0])}
      >>> s = osel.make_summary(tuned, osel.selective_pafi(budget=1).init(base))
      >>> a = osel.save_pretrained(s, os.path.join(root, "a"), base=base)
      >>> m = merge_folders(os.path.join(root, "m"), [a, a], rule="sum")
      >>> osel.load_pretrained(m).leaves[0].values.tolist()
      [2.0]
    """
    inputs = list(inputs)
    read = [read_pretrained(p) for p in inputs]
    merged = merge_pretrained(read, weights, rule=rule, budget=budget)
    hyper = {"rule": rule, "weights": None if weights is None else [float(w) for w in weights],
             "budget": budget, "inputs": [os.path.basename(os.fspath(p)) for p in inputs]}
    return save_pretrained(merged.summary, out, base=merged.base, hyperparameters=hyper,
                           budget=budget, overwrite=overwrite,
                           base_model=next((p.config["base_model"] for p in read
                                            if p.config.get("base_model")), None))
