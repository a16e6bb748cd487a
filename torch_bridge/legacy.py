"""Reading summaries written by selective-optimizers 0.4, without unpickling arbitrary objects.

0.4 saved a pickled ``selective_optimizers.load_store.SelectivePeftSummary`` dataclass with
``torch.save``; loading it with ``torch.load(weights_only=False)`` can run any code the file
names. :func:`read_legacy_summary` instead unpickles with a restricted ``pickle.Unpickler``
whose ``find_class`` allows exactly: that dataclass (rebuilt as a plain dict, the class is
never imported), ``torch._utils._rebuild_tensor_v2``, ``torch.Size``,
``collections.OrderedDict`` and torch's storage types. Anything else raises
``pickle.UnpicklingError``.

Example:
  >>> legacy = read_legacy_summary("summary_04.pt")          # doctest: +SKIP
  >>> load_weights_from_summary(model, legacy)                 # doctest: +SKIP
"""

from __future__ import annotations

import collections
import math
import pickle
import types
from typing import Any

import torch

from torch_bridge.summary import FORMAT, FORMAT_VERSION, SummaryMismatchError, _dtype_name

LEGACY_FORMAT = "selective_optimizers-0.4"
_LEGACY_CLASS = ("selective_optimizers.load_store", "SelectivePeftSummary")
_FIELDS = ("values", "pointers", "shapes", "bn_metadata", "budget_used")


class _LegacyRecord:
    """Stand-in for the 0.4 dataclass: only keeps the pickled field dict."""

    def __setstate__(self, state: Any) -> None:
        self.fields = state


_ALLOWED: dict[tuple[str, str], Any] = {
    _LEGACY_CLASS: _LegacyRecord,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only the globals a 0.4 summary needs."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a selective-optimizers 0.4 summary needs "
                "only tensors and the SelectivePeftSummary record."
            ) from None


def _load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


_PICKLE_MODULE = types.ModuleType("torch_bridge.legacy_pickle")
_PICKLE_MODULE.Unpickler = RestrictedUnpickler
_PICKLE_MODULE.load = _load


def read_legacy_summary(path: Any) -> dict[str, Any]:
    """Reads a selective-optimizers 0.4 summary file into a plain dict, onto the CPU.

    Returns:
      ``{"format": "selective_optimizers-0.4", "values", "pointers", "shapes",
      "bn_metadata", "budget_used"}`` with the 0.4 fields as lists (one entry per
      ``model.parameters()``, ``None`` where nothing was selected) and ``shapes`` as tuples.
      Pass it to ``load_weights_from_summary`` or :func:`convert_legacy_summary`.

    Raises:
      pickle.UnpicklingError: if the file names any other global (it is not a 0.4 summary,
        or it tries to run code).
    """
    obj = torch.load(path, map_location="cpu", pickle_module=_PICKLE_MODULE, weights_only=False)
    if not isinstance(obj, _LegacyRecord) or not isinstance(obj.fields, dict):
        raise SummaryMismatchError(f"{path} does not hold a SelectivePeftSummary.")
    fields = obj.fields
    missing = [f for f in _FIELDS if f not in fields]
    if missing:
        raise SummaryMismatchError(f"{path}: SelectivePeftSummary lacks fields {missing}.")
    out: dict[str, Any] = {"format": LEGACY_FORMAT}
    out["values"] = list(fields["values"])
    out["pointers"] = list(fields["pointers"])
    out["shapes"] = [None if s is None else tuple(int(d) for d in s) for s in fields["shapes"]]
    out["bn_metadata"] = [dict(m) for m in fields["bn_metadata"]]
    out["budget_used"] = int(fields["budget_used"])
    if not len(out["values"]) == len(out["pointers"]) == len(out["shapes"]):
        raise SummaryMismatchError(f"{path}: values, pointers and shapes differ in length.")
    return out


def convert_legacy_summary(legacy: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Turns a :func:`read_legacy_summary` dict into a summary of ``model`` (named entries).

    0.4 summaries are positional: entry ``i`` belongs to the ``i``-th of
    ``model.parameters()``, ``pointers`` are ``mask.nonzero()`` rows, and ``bn_metadata``
    follows the ``BatchNorm1d/2d/3d`` modules in ``model.modules()`` order.

    Raises:
      SummaryMismatchError: if the counts or shapes do not fit ``model``.
    """
    named = list(model.named_parameters())
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
        ptr = ptr.to(torch.int64).reshape(-1, p.dim())
        strides = torch.tensor(
            [math.prod(p.shape[d + 1:]) for d in range(p.dim())], dtype=torch.int64
        )
        flat = (ptr * strides).sum(dim=1) if p.dim() else torch.zeros(ptr.shape[0], dtype=torch.int64)
        params[name] = {
            "position": pos,
            "shape": list(p.shape),
            "dtype": _dtype_name(p.dtype),
            "indices": flat,
            "values": val.reshape(-1),
        }
    bn_modules = [
        (n, m) for n, m in model.named_modules()
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
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": "selective-optimizers 0.4",
        "method": "unknown (selective-optimizers 0.4)",
        "budget_used": int(legacy["budget_used"]),
        "params": params,
        "buffers": buffers,
    }
