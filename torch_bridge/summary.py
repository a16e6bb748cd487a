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

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from optax_selective import __version__
from optax_selective.summary.atomic import atomic_write_bytes
from torch_bridge import names as _names
from torch_bridge._errors import SummaryMismatchError, UnsafeFileError
from torch_bridge._safe_zip import LegacyRecord, is_zip, read_torch_zip
from torch_bridge.distributed import selected_entries
from torch_bridge.legacy import convert_legacy_summary, legacy_from_record
from torch_bridge.summary_types import (
    BUFFER_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    LEGACY_FORMAT,
    VALUE_DTYPES,
    Summary,
    check_summary,
    dtype_name,
    is_int,
)

__all__ = ["Summary", "SummaryMismatchError", "UnsafeFileError", "make_summary",
           "load_weights_from_summary", "write_summary_to_disk", "load_summary_from_disk"]

_META_KEY = "optax_selective"
MAX_HEADER_BYTES = 64 * 2**20
_INT32_LIMIT = 2**31
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
              torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3",
              torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32"}


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

    ``SelectiveOptimizer.get_summary(model)`` calls it with the optimizer's parameters and
    masks; parameters with no selected entry are left out.

    Raises:
      ValueError: if a parameter with selected entries is not a parameter of ``model``.

    Example:
      >>> import torch, torch_bridge
      >>> model = torch.nn.Linear(3, 1)
      >>> with torch.no_grad():
      ...     _ = model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
      >>> masks = [torch.tensor([[True, False, True]]), torch.tensor([False])]
      >>> s = torch_bridge.make_summary(model, list(model.parameters()), masks, method="pafi")
      >>> s["budget_used"], list(s["params"]), s["method"]
      (2, ['weight'], 'pafi')
      >>> s["params"]["weight"]["indices"].tolist(), s["params"]["weight"]["values"].tolist()
      ([0, 2], [1.0, 3.0])
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
            "dtype": dtype_name(p.dtype),
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


def load_weights_from_summary(model: torch.nn.Module, summary: dict[str, Any]) -> None:
    """Writes the summary's values (and BatchNorm statistics) into ``model``, in place.

    Accepts a summary from :func:`make_summary` / :func:`load_summary_from_disk`, including
    one read from a selective-optimizers 0.4 file.

    Raises:
      SummaryMismatchError: naming the first mismatch; the model is then left untouched.

    Example:
      >>> import torch, torch_bridge
      >>> trained, base = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
      >>> with torch.no_grad():
      ...     _ = trained.weight.fill_(7.0), base.weight.zero_()
      >>> masks = [torch.tensor([[False, True]]), torch.tensor([False])]
      >>> s = torch_bridge.make_summary(trained, list(trained.parameters()), masks, method="pafi")
      >>> torch_bridge.load_weights_from_summary(base, s)
      >>> base.weight.tolist()  # the selected entry, written into the base model
      [[0.0, 7.0]]
    """
    if isinstance(summary, dict) and summary.get("format") == LEGACY_FORMAT:
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
        if e["dtype"] != dtype_name(p.dtype):
            raise SummaryMismatchError(f"{name}: summary dtype {e['dtype']}, model dtype {dtype_name(p.dtype)}.")
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
            "dtype": e["dtype"], "index_dtype": dtype_name(e["indices"].dtype),
            "count": int(e["indices"].numel())}


def _buffer_head(name: str, t: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(t.shape), "dtype": dtype_name(t.dtype)}


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
                if dtype not in VALUE_DTYPES or idt not in ("int32", "int64") or not (
                        is_int(count) and count >= 0):
                    raise bad(f"{e['name']}: dtype {dtype!r}, index dtype {idt!r} or count "
                              f"{count!r} not supported")
                pre = f"params/{e['name']}/"
                expected[pre + "indices"] = (_ST_DTYPES[getattr(torch, idt)], [count])
                expected[pre + "values"] = (_ST_DTYPES[VALUE_DTYPES[dtype]], [count])
                plan.append(("param", e))
            for e in meta["buffers"]:
                if not isinstance(e, dict) or not isinstance(e.get("name"), str) or \
                        e.get("dtype") not in BUFFER_DTYPES or not isinstance(e.get("shape"), list):
                    raise bad("a buffers entry of its metadata is malformed")
                expected[f"buffers/{e['name']}"] = (_ST_DTYPES[BUFFER_DTYPES[e["dtype"]]],
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

    Example:
      >>> import os, tempfile, torch, torch_bridge
      >>> model = torch.nn.Linear(2, 1)
      >>> masks = [torch.tensor([[True, False]]), torch.tensor([True])]
      >>> s = torch_bridge.make_summary(model, list(model.parameters()), masks, method="bitfit")
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "summary.safetensors")
      ...     _ = torch_bridge.write_summary_to_disk(path, s)
      ...     loaded = torch_bridge.load_summary_from_disk(path)
      >>> loaded["method"], loaded.budget_used
      ('bitfit', 2)
      >>> torch.equal(loaded["params"]["bias"]["values"], model.bias.detach())
      True
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
    if not is_zip(path):
        return _read_safetensors(path)
    obj = read_torch_zip(path)
    if isinstance(obj, LegacyRecord):
        return legacy_from_record(path, obj)
    summary = Summary(obj) if isinstance(obj, dict) else obj
    check_summary(summary, path)
    return summary
