"""The framework-neutral part of summaries as adapters, shared by JAX and torch.

Both ``optax_selective.adapters`` (orbax summaries) and ``torch_bridge.adapters``
(safetensors summaries) turn their summary into a list of :class:`ParamEntries` (NumPy
arrays, one per parameter) and use this module for everything that does not depend on the
framework: the adapter folder's JSON config (schema, writing, bounded reading, checks), the
summary digest the config records, the checks against a model's parameters, the overlap
check between attached summaries, and the merge rules.

Example:
  >>> import numpy as np
  >>> from optax_selective.adapters import core
  >>> a = core.ParamEntries("w", (4,), "float32", np.array([0, 2]),
  ...                       np.array([1.0, 3.0], np.float32), np.zeros(2, np.float32))
  >>> b = core.ParamEntries("w", (4,), "float32", np.array([2, 3]),
  ...                       np.array([-1.0, 2.0], np.float32), np.zeros(2, np.float32))
  >>> [m.values.tolist() for m in core.merge_entries([[a], [b]], rule="sum")]
  [[1.0, 2.0, 2.0]]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from optax_selective._version import __version__
from optax_selective.summary.atomic import fsync_tree, replace_dir, temp_sibling
from optax_selective.summary.types import FLOAT_DTYPES

ADAPTER_FORMAT = "optax_selective.adapter"
ADAPTER_FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 16 * 2**20
RULES = ("sum", "mean", "ties")
FRAMEWORKS = {
    "jax": {"summary_file": "summary", "base_file": "base", "naming": "jax-keystr"},
    "torch": {"summary_file": "summary.safetensors", "base_file": "base.safetensors",
              "naming": "torch-named-parameters"},
}


class AdapterError(ValueError):
    """An adapter folder, summary or attach request that cannot be used; the message names
    the folder or parameter and what is wrong.

    Example:
      >>> from optax_selective.adapters import core
      >>> try:
      ...     core.check_rule("max")
      ... except core.AdapterError as e:
      ...     print(e)
      rule must be one of ['sum', 'mean', 'ties'], got 'max'.
    """


@dataclasses.dataclass(frozen=True, eq=False)
class ParamEntries:
    """The entries of one parameter a summary touches, as NumPy arrays.

    Attributes:
      name: the parameter's name in the summary's framework (a JAX path key, a torch name).
      shape: the whole parameter's shape.
      dtype: its dtype name (``"float32"``, ``"bfloat16"``, ...).
      indices: 1-D int64 flat row-major indices, strictly increasing.
      values: the summary's values there (NumPy, ``ml_dtypes`` for bfloat16 / float8).
      base: the base model's values there, or None when the folder did not record them.

    Example:
      >>> import numpy as np
      >>> from optax_selective.adapters import core
      >>> e = core.ParamEntries("w", (3,), "float32", np.array([1]), np.array([2.0], np.float32))
      >>> e.count
      1
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    indices: np.ndarray
    values: np.ndarray
    base: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "indices", np.asarray(self.indices, np.int64))
        if self.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{self.name}: dtype {self.dtype!r} is not one of "
                               f"{sorted(FLOAT_DTYPES)}.")
        want = FLOAT_DTYPES[self.dtype]
        for what in ("values", "base"):
            arr = getattr(self, what)
            if arr is None:
                continue
            arr = np.asarray(arr)
            if arr.dtype != want or arr.shape != self.indices.shape:
                raise AdapterError(
                    f"{self.name}: {what} must be a 1-D {self.dtype} array of "
                    f"{self.indices.size} entries, got {arr.dtype.name} {arr.shape}.")
            object.__setattr__(self, what, arr)

    @property
    def count(self) -> int:
        """Number of entries."""
        return int(self.indices.size)


class Pretrained(NamedTuple):
    """An adapter folder as read by ``read_pretrained`` (either framework).

    Attributes:
      summary: the summary (a JAX :class:`~optax_selective.SparseSummary` or a torch
        ``Summary``).
      base: the base model's values at the summary's entries (a summary of the same
        indices, same type), or None if the folder has none.
      config: the folder's checked JSON config.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, optax_selective as osel
      >>> params = {"w": jnp.array([0.5, -0.1, 2.0])}
      >>> s = osel.make_summary(params, osel.selective_pafi(budget=1).init(params))
      >>> p = osel.read_pretrained(osel.save_pretrained(s, os.path.join(tempfile.mkdtemp(), "a")))
      >>> isinstance(p, osel.Pretrained), p.base is None, p.config["budget_used"]
      (True, True, 1)
    """

    summary: Any
    base: Any
    config: dict


def check_rule(rule: str) -> str:
    """``rule`` if it is a merge rule (``"sum"``, ``"mean"``, ``"ties"``), else an error."""
    if rule not in RULES:
        raise AdapterError(f"rule must be one of {list(RULES)}, got {rule!r}.")
    return rule


# --------------------------------------------------------------------------------------------
# digests and the config


def _bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def entries_digest(entries: Sequence[ParamEntries], *, base: bool = False) -> str:
    """SHA-256 over each parameter's name, shape, dtype, int64 indices and values (or base
    values with ``base=True``), in order: the digest an adapter config records.

    Example:
      >>> import numpy as np
      >>> from optax_selective.adapters import core
      >>> e = core.ParamEntries("w", (3,), "float32", np.array([1]), np.array([2.0], np.float32))
      >>> len(core.entries_digest([e]))
      64
    """
    h = hashlib.sha256(b"optax_selective.adapter.digest.v1")
    for e in entries:
        vals = e.base if base else e.values
        if vals is None:
            raise AdapterError(f"{e.name}: no base values to digest.")
        h.update(b"\0" + json.dumps([e.name, list(e.shape), e.dtype, e.count]).encode() + b"\0")
        h.update(_bytes(e.indices))
        h.update(_bytes(vals))
    return h.hexdigest()


def base_model_record(base_model: Any) -> dict[str, Any] | None:
    """The config's ``base_model`` field from what the user passed: None, an identifier
    string (``"org/name"``, ``"org/name@revision"``) or a mapping with ``id`` and optional
    ``revision`` (other string fields are kept).

    Example:
      >>> from optax_selective.adapters import core
      >>> core.base_model_record("sentence-transformers/all-MiniLM-L6-v2@main")
      {'id': 'sentence-transformers/all-MiniLM-L6-v2', 'revision': 'main'}
    """
    if base_model is None:
        return None
    if isinstance(base_model, str):
        ident, _, rev = base_model.partition("@")
        return {"id": ident, "revision": rev or None}
    if isinstance(base_model, Mapping) and isinstance(base_model.get("id"), str):
        out = {"id": base_model["id"], "revision": base_model.get("revision")}
        for k, v in base_model.items():
            if isinstance(k, str) and isinstance(v, (str, int, float, bool, type(None))):
                out.setdefault(k, v)
        return json.loads(json.dumps(out))
    raise TypeError(
        "base_model must be None, an identifier string ('org/name' or 'org/name@revision') or "
        f"a dict with an 'id' (and optional 'revision'), got {type(base_model).__name__}.")


def build_config(
    *,
    framework: str,
    entries: Sequence[ParamEntries],
    method: str,
    budget_used: int,
    summary_version: str,
    base_model: Any = None,
    hyperparameters: Mapping[str, Any] | None = None,
    budget: int | None = None,
    base_fingerprint: Any = None,
    naming: str | None = None,
) -> dict[str, Any]:
    """The JSON config of an adapter folder (see the guide "Summaries as adapters").

    Example:
      >>> import numpy as np
      >>> from optax_selective.adapters import core
      >>> e = core.ParamEntries("w", (3,), "float32", np.array([1]), np.array([2.0], np.float32))
      >>> cfg = core.build_config(framework="jax", entries=[e], method="pafi", budget_used=1,
      ...                         summary_version="0.1")
      >>> cfg["parameters"]
      [{'name': 'w', 'shape': [3], 'dtype': 'float32', 'entries': 1}]
    """
    if framework not in FRAMEWORKS:
        raise AdapterError(f"framework must be one of {sorted(FRAMEWORKS)}, got {framework!r}.")
    if hyperparameters is not None:
        try:
            hyperparameters = json.loads(json.dumps(dict(hyperparameters)))
        except (TypeError, ValueError) as e:
            raise TypeError(f"hyperparameters must be a JSON-serialisable dict ({e}).") from None
    if budget is not None and not (isinstance(budget, int) and budget >= 0):
        raise TypeError(f"budget must be None or an int >= 0, got {budget!r}.")
    has_base = all(e.base is not None for e in entries)
    files = FRAMEWORKS[framework]
    return {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "library_version": __version__,
        "summary_version": str(summary_version),
        "framework": framework,
        "naming": naming or files["naming"],
        "summary_file": files["summary_file"],
        "base_file": files["base_file"] if has_base else None,
        "method": method,
        "hyperparameters": hyperparameters,
        "budget": budget,
        "budget_used": int(budget_used),
        "base_model": base_model_record(base_model),
        "base_fingerprint": json.loads(json.dumps(base_fingerprint)),
        "parameters": [
            {"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "entries": e.count}
            for e in entries
        ],
        "digest": entries_digest(entries),
        "base_digest": entries_digest(entries, base=True) if has_base else None,
    }


def is_adapter_folder(path: str) -> str | None:
    """None if ``path`` is an adapter folder (it may be replaced), else why not.

    Example:
      >>> import tempfile
      >>> from optax_selective.adapters import core
      >>> "not an adapter folder" in core.is_adapter_folder(tempfile.mkdtemp())
      True
    """
    refuse = (f"{path} exists and is not an adapter folder; overwrite=True only replaces "
              "adapter folders. Remove it yourself or choose another path.")
    if os.path.islink(path) or not os.path.isdir(path):
        return refuse
    try:
        read_config(path)
    except (AdapterError, FileNotFoundError):
        return refuse
    return None


def write_folder(folder: str | os.PathLike, config: Mapping[str, Any],
                 write_payload: Callable[[str], None], *, overwrite: bool = False) -> str:
    """Writes an adapter folder atomically: ``write_payload(tmp)`` fills a temporary sibling
    folder with the summary files, the config goes next to them, everything is flushed to
    disk and the folder is moved into place (an existing adapter folder is swapped out in one
    step). Returns the folder's absolute path.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a str or os.PathLike, got {type(folder).__name__}.")
    path = os.path.abspath(os.fspath(folder))
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
        why = is_adapter_folder(path)
        if why:
            raise FileExistsError(why)
    tmp = temp_sibling(path)
    os.mkdir(tmp)
    try:
        write_payload(tmp)
        with open(os.path.join(tmp, CONFIG_NAME), "x", encoding="utf-8") as f:
            json.dump(config, f, indent=1)
        fsync_tree(tmp)
        replace_dir(tmp, path, overwrite=overwrite, is_replaceable=is_adapter_folder)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _bad(folder: str, why: str) -> AdapterError:
    return AdapterError(f"{folder} is not a valid adapter folder: {why}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's config, read with a size cap and checked field by field.

    Raises:
      FileNotFoundError: if ``folder`` is not a folder.
      AdapterError: if the config is missing, too large, not JSON or malformed.

    Example:
      >>> import tempfile
      >>> from optax_selective.adapters import core
      >>> try:
      ...     core.read_config(tempfile.mkdtemp())
      ... except core.AdapterError as e:
      ...     print(str(e).split(": ", 1)[1])
      it has no adapter_config.json (save it with save_pretrained)
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no adapter folder at {folder}")
    f = os.path.join(folder, CONFIG_NAME)
    if not os.path.lexists(f):
        raise _bad(folder, f"it has no {CONFIG_NAME} (save it with save_pretrained)")
    if os.path.islink(f) or not os.path.isfile(f):
        raise _bad(folder, f"{CONFIG_NAME} is not a regular file")
    size = os.path.getsize(f)
    if size > MAX_CONFIG_BYTES:
        raise _bad(folder, f"{CONFIG_NAME} has {size} bytes (at most {MAX_CONFIG_BYTES})")
    with open(f, "rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError):
        raise _bad(folder, f"{CONFIG_NAME} is not valid JSON") from None
    if not isinstance(cfg, dict) or cfg.get("format") != ADAPTER_FORMAT:
        raise _bad(folder, f"{CONFIG_NAME} does not say format {ADAPTER_FORMAT!r}")
    if cfg.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise _bad(folder, f"format_version {cfg.get('format_version')!r} is not supported "
                           f"(this library reads {ADAPTER_FORMAT_VERSION}); upgrade optax-selective")
    fw = cfg.get("framework")
    if fw not in FRAMEWORKS:
        raise _bad(folder, f"framework {fw!r} is not one of {sorted(FRAMEWORKS)}")
    types = {"library_version": str, "method": str, "budget_used": int, "parameters": list,
             "digest": str, "naming": str, "summary_file": str}
    for name, typ in types.items():
        if not isinstance(cfg.get(name), typ) or isinstance(cfg.get(name), bool):
            raise _bad(folder, f"field {name!r} is missing or not a {typ.__name__}")
    if cfg["summary_file"] != FRAMEWORKS[fw]["summary_file"] or cfg.get("base_file") not in (
            None, FRAMEWORKS[fw]["base_file"]):
        raise _bad(folder, "summary_file or base_file is not the framework's file name")
    if (cfg.get("base_file") is None) != (cfg.get("base_digest") is None):
        raise _bad(folder, "base_file and base_digest must be given together")
    total = 0
    for j, p in enumerate(cfg["parameters"]):
        if not (isinstance(p, dict) and isinstance(p.get("name"), str)
                and isinstance(p.get("shape"), list)
                and all(_is_int(d) and d >= 0 for d in p["shape"])
                and p.get("dtype") in FLOAT_DTYPES and _is_int(p.get("entries"))
                and 0 <= p["entries"] <= math.prod(p["shape"])):
            raise _bad(folder, f"parameters[{j}] is malformed")
        total += p["entries"]
    if total != cfg["budget_used"]:
        raise _bad(folder, f"budget_used is {cfg['budget_used']} but its parameters hold {total}")
    return cfg


def check_entries_match_config(folder: str, cfg: Mapping[str, Any],
                               entries: Sequence[ParamEntries]) -> None:
    """Refuses a folder whose summary (and base values) do not match its config: parameter
    list, digests, method and budget. Names the first differing parameter."""
    params = cfg["parameters"]
    if len(params) != len(entries):
        raise _bad(folder, f"its config lists {len(params)} parameters, its summary "
                           f"{len(entries)}")
    for p, e in zip(params, entries):
        have = {"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "entries": e.count}
        if p != have:
            raise _bad(folder, f"parameter {p.get('name')!r}: config says {p}, the summary "
                               f"holds {have}")
    if entries_digest(entries) != cfg["digest"]:
        raise _bad(folder, "its summary does not match the config's digest (a file was changed)")
    if cfg.get("base_digest") is not None and entries_digest(entries, base=True) != cfg[
            "base_digest"]:
        raise _bad(folder, "its base values do not match the config's base_digest "
                           "(a file was changed)")


def check_fits(entries: Sequence[ParamEntries], model: Mapping[str, tuple[tuple[int, ...], str]],
               error: type[Exception] = AdapterError, where: str = "summary") -> None:
    """Refuses, naming the first differing parameter, a summary that does not fit a model
    whose parameters are ``{name: (shape, dtype name)}``.

    Example:
      >>> import numpy as np
      >>> from optax_selective.adapters import core
      >>> e = core.ParamEntries("w", (3,), "float32", np.array([1]), np.array([2.0], np.float32))
      >>> try:
      ...     core.check_fits([e], {"w": ((4,), "float32")})
      ... except core.AdapterError as err:
      ...     print(err)
      summary parameter 'w': shape (3,), the model's (4,).
    """
    for e in entries:
        if e.name not in model:
            near = ", ".join(list(model)[:5]) + (", ..." if len(model) > 5 else "")
            raise error(f"{where} parameter {e.name!r} is not a parameter of the model (it has "
                        f"{near}); was it saved for another model or naming?")
        shape, dtype = model[e.name]
        if tuple(shape) != e.shape:
            raise error(f"{where} parameter {e.name!r}: shape {e.shape}, the model's "
                        f"{tuple(shape)}.")
        if dtype != e.dtype:
            raise error(f"{where} parameter {e.name!r}: dtype {e.dtype}, the model's {dtype}.")


# --------------------------------------------------------------------------------------------
# attach bookkeeping


def first_overlap(a: np.ndarray, b: np.ndarray) -> int | None:
    """The smallest flat index in both sorted index arrays, or None.

    Example:
      >>> import numpy as np
      >>> from optax_selective.adapters import core
      >>> core.first_overlap(np.array([1, 4, 7]), np.array([2, 7])), core.first_overlap(
      ...     np.array([1]), np.array([2]))
      (7, None)
    """
    both = np.intersect1d(a, b, assume_unique=True)
    return int(both[0]) if both.size else None


def overlap_error(name: str, index: int, other: str) -> AdapterError:
    """The error for an attach that overlaps an attached summary."""
    return AdapterError(
        f"cannot attach: parameter {name!r} entry {index} is already changed by the attached "
        f"summary {other}; detaching them in another order would not restore the base. Detach "
        "it first, or merge the two with merge_summaries.")


# --------------------------------------------------------------------------------------------
# merging


def check_same_base(configs: Sequence[Mapping[str, Any] | None]) -> None:
    """Refuses to merge folders whose configs name different base models (identifier and
    revision); configs that name none are not compared. (Base fingerprints are not compared:
    they probe each summary's own unselected entries, so they differ between summaries of
    one base; the base values are compared entry by entry in :func:`merge_entries`.)

    Example:
      >>> from optax_selective.adapters import core
      >>> try:
      ...     core.check_same_base([{"base_model": {"id": "a", "revision": None}},
      ...                           {"base_model": {"id": "b", "revision": None}}])
      ... except core.AdapterError as e:
      ...     print(str(e)[:44])
      summaries 0 and 1 name different base models
    """
    for field in ("base_model",):
        seen: tuple[int, str] | None = None
        for i, cfg in enumerate(configs):
            value = (cfg or {}).get(field)
            if value is None:
                continue
            text = json.dumps(value, sort_keys=True)
            if seen is None:
                seen = (i, text)
            elif seen[1] != text:
                what = "base models" if field == "base_model" else "base fingerprints"
                raise AdapterError(
                    f"summaries {seen[0]} and {i} name different {what} ({seen[1]} vs {text}): "
                    "deltas of different bases do not add up. Merge summaries of one base.")


def _as_f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def merge_entries(
    summaries: Sequence[Sequence[ParamEntries]],
    weights: Sequence[float] | None = None,
    *,
    rule: str = "sum",
    budget: int | None = None,
) -> list[ParamEntries]:
    """Merges summaries given as lists of :class:`ParamEntries` with base values.

    Per parameter the result holds the union of the inputs' indices. Each input ``i`` gives a
    delta ``d_i = values_i - base`` (float64) where it has the entry, weighted by
    ``weights[i]`` (default 1). Rules, per entry, over the inputs that have it:

    * ``"sum"``: ``sum_i w_i d_i`` (task arithmetic);
    * ``"mean"``: ``sum_i w_i d_i / n`` with ``n`` the number of inputs that have the entry;
    * ``"ties"``: the sign ``s = sign(sum_i w_i d_i)`` is elected; only the weighted deltas of
      that sign are kept and averaged over their count (zero if none).

    With ``budget``, only the ``budget`` entries with the largest ``|merged delta|`` are kept
    (ties broken by parameter order, then index). Values are ``base + merged delta`` rounded
    to the parameter's dtype; base values are carried over.

    Raises:
      AdapterError: if a summary has no base values, two summaries disagree on a parameter's
        shape, dtype or base value at a shared entry, or ``rule`` / ``weights`` / ``budget``
        is invalid.

    Example:
      >>> import numpy as np
      >>> from optax_selective.adapters import core
      >>> z = np.zeros(2, np.float32)
      >>> a = core.ParamEntries("w", (3,), "float32", [0, 1], np.float32([1, 2]), z)
      >>> b = core.ParamEntries("w", (3,), "float32", [1, 2], np.float32([-4, 1]), z)
      >>> [m.values.tolist() for m in core.merge_entries([[a], [b]], rule="ties")]
      [[1.0, -4.0, 1.0]]
      >>> [m.indices.tolist() for m in core.merge_entries([[a], [b]], budget=2)]
      [[0, 1]]
    """
    check_rule(rule)
    summaries = [list(s) for s in summaries]
    if len(summaries) < 1:
        raise AdapterError("merge needs at least one summary.")
    if weights is None:
        weights = [1.0] * len(summaries)
    weights = [float(w) for w in weights]
    if len(weights) != len(summaries) or not all(math.isfinite(w) for w in weights):
        raise AdapterError(f"weights must be {len(summaries)} finite numbers (one per summary), "
                           f"got {weights}.")
    if budget is not None and not (_is_int(budget) and budget >= 0):
        raise AdapterError(f"budget must be None or an int >= 0, got {budget!r}.")
    order: list[str] = []
    by_name: dict[str, list[tuple[int, ParamEntries]]] = {}
    for i, s in enumerate(summaries):
        for e in s:
            if e.base is None:
                raise AdapterError(
                    f"summary {i} has no base values for {e.name!r}: save it with "
                    "save_pretrained(..., base=base_params_or_model) or pass base= to merge.")
            if e.name not in by_name:
                order.append(e.name)
                by_name[e.name] = []
            by_name[e.name].append((i, e))
    merged: list[tuple[str, tuple, str, np.ndarray, np.ndarray, np.ndarray]] = []
    for name in order:
        group = by_name[name]
        _, first = group[0]
        for i, e in group[1:]:
            if e.shape != first.shape or e.dtype != first.dtype:
                raise AdapterError(
                    f"summaries disagree on parameter {name!r}: summary {group[0][0]} has "
                    f"{first.shape} {first.dtype}, summary {i} {e.shape} {e.dtype}.")
        idx = np.unique(np.concatenate([e.indices for _, e in group]))
        base = np.zeros(idx.size, FLOAT_DTYPES[first.dtype])
        seen = np.zeros(idx.size, bool)
        total = np.zeros(idx.size)
        count = np.zeros(idx.size)
        deltas = []
        for i, e in group:
            pos = np.searchsorted(idx, e.indices)
            known = seen[pos]
            clash = known & (base[pos].view(np.uint8).reshape(e.count, -1)
                             != e.base.view(np.uint8).reshape(e.count, -1)).any(axis=1)
            if clash.any():
                j = int(np.flatnonzero(clash)[0])
                raise AdapterError(
                    f"summaries disagree on the base value of {name!r} entry "
                    f"{int(e.indices[j])} (summary {i}: {e.base[j]!r}, an earlier one: "
                    f"{base[pos[j]]!r}): they were not fine-tuned from the same base model.")
            base[pos] = e.base
            seen[pos] = True
            d = weights[i] * (_as_f64(e.values) - _as_f64(e.base))
            total[pos] += d
            count[pos] += 1
            deltas.append((pos, d))
        if rule == "sum":
            delta = total
        elif rule == "mean":
            delta = total / count
        else:
            sign = np.sign(total)
            kept_sum, kept_n = np.zeros(idx.size), np.zeros(idx.size)
            for pos, d in deltas:
                agree = (np.sign(d) == sign[pos]) & (sign[pos] != 0)
                kept_sum[pos[agree]] += d[agree]
                kept_n[pos[agree]] += 1
            delta = np.divide(kept_sum, kept_n, out=np.zeros(idx.size), where=kept_n > 0)
        merged.append((name, first.shape, first.dtype, idx, base, delta))
    if budget is not None:
        mags = np.concatenate([np.abs(m[5]) for m in merged]) if merged else np.zeros(0)
        keep = np.zeros(mags.size, bool)
        keep[np.argsort(-mags, kind="stable")[:budget]] = True
        out, at = [], 0
        for name, shape, dtype, idx, base, delta in merged:
            k = keep[at:at + idx.size]
            at += idx.size
            out.append((name, shape, dtype, idx[k], base[k], delta[k]))
        merged = out
    result = []
    for name, shape, dtype, idx, base, delta in merged:
        if idx.size == 0:
            continue
        values = (_as_f64(base) + delta).astype(FLOAT_DTYPES[dtype])
        result.append(ParamEntries(name, shape, dtype, idx, values, base))
    return result
