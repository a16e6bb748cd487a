"""Torch summaries: the selected entries of a model, O(budget), safe to load.

A summary is a plain dict (only str, int, list and tensors, so ``torch.load(...,
weights_only=True)`` reads it and never runs code from the file)::

    {"format": "optax_selective.torch_summary", "format_version": 1,
     "library_version": "0.1.0", "method": "id3", "budget_used": 1234,
     "params": {name: {"position": i, "shape": [...], "dtype": "float32",
                       "indices": int32 or int64 flat row-major indices,
                       "values": the parameter's values there}},
     "buffers": {name: tensor}}   # BatchNorm running statistics, as the reference carries

``name`` and ``position`` come from ``model.named_parameters()`` (names without the
``_orig_mod`` segments of ``torch.compile`` wrappers, see :mod:`torch_bridge.names`). Indices
are int32 unless the parameter has 2**31 entries or more. Applying a summary checks every name, position, shape,
dtype and index first and changes nothing if any check fails.

Example:
  >>> import torch
  >>> model = torch.nn.Linear(3, 1)
  >>> mask = [torch.tensor([[True, False, False]]), torch.tensor([False])]
  >>> s = make_summary(model, list(model.parameters()), mask, method="pafi")
  >>> s["budget_used"], s["params"]["weight"]["indices"].tolist()
  (1, [0])
  >>> load_weights_from_summary(model, s)
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import torch

from optax_selective._version import __version__
from torch_bridge import names as _names
from torch_bridge.distributed import selected_entries

FORMAT = "optax_selective.torch_summary"
FORMAT_VERSION = 1


class SummaryMismatchError(ValueError):
    """The summary does not fit the model; the model was left unchanged."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
) -> dict[str, Any]:
    """The summary of ``params`` (with their masks) as parameters of ``model``.

    Raises:
      ValueError: if a parameter with selected entries is not a parameter of ``model``.
    """
    where = {id(p): (pos, name) for pos, (name, p) in enumerate(_names.named_parameters(model))}
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
        index_dtype = torch.int32 if p.numel() < 2**31 else torch.int64
        entries[name] = {
            "position": pos,
            "shape": list(p.shape),
            "dtype": _dtype_name(p.dtype),
            "indices": flat.to(index_dtype),
            "values": values,
        }
        used += flat.numel()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "method": method,
        "budget_used": used,
        "params": dict(sorted(entries.items(), key=lambda kv: kv[1]["position"])),
        "buffers": {k: v.detach().cpu().clone() for k, v in batchnorm_buffers(model).items()},
    }


def _check_format(summary: Any) -> None:
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        raise SummaryMismatchError(
            f"not an optax_selective torch summary (expected a dict with format={FORMAT!r}); a "
            "selective-optimizers 0.4 file must be read with read_legacy_summary(path)."
        )
    if summary.get("format_version") != FORMAT_VERSION:
        raise SummaryMismatchError(
            f"summary format_version {summary.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})."
        )


def load_weights_from_summary(model: torch.nn.Module, summary: dict[str, Any]) -> None:
    """Writes the summary's values (and BatchNorm statistics) into ``model``, in place.

    Accepts a summary from :func:`make_summary` / :func:`load_summary_from_disk`, or one read
    from a selective-optimizers 0.4 file with :func:`torch_bridge.legacy.read_legacy_summary`.

    Raises:
      SummaryMismatchError: naming the first mismatch; the model is then left untouched.
    """
    if isinstance(summary, dict) and summary.get("format") == "selective_optimizers-0.4":
        from torch_bridge.legacy import convert_legacy_summary

        summary = convert_legacy_summary(summary, model)
    _check_format(summary)
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
        idx, val = e["indices"], e["values"]
        if idx.dim() != 1 or val.shape != idx.shape or idx.dtype not in (torch.int32, torch.int64):
            raise SummaryMismatchError(
                f"{name}: indices must be a 1-D int32/int64 tensor and values one of the same "
                f"length, got {tuple(idx.shape)} {idx.dtype} and {tuple(val.shape)}."
            )
        if val.dtype != p.dtype:
            raise SummaryMismatchError(f"{name}: values dtype {val.dtype}, model dtype {p.dtype}.")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
            raise SummaryMismatchError(f"{name}: indices out of range for {p.numel()} entries.")
        plan.append((p, idx, val))
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


def write_summary_to_disk(path: Any, summary: dict[str, Any]) -> bool:
    """Saves ``summary`` with ``torch.save``. Returns True (as 0.4 did); raises on failure.

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
    _check_format(summary)
    torch.save(summary, path)
    return True


def load_summary_from_disk(path: Any) -> dict[str, Any]:
    """Reads a summary with ``torch.load(weights_only=True)``, onto the CPU; runs no code.

    Raises:
      SummaryMismatchError: if the file is not such a summary (for a selective-optimizers 0.4
        file the message points to :func:`torch_bridge.legacy.read_legacy_summary`).
    """
    try:
        summary = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        hint = ""
        if "SelectivePeftSummary" in str(e):
            hint = (
                " It is a selective-optimizers 0.4 summary: read it with "
                "read_legacy_summary(path), which does not unpickle arbitrary objects."
            )
        raise SummaryMismatchError(f"{path} is not a weights-only summary file.{hint}") from None
    _check_format(summary)
    return summary
