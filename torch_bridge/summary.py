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

import gc
import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from optax_selective import __version__
from optax_selective.summary import signing
from optax_selective.summary.atomic import atomic_write_bytes
from torch_bridge import names as _names
from torch_bridge._errors import SummaryMismatchError, UnsafeFileError
from torch_bridge._safe_zip import LegacyRecord, is_zip, read_torch_zip
from torch_bridge.distributed import selected_entries
from torch_bridge.fingerprint import KEY as _FP_KEY
from torch_bridge.fingerprint import check_base, check_fingerprint_field, fingerprint
from torch_bridge.legacy import convert_legacy_summary, legacy_from_record
from torch_bridge.summary_types import (
    BUFFER_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    LEGACY_FORMAT,
    VALUE_DTYPES,
    Summary,
    check_buffer,
    check_method_name,
    check_summary,
    dtype_name,
)

__all__ = ["Summary", "SummaryMismatchError", "UnsafeFileError", "make_summary", "MAX_PARAMS",
           "MAX_HEADER_BYTES",
           "load_weights_from_summary", "write_summary_to_disk", "load_summary_from_disk"]

_META_KEY = "optax_selective"
# The caps of load_summary_from_disk (docs/security.md): what no real summary exceeds, and
# what keeps any file under them loading in under a second (benchmarks/summary_load.py).
MAX_PARAMS = 16_384  # parameter entries a summary may list (default; model= or max_params=)
HEADER_BYTES_PER_PARAM = 1024  # header room per allowed parameter entry, above the floor
MAX_HEADER_BYTES = 16 * 2**20  # a summary's safetensors header (JSON) with the default cap
MAX_NAME_CHARS = 1_024  # characters of one parameter or buffer name
MAX_NDIM = 64  # dimensions of one parameter
MAX_BUFFERS = 16_384  # BatchNorm buffers a summary may list
_INDEX_ST = {"int32": "I32", "int64": "I64"}
_INDEX_DTYPES = {"I32": torch.int32, "I64": torch.int64}
_INT32_LIMIT = 2**31
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
              torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3",
              torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32"}
_VALUE_ST = {name: _ST_DTYPES[dtype] for name, dtype in VALUE_DTYPES.items()}


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
        # which base weights it was made against (torch_bridge.fingerprint)
        base_fingerprint=fingerprint(model, params, {n: e["indices"] for n, e in entries.items()}),
    )


def load_weights_from_summary(model: torch.nn.Module, summary: dict[str, Any], *,
                              force: bool = False) -> None:
    """Writes the summary's values (and BatchNorm statistics) into ``model``, in place.

    Accepts a summary from :func:`make_summary` / :func:`load_summary_from_disk`, including
    one read from a selective-optimizers 0.4 file. A summary records which base weights it
    was made against (:mod:`torch_bridge.fingerprint`); onto other weights it is refused,
    unless ``force=True``. Summaries without that record (0.4 files) load as before.

    Raises:
      SummaryMismatchError: naming the first mismatch; the model is then left untouched.
      BaseModelMismatchError: (a ``SummaryMismatchError``) the model's weights are not the
        summary's base; the model is left untouched.

    Example:
      >>> import torch, torch_bridge
      >>> import copy
      >>> base = torch.nn.Linear(2, 1)
      >>> with torch.no_grad():
      ...     _ = base.weight.zero_()
      >>> trained = copy.deepcopy(base)
      >>> with torch.no_grad():  # training changed the selected entry only
      ...     _ = trained.weight[0, 1].fill_(7.0)
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
    if summary.get("num_params") is not None and summary["num_params"] != len(named):
        raise SummaryMismatchError(
            f"the summary was made from a model of {summary['num_params']} parameters, this "
            f"model has {len(named)}; load it onto the model it was made from.")
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
    if not isinstance(force, bool):
        raise TypeError(f"force must be True or False, got {force!r}.")
    if not force:
        check_base(model, summary)
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


def write_summary_to_disk(path: Any, summary: dict[str, Any], *, key: Any = None) -> bool:
    """Saves ``summary`` to ``path`` as a safetensors file, atomically. Returns True (as 0.4
    did); raises on failure.

    The file is written under a temporary name in the same folder, flushed to disk and renamed
    over ``path``: a reader (or a crash) sees the previous file or the new one, never a mix,
    and of concurrent writers the last to finish wins. An existing file at ``path`` is
    replaced, as in 0.4.

    With ``key`` (an HMAC-SHA256 secret as ``bytes``, or an Ed25519 private key) the file is
    also signed: ``PATH.sig`` (:func:`optax_selective.sign`; docs/security.md).

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
    if key is not None:
        signing.key_algorithm(key, signing=True)  # refuse an unusable key before writing
    if summary.get(_FP_KEY) is not None:
        meta[_FP_KEY] = summary[_FP_KEY]
    data = save(tensors, metadata={"format": FORMAT, _META_KEY: json.dumps(meta)})
    atomic_write_bytes(os.fspath(path), data)
    if key is not None:
        signing.sign(path, key)
    return True


_ST_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
                "I32": 4}
# exponent bits of each narrow float: all ones means NaN or infinity (float8_e4m3fn: NaN only)
_NONFINITE_BITS = {"F16": (np.uint16, 0x7C00, 0x7C00), "BF16": (np.uint16, 0x7F80, 0x7F80),
                   "F8_E4M3": (np.uint8, 0x7F, 0x7F), "F8_E5M2": (np.uint8, 0x7C, 0x7C)}
_NP_DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64}


def _head_json(head: dict[str, Any]) -> str:
    """``json.dumps(head, sort_keys=True)`` of a checked param or buffer head, built directly
    (the digest input; tests compare it with json.dumps)."""
    shape = "[" + ", ".join(str(int(d)) for d in head["shape"]) + "]"
    if "count" in head:
        return (f'{{"count": {int(head["count"])}, "dtype": "{head["dtype"]}", "index_dtype": '
                f'"{head["index_dtype"]}", "name": {json.dumps(head["name"])}, "position": '
                f'{int(head["position"])}, "shape": {shape}}}')
    return f'{{"dtype": "{head["dtype"]}", "name": {json.dumps(head["name"])}, "shape": {shape}}}'


def _array(buf: bytearray, start: int, st_dtype: str, n: int) -> np.ndarray:
    if st_dtype in _NP_DTYPES:
        return np.frombuffer(buf, _NP_DTYPES[st_dtype], n, start)
    return np.frombuffer(buf, _NONFINITE_BITS[st_dtype][0], n, start)


def _finite(a: np.ndarray, st_dtype: str) -> bool:
    if st_dtype in _NP_DTYPES:
        return bool(np.isfinite(a).all())
    _, bits, nonfinite = _NONFINITE_BITS[st_dtype]
    return not bool(((a & bits) == nonfinite).any())


_EMPTY: dict[torch.dtype, torch.Tensor] = {}


def _tensor(buf: bytearray, start: int, st_dtype: str, torch_dtype: torch.dtype,
            shape: list[int]) -> torch.Tensor:
    n = math.prod(shape)
    if n == 0:
        if len(shape) == 1:  # one shared empty tensor per dtype: no storage to share
            if torch_dtype not in _EMPTY:
                _EMPTY[torch_dtype] = torch.zeros(0, dtype=torch_dtype)
            return _EMPTY[torch_dtype]
        return torch.zeros(shape, dtype=torch_dtype)
    if start % _ST_ITEMSIZE[st_dtype]:  # unaligned: copy (torch views need alignment)
        return torch.frombuffer(bytearray(buf[start:start + n * _ST_ITEMSIZE[st_dtype]]),
                                dtype=torch_dtype).reshape(shape)
    return torch.frombuffer(buf, dtype=torch_dtype, count=n, offset=start).reshape(shape)


def _shape_ok(shape: Any) -> bool:
    return (type(shape) is list and len(shape) <= MAX_NDIM
            and all(type(d) is int and d >= 0 for d in shape) and math.prod(shape) < 2**63)


def _read_safetensors(path: str, model: torch.nn.Module | None = None,
                      max_params: int | None = None) -> Summary:
    """Reads and checks a safetensors summary in one linear pass over its header and data:
    the header is parsed once (no safetensors library call per tensor), every entry and byte
    range is checked before any data is read, the data checks run vectorized per tensor.
    Python's cyclic garbage collector is paused meanwhile (it would rescan the header's
    objects again and again: 3x slower)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _read_safetensors_checked(path, model, max_params)
    finally:
        if enabled:
            gc.enable()


def _read_safetensors_checked(path: str, model: torch.nn.Module | None,
                              max_params: int | None) -> Summary:
    def bad(why: str) -> SummaryMismatchError:
        return SummaryMismatchError(f"{path} is not a valid summary file: {why}.")

    max_params = MAX_PARAMS if max_params is None else max_params
    named = None if model is None else {
        name: (pos, p) for pos, (name, p) in enumerate(_names.named_parameters(model))}
    limit = max_params if named is None else len(named)
    cap = max(MAX_HEADER_BYTES, HEADER_BYTES_PER_PARAM * limit)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if cap < n <= size - 8:
            raise bad(f"its safetensors header claims {n} bytes, more than the {cap / 2**20:g} "
                      f"MiB a summary of at most {limit} parameters may have (MAX_HEADER_BYTES, "
                      "HEADER_BYTES_PER_PARAM; pass model= or max_params= for larger models)")
        if not 2 <= n <= min(cap, size - 8):
            raise bad(f"it is neither a safetensors summary nor a torch.save zip (its first 8 "
                      f"bytes claim a header of {n} bytes, the file has {size})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise bad("its safetensors header is not valid JSON") from None
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
            raise bad("its safetensors metadata has no optax_selective entry")
        meta_text = header.pop("__metadata__").get(_META_KEY)
        if not isinstance(meta_text, str):
            raise bad("its safetensors metadata has no optax_selective entry")
        try:
            meta = json.loads(meta_text)
        except (ValueError, RecursionError):
            raise bad("its metadata is not valid JSON") from None
        del meta_text
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise bad(f"its metadata does not say format {FORMAT!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise bad(f"format_version {meta.get('format_version')!r} is not supported "
                      f"(this version reads {FORMAT_VERSION}); upgrade optax-selective")
        plist, blist = meta.get("params"), meta.get("buffers")
        if not isinstance(plist, list) or not isinstance(blist, list):
            raise bad("its metadata lacks the params or buffers lists")
        try:
            check_method_name(meta.get("method"), path)
        except SummaryMismatchError as e:
            raise bad(str(e).split(": ", 1)[1].rstrip(".")) from None
        num_params, used = meta.get("num_params"), meta.get("budget_used")
        if num_params is not None and not (type(num_params) is int and num_params >= 0):
            raise bad(f"num_params {str(num_params)[:40]} is not an int >= 0")
        if len(plist) > limit:
            raise bad(f"its metadata lists {len(plist)} parameters, more than " + (
                f"the model has ({limit})" if named is not None else
                f"max_params={limit} (MAX_PARAMS; pass max_params= or model= for larger models)"))
        if len(blist) > MAX_BUFFERS:
            raise bad(f"its metadata lists {len(blist)} BatchNorm buffers, more than "
                      f"MAX_BUFFERS={MAX_BUFFERS}")
        data_len = size - 8 - n
        spans: list[tuple[int, int]] = []

        def stored(key: str, st_dtype: str, shape: list[int]) -> int:
            info = header.get(key)
            if type(info) is not dict:
                raise bad(f"its tensors do not match its metadata (missing {key!r})")
            if info.get("dtype") != st_dtype or info.get("shape") != shape:
                raise bad(f"tensor {key!r} is stored as {info.get('dtype')} {info.get('shape')}, "
                          f"its metadata says {st_dtype} {shape}")
            off = info.get("data_offsets")
            if not (type(off) is list and len(off) == 2 and type(off[0]) is int
                    and type(off[1]) is int and 0 <= off[0] <= off[1] <= data_len
                    and off[1] - off[0] == math.prod(shape) * _ST_ITEMSIZE[st_dtype]):
                raise bad(f"tensor {key!r}: data_offsets {str(off)[:60]} do not fit its shape and "
                          f"the file's {data_len} data bytes")
            spans.append((off[0], off[1]))
            return off[0]

        plan, seen_names, total, keys = [], set(), 0, 0
        for e in plist:
            if type(e) is not dict or type(e.get("name")) is not str:
                raise bad("a params entry of its metadata is malformed")
            name, dtype, idt, count = e["name"], e.get("dtype"), e.get("index_dtype"), e.get("count")
            if len(name) > MAX_NAME_CHARS:
                raise bad(f"a parameter name has {len(name)} characters (at most "
                          f"{MAX_NAME_CHARS})")
            if dtype not in VALUE_DTYPES or idt not in _INDEX_ST or not (
                    type(count) is int and count >= 0):
                raise bad(f"{name}: dtype {dtype!r}, index dtype {idt!r} or count "
                          f"{count!r} not supported")
            shape, pos = e.get("shape"), e.get("position")
            if not _shape_ok(shape):
                raise bad(f"{name}: shape {str(shape)[:80]} is not a list of at most {MAX_NDIM} "
                          "ints >= 0 with fewer than 2**63 entries")
            if name in seen_names:
                raise bad(f"parameter {name!r} is listed twice in its metadata")
            seen_names.add(name)
            if type(pos) is not int or pos < 0:
                raise bad(f"{name}: position {pos!r} is not an int >= 0")
            if named is not None:
                if name not in named:
                    raise bad(f"summary has parameter {name!r}; the model has none such")
                mpos, p = named[name]
                if pos != mpos or shape != list(p.shape) or dtype != dtype_name(p.dtype):
                    raise bad(f"{name}: summary position {pos}, shape {shape}, dtype {dtype}; the "
                              f"model's {mpos}, {list(p.shape)}, {dtype_name(p.dtype)}")
            it, vt = _INDEX_ST[idt], _VALUE_ST[dtype]
            io = stored(f"params/{name}/indices", it, [count])
            vo = stored(f"params/{name}/values", vt, [count])
            plan.append((e, it, vt, io, vo))
            total += count
            keys += 2
        if type(used) is not int or used != total:
            raise bad(f"budget_used is {str(used)[:40]} but the summary holds {total} entries")
        bplan = []
        for e in blist:
            if type(e) is not dict or type(e.get("name")) is not str or \
                    e.get("dtype") not in BUFFER_DTYPES or not _shape_ok(e.get("shape")) or \
                    len(e["name"]) > MAX_NAME_CHARS:
                raise bad("a buffers entry of its metadata is malformed")
            st = _ST_DTYPES[BUFFER_DTYPES[e["dtype"]]]
            bplan.append((e, st, stored(f"buffers/{e['name']}", st, e["shape"])))
            keys += 1
        if len({e["name"] for e in blist}) != len(blist):
            raise bad("a BatchNorm buffer is listed twice in its metadata")
        if len(header) != keys:
            raise bad(f"its tensors do not match its metadata ({len(header)} tensors stored, "
                      f"{keys} listed)")
        header = None  # its objects are no longer needed
        spans.sort()
        end = 0
        for a, b in spans:
            if a != end:
                raise bad("its tensors' byte ranges overlap or leave gaps")
            end = b
        if end != data_len:
            raise bad(f"its tensors cover {end} of its {data_len} data bytes")
        buf = bytearray(data_len)
        if data_len and f.readinto(memoryview(buf)) != data_len:
            raise bad("it is shorter than its header says (truncated while reading?)")
    view, seen_pos = memoryview(buf), set()
    for e, it, vt, io, vo in plan:
        count = e["count"]
        h = hashlib.sha256(_head_json(e).encode())
        if count:
            h.update(b"\0")
            h.update(view[io:io + count * _ST_ITEMSIZE[it]])
            h.update(b"\0")
            h.update(view[vo:vo + count * _ST_ITEMSIZE[vt]])
        else:
            h.update(b"\0\0")
        if h.hexdigest() != e.get("sha256"):
            raise bad(f"{e['name']}: its data or metadata does not match the recorded SHA-256 "
                      "(the file was changed or damaged)")
        pos = e["position"]
        if pos in seen_pos or (num_params is not None and pos >= num_params):
            raise bad(f"{e['name']}: position {pos} repeats or is not below num_params "
                      f"{num_params}")
        seen_pos.add(pos)
        if count > math.prod(e["shape"]):
            raise bad(f"{e['name']}: {count} indices for a shape of {math.prod(e['shape'])} "
                      "entries")
    del view
    # The data checks, vectorized: each dtype's indices (values) of all entries in one array.
    tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for st in _INDEX_DTYPES:
        rows = [j for j, (e, it, *_) in enumerate(plan) if it == st and e["count"]]
        if not rows:
            continue
        counts = np.array([plan[j][0]["count"] for j in rows], np.int64)
        ends = np.cumsum(counts)
        starts = ends - counts
        flat = np.concatenate([_array(buf, plan[j][3], st, plan[j][0]["count"]) for j in rows])
        sizes = np.array([math.prod(plan[j][0]["shape"]) for j in rows], np.int64)
        ok = (flat[starts] >= 0) & (flat[ends - 1].astype(np.int64) < sizes)
        step = np.ones(flat.size, bool)
        step[1:] = flat[1:] > flat[:-1]
        step[starts] = True
        if not ok.all() or not step.all():
            first = np.flatnonzero(~ok)[:1].tolist() + (
                np.searchsorted(ends, np.flatnonzero(~step)[:1], "right").tolist())
            e = plan[rows[min(first)]][0]
            raise bad(f"{e['name']}: indices out of range or not strictly increasing; they must "
                      f"be unique, increasing and within [0, {math.prod(e['shape'])}) for shape "
                      f"{e['shape']}")
        whole = torch.from_numpy(flat)
        for j, a0, b0 in zip(rows, starts.tolist(), ends.tolist()):
            tensors[j] = (whole[a0:b0], None)
    for st in set(vt for _, _, vt, _, _ in plan):
        rows = [j for j, (e, _, vt, *_) in enumerate(plan) if vt == st and e["count"]]
        if not rows:
            continue
        flat = np.concatenate([_array(buf, plan[j][4], st, plan[j][0]["count"]) for j in rows])
        if not _finite(flat, st):
            ends = np.cumsum([plan[j][0]["count"] for j in rows])
            bits, nonfinite = _NONFINITE_BITS.get(st, (None, None, None))[1:]
            where = (~np.isfinite(flat)) if st in _NP_DTYPES else (flat & bits) == nonfinite
            e = plan[rows[int(np.searchsorted(ends, np.flatnonzero(where)[0], "right"))]][0]
            raise bad(f"{e['name']}: values hold NaN or infinity (did training diverge?)")
        whole = torch.from_numpy(flat).view(VALUE_DTYPES[plan[rows[0]][0]["dtype"]])
        ends = np.cumsum([plan[j][0]["count"] for j in rows]).tolist()
        for j, a0, b0 in zip(rows, [0, *ends[:-1]], ends):
            tensors[j] = (tensors[j][0], whole[a0:b0])
    params, buffers = {}, {}
    for j, (e, it, vt, io, vo) in enumerate(plan):
        idx, val = tensors[j] if j in tensors else (
            _tensor(buf, io, it, _INDEX_DTYPES[it], [0]),
            _tensor(buf, vo, vt, VALUE_DTYPES[e["dtype"]], [0]))
        params[e["name"]] = {"position": e["position"], "shape": e["shape"], "dtype": e["dtype"],
                             "indices": idx, "values": val}
    for e, st, off in bplan:
        t = _tensor(buf, off, st, BUFFER_DTYPES[e["dtype"]], e["shape"])
        if _digest(_buffer_head(e["name"], t), t) != e.get("sha256"):
            raise bad(f"buffer {e['name']}: its data does not match the recorded "
                      "SHA-256 (the file was changed or damaged)")
        check_buffer(e["name"], t, path)
        buffers[e["name"]] = t
    summary = Summary(
        format=FORMAT, format_version=FORMAT_VERSION,
        library_version=str(meta.get("library_version"))[:200], method=meta["method"],
        budget_used=used, params=params, buffers=buffers,
    )
    if num_params is not None:
        summary["num_params"] = num_params
    if meta.get(_FP_KEY) is not None:
        check_fingerprint_field(meta[_FP_KEY], path)
        summary[_FP_KEY] = meta[_FP_KEY]
    return summary


def load_summary_from_disk(path: Any, *, model: torch.nn.Module | None = None,
                           max_params: int | None = None, key: Any = None) -> Summary:
    """Reads a summary file onto the CPU; nothing in the file can run code.

    Bounded work: a safetensors summary lists at most ``max_params`` parameters (default
    ``MAX_PARAMS``, 16,384) and its header is at most ``MAX_HEADER_BYTES`` (16 MiB) or 1 KiB
    per allowed parameter, whichever is larger; names are at most 1,024 characters. With
    ``model`` it may list only parameters ``model`` has (by name, position, shape and dtype,
    checked before any data is read), at most as many as it has. The checks are linear in the
    file's size (under a second for any file under the caps on a 2-core CPU; see
    ``benchmarks/summary_load.py``).

    With ``key`` (the HMAC secret, or the signer's Ed25519 public key) the file must carry a
    valid signature ``PATH.sig`` (:func:`optax_selective.sign`), checked first; otherwise
    ``optax_selective.SignatureError``.

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
    if key is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no summary file at {path}")
        signing.verify_signature(path, key)
    for attempt in range(3):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no summary file at {path}")
        before = os.stat(path).st_ino
        try:
            return _load_once(path, model, max_params)
        except SummaryMismatchError:
            # A concurrent write renamed a new file in between the reads of this one.
            if attempt == 2 or not os.path.exists(path) or os.stat(path).st_ino == before:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _load_once(path: str, model: torch.nn.Module | None = None,
               max_params: int | None = None) -> Summary:
    if not is_zip(path):
        return _read_safetensors(path, model, max_params)
    obj = read_torch_zip(path)
    if isinstance(obj, LegacyRecord):
        return legacy_from_record(path, obj)
    summary = Summary(obj) if isinstance(obj, dict) else obj
    check_summary(summary, path)
    return summary
