"""Reading summaries written by selective-optimizers 0.4, without running anything in the file.

0.4 saved a pickled ``selective_optimizers.load_store.SelectivePeftSummary`` dataclass with
``torch.save``. Such a file is never given to ``torch.load`` (which sends TorchScript archives
to ``torch.jit.load`` and can run their code): :func:`read_legacy_summary` checks the zip's
directory and reads ``data.pkl`` and the tensor storages itself with a restricted unpickler
(:mod:`torch_bridge._safe_zip`). Then every field is checked: each pointer row lies inside
its parameter's shape in every dimension, rows are strictly increasing in row-major order (no
duplicates), pointer tensors are ``(entries, ndim)``, values are finite and as many as the
pointers, and ``budget_used`` equals the entries present.

:func:`~torch_bridge.summary.load_summary_from_disk` does the same for a 0.4 file, so 0.4's
``load_weights_from_summary(model, load_summary_from_disk(path))`` keeps working.

Example:
  >>> legacy = read_legacy_summary("summary_04.pt")          # doctest: +SKIP
  >>> legacy.budget_used, legacy.pointers[0].shape             # doctest: +SKIP
  >>> load_weights_from_summary(model, legacy)                 # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torch_bridge import names as _names
from torch_bridge._errors import SummaryMismatchError, UnsafeFileError
from torch_bridge._safe_zip import LegacyRecord, RestrictedUnpickler, read_torch_zip
from torch_bridge.summary_types import (
    FORMAT,
    FORMAT_VERSION,
    LEGACY_FORMAT,
    Summary,
    check_buffer,
    check_summary,
    dtype_name,
)

__all__ = ["read_legacy_summary", "convert_legacy_summary", "RestrictedUnpickler",
           "UnsafeFileError", "LEGACY_FORMAT"]
_FIELDS = ("values", "pointers", "shapes", "bn_metadata", "budget_used")


def read_legacy_summary(path: Any) -> Summary:
    """Reads a selective-optimizers 0.4 summary file, onto the CPU, running nothing from it.

    Returns:
      A :class:`~torch_bridge.summary_types.Summary` with ``format="selective_optimizers-0.4"`` and
      0.4's fields as keys and attributes: ``values``, ``pointers`` (``(n, ndim)`` int64
      ``mask.nonzero()`` rows) and ``shapes`` (one entry per ``model.parameters()``, ``None``
      where nothing was selected), ``bn_metadata`` and ``budget_used``. Pass it to
      ``load_weights_from_summary`` or :func:`convert_legacy_summary`.

    Raises:
      SummaryMismatchError: naming the file and the problem: not a plain torch.save zip (a
        TorchScript archive, say), not a ``SelectivePeftSummary``, or a field that breaks the
        checks above. A file naming any other Python global raises the subclass
        ``UnsafeFileError`` (also a ``pickle.UnpicklingError``) before anything runs.

    Example:
      With a file 0.4 wrote, ``load_weights_from_summary(model, read_legacy_summary(path))``
      loads it as 0.4 did. Any other file is refused:

      >>> import os, tempfile, torch, torch_bridge
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "weights.pt")
      ...     torch.save({"weight": torch.ones(2)}, path)  # a torch file, not a 0.4 summary
      ...     try:
      ...         torch_bridge.read_legacy_summary(path)
      ...     except torch_bridge.SummaryMismatchError as e:
      ...         print(str(e).replace(folder, "<folder>"))
      <folder>/weights.pt does not hold a selective-optimizers 0.4 SelectivePeftSummary.
    """
    obj = read_torch_zip(path)
    if not isinstance(obj, LegacyRecord):
        raise SummaryMismatchError(f"{path} does not hold a selective-optimizers 0.4 "
                                   "SelectivePeftSummary.")
    return legacy_from_record(path, obj)


def legacy_from_record(path: Any, record: LegacyRecord) -> Summary:
    """Checks the fields of an unpickled 0.4 record; see :func:`read_legacy_summary`."""

    def bad(why: str) -> SummaryMismatchError:
        return SummaryMismatchError(f"{path}: selective-optimizers 0.4 summary {why}.")

    fields = getattr(record, "fields", None)
    if not isinstance(fields, dict):
        raise bad("has no field dict")
    missing = [f for f in _FIELDS if f not in fields]
    if missing:
        raise bad(f"lacks fields {missing}")
    lists = {f: fields[f] for f in ("values", "pointers", "shapes", "bn_metadata")}
    for f, v in lists.items():
        if not isinstance(v, list):
            raise bad(f"field {f!r} is not a list")
    values, pointers, shapes = lists["values"], lists["pointers"], lists["shapes"]
    if not len(values) == len(pointers) == len(shapes):
        raise bad("has values, pointers and shapes of different lengths")
    budget_used = fields["budget_used"]
    if not isinstance(budget_used, int) or isinstance(budget_used, bool) or budget_used < 0:
        raise bad(f"budget_used {budget_used!r} is not an int >= 0")
    out_shapes: list[tuple[int, ...] | None] = []
    total = 0
    for i, (val, ptr, shape) in enumerate(zip(values, pointers, shapes)):
        if shape is not None:
            if not isinstance(shape, (tuple, list)) or len(shape) > 64 or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise bad(f"shapes[{i}] {str(shape)[:80]} is not a shape")
            if math.prod(shape) >= 2**63:
                raise bad(f"shapes[{i}] {list(shape)} has {math.prod(shape)} entries, more than "
                          "int64 indices reach (2**63)")
            shape = tuple(shape)
        out_shapes.append(shape)
        if val is None and ptr is None:
            continue
        if val is None or ptr is None or shape is None:
            raise bad(f"entry {i} has only some of values, pointers and shape")
        if not isinstance(val, torch.Tensor) or not isinstance(ptr, torch.Tensor):
            raise bad(f"entry {i}: values and pointers must be tensors")
        n = val.numel()
        if ptr.dtype != torch.int64 or tuple(ptr.shape) != (n, len(shape)) or val.dim() != 1:
            raise bad(f"entry {i}: pointers must be an int64 ({n}, {len(shape)}) tensor and "
                      f"values 1-D, got pointers {tuple(ptr.shape)} {ptr.dtype} and values "
                      f"{tuple(val.shape)}")
        if not val.is_floating_point() or (n and not bool(torch.isfinite(val.float()).all())):
            raise bad(f"entry {i}: values must be finite floating-point numbers")
        if n:
            dims = torch.tensor(shape, dtype=torch.int64)
            if bool((ptr < 0).any()) or bool((ptr >= dims).any()):
                raise bad(f"entry {i}: a pointer lies outside the shape {shape} "
                          "(checked per dimension)")
            strides = torch.tensor([math.prod(shape[d + 1:]) for d in range(len(shape))],
                                   dtype=torch.int64)
            flat = (ptr * strides).sum(dim=1)
            if n > 1 and not bool((flat[1:] > flat[:-1]).all()):
                raise bad(f"entry {i}: pointers repeat or are out of row-major order "
                          "(0.4 writes mask.nonzero(), strictly increasing)")
        total += n
    if budget_used != total:
        raise bad(f"says budget_used={budget_used} but holds {total} entries")
    bn = []
    for j, meta in enumerate(lists["bn_metadata"]):
        if not isinstance(meta, dict) or not all(
                isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in meta.items()):
            raise bad(f"bn_metadata[{j}] is not a dict of tensors")
        for k, t in meta.items():
            try:
                check_buffer(k, t, f"bn_metadata[{j}]")
            except SummaryMismatchError as e:
                raise bad(str(e).rstrip(".")) from None
        bn.append(dict(meta))
    return Summary(format=LEGACY_FORMAT, values=list(values), pointers=list(pointers),
                   shapes=out_shapes, bn_metadata=bn, budget_used=budget_used)


def convert_legacy_summary(legacy: dict[str, Any], model: torch.nn.Module) -> Summary:
    """Turns a 0.4 summary (from :func:`read_legacy_summary`) into a summary of ``model``.

    0.4 summaries are positional: entry ``i`` belongs to the ``i``-th of
    ``model.parameters()``, ``pointers`` are ``mask.nonzero()`` rows, and ``bn_metadata``
    follows the ``BatchNorm1d/2d/3d`` modules in ``model.modules()`` order.

    Raises:
      SummaryMismatchError: if the counts, shapes or dtypes do not fit ``model``.

    Example:
      A 0.4 summary as :func:`read_legacy_summary` returns it, here selecting ``weight[0, 1]``
      of a ``Linear(2, 1)``:

      >>> import torch, torch_bridge
      >>> legacy = torch_bridge.Summary(
      ...     format="selective_optimizers-0.4", budget_used=1, bn_metadata=[],
      ...     values=[torch.tensor([5.0]), None], pointers=[torch.tensor([[0, 1]]), None],
      ...     shapes=[torch.Size([1, 2]), None])
      >>> s = torch_bridge.convert_legacy_summary(legacy, torch.nn.Linear(2, 1))
      >>> list(s["params"]), s["params"]["weight"]["indices"].tolist(), s.budget_used
      (['weight'], [1], 1)
    """
    if not isinstance(legacy, dict) or legacy.get("format") != LEGACY_FORMAT:
        raise SummaryMismatchError("convert_legacy_summary needs a summary from "
                                   "read_legacy_summary or load_summary_from_disk of a 0.4 file.")
    named = list(_names.named_parameters(model))
    if len(legacy["values"]) != len(named):
        raise SummaryMismatchError(
            f"the 0.4 summary has {len(legacy['values'])} parameters, the model {len(named)}."
        )
    params = {}
    for pos, ((name, p), val, ptr, shape) in enumerate(
        zip(named, legacy["values"], legacy["pointers"], legacy["shapes"])
    ):
        if val is None:
            continue
        if tuple(shape) != tuple(p.shape):
            raise SummaryMismatchError(f"{name}: 0.4 summary shape {shape}, model shape {tuple(p.shape)}.")
        if val.dtype != p.dtype:
            raise SummaryMismatchError(
                f"{name}: the 0.4 summary's values are {val.dtype}, the model's parameter is "
                f"{p.dtype} (0.4 cast them silently). Load it onto the model in the dtype it was "
                "trained in, or cast the values first: summary['values'] = [None if v is None "
                "else v.to(p.dtype) for v, p in zip(summary['values'], model.parameters())]."
            )
        strides = torch.tensor(
            [math.prod(p.shape[d + 1:]) for d in range(p.dim())], dtype=torch.int64
        )
        flat = (ptr * strides).sum(dim=1) if p.dim() else torch.zeros(ptr.shape[0], dtype=torch.int64)
        params[name] = {
            "position": pos,
            "shape": list(p.shape),
            "dtype": dtype_name(p.dtype),
            "indices": flat.to(torch.int32 if p.numel() < 2**31 else torch.int64),
            "values": val.reshape(-1),
        }
    bn_modules = [
        (n, m) for n, m in _names.named_modules(model)
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d))
    ]
    if len(bn_modules) != len(legacy["bn_metadata"]):
        raise SummaryMismatchError(
            f"the 0.4 summary has {len(legacy['bn_metadata'])} BatchNorm entries, the model "
            f"{len(bn_modules)} BatchNorm modules."
        )
    buffers = {}
    for (mod_name, _), meta in zip(bn_modules, legacy["bn_metadata"]):
        for key, t in meta.items():
            buffers[f"{mod_name}.{key}" if mod_name else key] = t
    out = Summary(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        library_version="selective-optimizers 0.4",
        method="unknown (selective-optimizers 0.4)",
        budget_used=int(legacy["budget_used"]),
        num_params=len(named),
        params=params,
        buffers=buffers,
    )
    check_summary(out, "the converted 0.4 summary")
    return out
