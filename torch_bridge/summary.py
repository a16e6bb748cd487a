"""Torch summaries: the selected entries of a model, O(budget), safe to load from strangers.

In memory a summary is a :class:`Summary`, a dict::

    {"format": "optax_selective.torch_summary", "format_version": 1,
     "library_version": "0.1.0", "method": "id3", "budget_used": 1234, "num_params": 6,
     "params": {name: {"position": i, "shape": [...], "dtype": "float32",
                       "indices": int32 or int64 flat row-major indices, strictly increasing,
                       "values": the parameter's values there}},
     "buffers": {name: tensor}}   # BatchNorm running statistics, as the reference carries

with selective-optimizers 0.4's attributes as well (``summary.budget_used``, ``.values``,
``.pointers``, ``.shapes``, ``.bn_metadata``, computed from the dict). ``name`` and
``position`` come from ``model.named_parameters()``, without the ``_orig_mod`` segments of
``torch.compile`` wrappers (:mod:`torch_bridge.names`). Indices are int32 unless the
parameter has 2**31 entries or more.

On disk (:func:`write_summary_to_disk`) a summary is a safetensors file: a bounded JSON header
and raw tensor bytes, no pickle, so reading it never runs code. The header's metadata holds
the fields above plus a SHA-256 per parameter (over name, position, shape, dtype, indices and
values) and per buffer. :func:`load_summary_from_disk` checks every stored tensor's dtype and
shape against that metadata before reading it, then the digests, then the invariants
(strictly increasing in-range indices, finite values, ``budget_used`` equal to the entries
present). It also reads, without ``torch.load``, the torch.save files earlier versions of this
library wrote and selective-optimizers 0.4's summaries (see :mod:`torch_bridge._safe_zip`).
Writes are atomic (temporary file in the same folder, fsync, rename). See docs/security.md.

Example:
  >>> import torch
  >>> model = torch.nn.Linear(3, 1)
  >>> mask = [torch.tensor([[True, False, False]]), torch.tensor([False])]
  >>> s = make_summary(model, list(model.parameters()), mask, method="pafi")
  >>> s["budget_used"], s["params"]["weight"]["indices"].tolist(), s.budget_used
  (1, [0], 1)
  >>> load_weights_from_summary(model, s)
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from optax_selective import __version__
from optax_selective.summary.atomic import atomic_write_bytes
from torch_bridge import names as _names
from torch_bridge._errors import SummaryMismatchError, UnsafeFileError
from torch_bridge.distributed import selected_entries

__all__ = ["Summary", "SummaryMismatchError", "UnsafeFileError", "make_summary",
           "load_weights_from_summary", "write_summary_to_disk", "load_summary_from_disk"]

FORMAT = "optax_selective.torch_summary"
FORMAT_VERSION = 1
LEGACY_FORMAT = "selective_optimizers-0.4"
_META_KEY = "optax_selective"
MAX_HEADER_BYTES = 64 * 2**20
_INT32_LIMIT = 2**31
_VALUE_DTYPES = {d: getattr(torch, d) for d in (
    "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2")}
_BUFFER_DTYPES = {**_VALUE_DTYPES, "int64": torch.int64, "int32": torch.int32}
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
              torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3",
              torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32"}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Summary(dict):
    """A summary dict (see the module docstring) that also answers selective-optimizers 0.4's
    attribute names: ``budget_used``; ``values``, ``pointers`` (``mask.nonzero()`` rows) and
    ``shapes``, one entry per ``model.parameters()`` (``None`` where nothing was selected);
    and ``bn_metadata``, one dict of running statistics per BatchNorm module.

    Note that ``summary.values`` is 0.4's list of value tensors; the dict's own values are
    ``dict.values(summary)``.
    """

    def __reduce__(self):
        # Pickles as an OrderedDict, so torch.save(summary) stays readable by
        # torch.load(weights_only=True), which refuses classes of other packages.
        return (collections.OrderedDict, (list(self.items()),))

    def __copy__(self) -> Summary:
        return Summary(self)

    def __deepcopy__(self, memo: dict) -> Summary:
        return Summary(copy.deepcopy(dict(self), memo))

    def _legacy(self) -> bool:
        return self.get("format") == LEGACY_FORMAT

    def _positional(self, what: str) -> list[Any]:
        params = self.get("params", {})
        n = self.get("num_params")
        if not isinstance(n, int):
            n = 1 + max((e["position"] for e in params.values()), default=-1)
        out: list[Any] = [None] * n
        for e in params.values():
            shape = tuple(e["shape"])
            if what == "values":
                out[e["position"]] = e["values"]
            elif what == "shapes":
                out[e["position"]] = torch.Size(shape)
            else:
                idx = e["indices"].to(torch.int64)
                out[e["position"]] = (torch.stack(torch.unravel_index(idx, shape), dim=1)
                                      if shape else torch.zeros(idx.numel(), 0, dtype=torch.int64))
        return out

    @property
    def budget_used(self) -> int:  # noqa: D102
        return self["budget_used"]

    @property
    def values(self) -> list[Any]:  # type: ignore[override]  # 0.4's name
        return self["values"] if self._legacy() else self._positional("values")

    @property
    def pointers(self) -> list[Any]:  # noqa: D102
        return self["pointers"] if self._legacy() else self._positional("pointers")

    @property
    def shapes(self) -> list[Any]:  # noqa: D102
        if self._legacy():
            return [None if s is None else torch.Size(s) for s in self["shapes"]]
        return self._positional("shapes")

    @property
    def bn_metadata(self) -> list[dict[str, torch.Tensor]]:  # noqa: D102
        if self._legacy():
            return self["bn_metadata"]
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in self.get("buffers", {}).items():
            mod, _, buf = name.rpartition(".")
            groups.setdefault(mod, {})[buf] = t
        return list(groups.values())


def batchnorm_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every BatchNorm module of ``model``, by buffer name."""
    out = {}
    for mod_name, mod in _names.named_modules(model):
        if not isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            continue
        for b in ("running_mean", "running_var", "num_batches_tracked"):
            t = getattr(mod, b, None)
            if t is not None:
                out[f"{mod_name}.{b}" if mod_name else b] = t
    return out


def make_summary(
    model: torch.nn.Module,
    params: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    *,
    method: str,
) -> Summary:
    """The summary of ``params`` (with their masks) as parameters of ``model``.

    Raises:
      ValueError: if a parameter with selected entries is not a parameter of ``model``.
    """
    named = list(_names.named_parameters(model))
    where = {id(p): (pos, name) for pos, (name, p) in enumerate(named)}
    entries: dict[str, Any] = {}
    used = 0
    for i, (p, m) in enumerate(zip(params, masks)):
        flat, values = selected_entries(p, m)  # whole-tensor indices, also for DTensor shards
        if flat.numel() == 0:
            continue
        if id(p) not in where:
            raise ValueError(
                f"optimizer parameter #{i} (shape {tuple(p.shape)}) has selected entries but is "
                "not a parameter of the model passed to get_summary; pass the model it trains."
            )
        pos, name = where[id(p)]
        index_dtype = torch.int32 if p.numel() < _INT32_LIMIT else torch.int64
        entries[name] = {
            "position": pos,
            "shape": list(p.shape),
            "dtype": _dtype_name(p.dtype),
            "indices": flat.to(index_dtype),
            "values": values,
        }
        used += flat.numel()
    return Summary(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        library_version=__version__,
        method=method,
        budget_used=used,
        num_params=len(named),
        params=dict(sorted(entries.items(), key=lambda kv: kv[1]["position"])),
        buffers={k: v.detach().cpu().clone() for k, v in batchnorm_buffers(model).items()},
    )


# --------------------------------------------------------------------------------------------
# checking


def _check_format(summary: Any, where: str = "summary") -> None:
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        raise SummaryMismatchError(
            f"{where} is not an optax_selective torch summary (expected a dict with "
            f"format={FORMAT!r}); a selective-optimizers 0.4 summary is read with "
            "load_summary_from_disk(path) or read_legacy_summary(path)."
        )
    if summary.get("format_version") != FORMAT_VERSION:
        raise SummaryMismatchError(
            f"{where}: format_version {summary.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION}); upgrade optax-selective."
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_summary(summary: Any, where: str = "summary") -> None:
    """Checks a summary's own invariants (no model needed).

    Raises:
      SummaryMismatchError: naming ``where`` and the first problem: fields missing or of the
        wrong type, positions repeated, indices not a strictly increasing 1-D int32/int64
        tensor within the declared shape, values not finite or not of the declared dtype and
        length, ``budget_used`` different from the number of entries present.
    """
    _check_format(summary, where)
    for field, typ in (("method", str), ("budget_used", int), ("params", dict), ("buffers", dict)):
        if not isinstance(summary.get(field), typ) or isinstance(summary.get(field), bool):
            raise SummaryMismatchError(f"{where}: field {field!r} is missing or not a {typ.__name__}.")
    if "num_params" in summary and not (_is_int(summary["num_params"]) and summary["num_params"] >= 0):
        raise SummaryMismatchError(f"{where}: num_params must be an int >= 0.")
    seen: set[int] = set()
    total = 0
    for name, e in summary["params"].items():
        if not isinstance(name, str) or not isinstance(e, dict):
            raise SummaryMismatchError(f"{where}: params must map names to entry dicts.")
        pos, shape, dtype = e.get("position"), e.get("shape"), e.get("dtype")
        if not _is_int(pos) or pos < 0 or pos in seen:
            raise SummaryMismatchError(f"{where}: {name}: position {pos!r} is not a new int >= 0.")
        if summary.get("num_params") is not None and pos >= summary["num_params"]:
            raise SummaryMismatchError(f"{where}: {name}: position {pos} >= num_params.")
        seen.add(pos)
        if not isinstance(shape, (list, tuple)) or not all(_is_int(d) and d >= 0 for d in shape):
            raise SummaryMismatchError(f"{where}: {name}: shape {shape!r} is not a list of ints >= 0.")
        if dtype not in _VALUE_DTYPES:
            raise SummaryMismatchError(
                f"{where}: {name}: dtype {dtype!r} is not one of {sorted(_VALUE_DTYPES)}.")
        idx, val = e.get("indices"), e.get("values")
        if not isinstance(idx, torch.Tensor) or not isinstance(val, torch.Tensor):
            raise SummaryMismatchError(f"{where}: {name}: indices and values must be tensors.")
        if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64) or val.shape != idx.shape:
            raise SummaryMismatchError(
                f"{where}: {name}: indices must be a 1-D int32/int64 tensor and values one of the "
                f"same length, got {tuple(idx.shape)} {idx.dtype} and {tuple(val.shape)}."
            )
        if val.dtype != _VALUE_DTYPES[dtype]:
            raise SummaryMismatchError(f"{where}: {name}: values dtype {val.dtype}, declared {dtype}.")
        size = math.prod(shape)
        if idx.numel() > size:
            raise SummaryMismatchError(
                f"{where}: {name}: {idx.numel()} indices for a shape of {size} entries.")
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= size
                            or not bool((idx[1:] > idx[:-1]).all())):
            raise SummaryMismatchError(
                f"{where}: {name}: indices out of range or not strictly increasing; they must "
                f"be unique, increasing and within [0, {size}) for shape {list(shape)}."
            )
        if val.numel() and not bool(torch.isfinite(val.float()).all()):
            raise SummaryMismatchError(
                f"{where}: {name}: values hold NaN or infinity (did training diverge?).")
        total += idx.numel()
    if summary["budget_used"] != total:
        raise SummaryMismatchError(
            f"{where}: budget_used is {summary['budget_used']} but the summary holds {total} "
            "entries."
        )
    for name, t in summary["buffers"].items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise SummaryMismatchError(f"{where}: buffers must map names to tensors.")
        if _dtype_name(t.dtype) not in _BUFFER_DTYPES:
            raise SummaryMismatchError(f"{where}: buffer {name}: dtype {t.dtype} not supported.")


def load_weights_from_summary(model: torch.nn.Module, summary: dict[str, Any]) -> None:
    """Writes the summary's values (and BatchNorm statistics) into ``model``, in place.

    Accepts a summary from :func:`make_summary` / :func:`load_summary_from_disk`, including
    one read from a selective-optimizers 0.4 file.

    Raises:
      SummaryMismatchError: naming the first mismatch; the model is then left untouched.
    """
    if isinstance(summary, dict) and summary.get("format") == LEGACY_FORMAT:
        from torch_bridge.legacy import convert_legacy_summary

        summary = convert_legacy_summary(summary, model)
    check_summary(summary)
    named = {name: (pos, p) for pos, (name, p) in enumerate(_names.named_parameters(model))}
    plan = []
    for name, e in summary["params"].items():
        if name not in named:
            raise SummaryMismatchError(f"summary has parameter {name!r}; the model has none such.")
        pos, p = named[name]
        if e["position"] != pos:
            raise SummaryMismatchError(
                f"{name}: summary position {e['position']}, model position {pos}."
            )
        if list(e["shape"]) != list(p.shape):
            raise SummaryMismatchError(f"{name}: summary shape {list(e['shape'])}, model shape {list(p.shape)}.")
        if e["dtype"] != _dtype_name(p.dtype):
            raise SummaryMismatchError(f"{name}: summary dtype {e['dtype']}, model dtype {_dtype_name(p.dtype)}.")
        plan.append((p, e["indices"], e["values"]))
    buffers = batchnorm_buffers(model)
    buf_plan = []
    for name, t in summary.get("buffers", {}).items():
        if name not in buffers:
            raise SummaryMismatchError(f"summary has BatchNorm buffer {name!r}; the model has none such.")
        b = buffers[name]
        if t.shape != b.shape or t.dtype != b.dtype:
            raise SummaryMismatchError(
                f"buffer {name}: summary {tuple(t.shape)} {t.dtype}, model {tuple(b.shape)} {b.dtype}."
            )
        buf_plan.append((b, t))
    with torch.no_grad():
        for p, idx, val in plan:
            idx = idx.to(device=p.device, dtype=torch.int64)
            val = val.to(p.device)
            if p.is_contiguous():
                p.detach().view(-1)[idx] = val
            else:
                p.detach()[torch.unravel_index(idx, p.shape)] = val
        for b, t in buf_plan:
            b.copy_(t.to(b.device))


# --------------------------------------------------------------------------------------------
# the file format


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(head: dict[str, Any], *tensors: torch.Tensor) -> str:
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for t in tensors:
        h.update(b"\0")
        h.update(_bytes(t))
    return h.hexdigest()


def _param_head(name: str, e: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "position": e["position"], "shape": list(e["shape"]),
            "dtype": e["dtype"], "index_dtype": _dtype_name(e["indices"].dtype),
            "count": int(e["indices"].numel())}


def _buffer_head(name: str, t: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}


def write_summary_to_disk(path: Any, summary: dict[str, Any]) -> bool:
    """Saves ``summary`` to ``path`` as a safetensors file, atomically. Returns True (as 0.4
    did); raises on failure.

    The file is written under a temporary name in the same folder, flushed to disk and renamed
    over ``path``: a reader (or a crash) sees the previous file or the new one, never a mix,
    and of concurrent writers the last to finish wins. An existing file at ``path`` is
    replaced, as in 0.4.

    Raises:
      SummaryMismatchError: if ``summary`` is not a valid summary (see :func:`check_summary`),
        e.g. a selective-optimizers 0.4 summary not yet converted with
        ``convert_legacy_summary(summary, model)``.

    Example:
      >>> import os, tempfile, torch
      >>> m = torch.nn.Linear(2, 1)
      >>> s = make_summary(m, list(m.parameters()), [torch.ones(1, 2, dtype=torch.bool),
      ...                  torch.zeros(1, dtype=torch.bool)], method="fft")
      >>> path = os.path.join(tempfile.mkdtemp(), "s.pt")
      >>> write_summary_to_disk(path, s)
      True
      >>> load_summary_from_disk(path)["budget_used"]
      2
    """
    from safetensors.torch import save

    if isinstance(summary, dict) and summary.get("format") == LEGACY_FORMAT:
        raise SummaryMismatchError(
            "this is a selective-optimizers 0.4 summary; convert it first with "
            "convert_legacy_summary(summary, model), then write the result."
        )
    check_summary(summary)
    tensors, params, buffers = {}, [], []
    for name, e in summary["params"].items():
        head = _param_head(name, e)
        params.append({**head, "sha256": _digest(head, e["indices"], e["values"])})
        tensors[f"params/{name}/indices"] = e["indices"].detach().cpu().contiguous().clone()
        tensors[f"params/{name}/values"] = e["values"].detach().cpu().contiguous().clone()
    for name, t in summary["buffers"].items():
        head = _buffer_head(name, t)
        buffers.append({**head, "sha256": _digest(head, t)})
        tensors[f"buffers/{name}"] = t.detach().cpu().contiguous().clone()
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "library_version": str(summary.get("library_version", __version__)),
        "method": summary["method"], "budget_used": summary["budget_used"],
        "num_params": summary.get("num_params"), "params": params, "buffers": buffers,
    }
    data = save(tensors, metadata={"format": FORMAT, _META_KEY: json.dumps(meta)})
    atomic_write_bytes(os.fspath(path), data)
    return True


def _read_safetensors(path: str) -> Summary:
    from safetensors import SafetensorError, safe_open

    def bad(why: str) -> SummaryMismatchError:
        return SummaryMismatchError(f"{path} is not a valid summary file: {why}.")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
        raise bad(f"it is neither a safetensors summary nor a torch.save zip (its first 8 "
                  f"bytes claim a header of {n} bytes, the file has {size})")
    try:
        with safe_open(path, framework="pt") as f:
            meta_text = (f.metadata() or {}).get(_META_KEY)
            if not isinstance(meta_text, str):
                raise bad("its safetensors metadata has no optax_selective entry")
            try:
                meta = json.loads(meta_text)
            except (ValueError, RecursionError):
                raise bad("its metadata is not valid JSON") from None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise bad(f"its metadata does not say format {FORMAT!r}")
            if meta.get("format_version") != FORMAT_VERSION:
                raise bad(f"format_version {meta.get('format_version')!r} is not supported "
                          f"(this version reads {FORMAT_VERSION}); upgrade optax-selective")
            if not isinstance(meta.get("params"), list) or not isinstance(meta.get("buffers"), list):
                raise bad("its metadata lacks the params or buffers lists")
            expected: dict[str, tuple[str, list[int]]] = {}
            plan = []
            for e in meta["params"]:
                if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                    raise bad("a params entry of its metadata is malformed")
                dtype, idt, count = e.get("dtype"), e.get("index_dtype"), e.get("count")
                if dtype not in _VALUE_DTYPES or idt not in ("int32", "int64") or not (
                        _is_int(count) and count >= 0):
                    raise bad(f"{e['name']}: dtype {dtype!r}, index dtype {idt!r} or count "
                              f"{count!r} not supported")
                pre = f"params/{e['name']}/"
                expected[pre + "indices"] = (_ST_DTYPES[getattr(torch, idt)], [count])
                expected[pre + "values"] = (_ST_DTYPES[_VALUE_DTYPES[dtype]], [count])
                plan.append(("param", e))
            for e in meta["buffers"]:
                if not isinstance(e, dict) or not isinstance(e.get("name"), str) or \
                        e.get("dtype") not in _BUFFER_DTYPES or not isinstance(e.get("shape"), list):
                    raise bad("a buffers entry of its metadata is malformed")
                expected[f"buffers/{e['name']}"] = (_ST_DTYPES[_BUFFER_DTYPES[e["dtype"]]],
                                                    e["shape"])
                plan.append(("buffer", e))
            keys = set(f.keys())
            if keys != set(expected):
                extra, missing = sorted(keys - set(expected)), sorted(set(expected) - keys)
                raise bad(f"its tensors do not match its metadata (unexpected {extra[:3]}, "
                          f"missing {missing[:3]})")
            # Every stored dtype and shape is checked before any tensor is read.
            for key, (st_dtype, shape) in expected.items():
                sl = f.get_slice(key)
                if sl.get_dtype() != st_dtype or list(sl.get_shape()) != list(shape):
                    raise bad(f"tensor {key!r} is stored as {sl.get_dtype()} "
                              f"{sl.get_shape()}, its metadata says {st_dtype} {shape}")
            params, buffers = {}, {}
            for kind, e in plan:
                if kind == "param":
                    name = e["name"]
                    idx = f.get_tensor(f"params/{name}/indices")
                    val = f.get_tensor(f"params/{name}/values")
                    entry = {"position": e.get("position"), "shape": e.get("shape"),
                             "dtype": e["dtype"], "indices": idx, "values": val}
                    if not isinstance(entry["shape"], list):
                        raise bad(f"{name}: shape is not a list")
                    head = _param_head(name, entry)
                    if _digest(head, idx, val) != e.get("sha256"):
                        raise bad(f"{name}: its data or metadata does not match the recorded "
                                  "SHA-256 (the file was changed or damaged)")
                    params[name] = entry
                else:
                    t = f.get_tensor(f"buffers/{e['name']}")
                    if _digest(_buffer_head(e["name"], t), t) != e.get("sha256"):
                        raise bad(f"buffer {e['name']}: its data does not match the recorded "
                                  "SHA-256 (the file was changed or damaged)")
                    buffers[e["name"]] = t
    except SafetensorError as e:
        raise bad(f"its safetensors header or data is malformed ({str(e)[:200]})") from None
    summary = Summary(
        format=FORMAT, format_version=FORMAT_VERSION,
        library_version=str(meta.get("library_version")), method=meta.get("method"),
        budget_used=meta.get("budget_used"), params=params, buffers=buffers,
    )
    if meta.get("num_params") is not None:
        summary["num_params"] = meta["num_params"]
    check_summary(summary, path)
    return summary


def load_summary_from_disk(path: Any) -> Summary:
    """Reads a summary file onto the CPU; nothing in the file can run code.

    Reads what :func:`write_summary_to_disk` writes (safetensors), the torch.save files of
    earlier optax-selective versions, and selective-optimizers 0.4 summaries (those through
    :func:`torch_bridge.legacy.read_legacy_summary`; the result loads with
    :func:`load_weights_from_summary` as in 0.4). Torch files are never given to
    ``torch.load``: their zip directory is checked and their pickle read with a restricted
    unpickler (TorchScript archives and any other global are refused).

    Raises:
      FileNotFoundError: if there is no file at ``path``.
      SummaryMismatchError: naming the file and the problem, if it is not a valid summary.
    """
    path = os.fspath(path)
    for attempt in range(3):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no summary file at {path}")
        before = os.stat(path).st_ino
        try:
            return _load_once(path)
        except SummaryMismatchError:
            # A concurrent write renamed a new file in between the reads of this one.
            if attempt == 2 or not os.path.exists(path) or os.stat(path).st_ino == before:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _load_once(path: str) -> Summary:
    from torch_bridge._safe_zip import LegacyRecord, is_zip, read_torch_zip

    if not is_zip(path):
        return _read_safetensors(path)
    obj = read_torch_zip(path)
    if isinstance(obj, LegacyRecord):
        from torch_bridge.legacy import legacy_from_record

        return legacy_from_record(path, obj)
    summary = Summary(obj) if isinstance(obj, dict) else obj
    check_summary(summary, path)
    return summary
