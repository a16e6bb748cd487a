"""The torch summary's type, format constants and invariants (no model, no files).

Shared by :mod:`torch_bridge.summary` (make, apply, safetensors files) and
:mod:`torch_bridge.legacy` (selective-optimizers 0.4 files), which both build and check
:class:`Summary` dicts; the layout of the dict is described in :mod:`torch_bridge.summary`.

Example:
  >>> import torch
  >>> s = Summary(format=FORMAT, format_version=FORMAT_VERSION, method="pafi",
  ...             budget_used=1, num_params=1, buffers={},
  ...             params={"w": {"position": 0, "shape": [3], "dtype": "float32",
  ...                           "indices": torch.tensor([2], dtype=torch.int32),
  ...                           "values": torch.tensor([0.5])}})
  >>> check_summary(s)
  >>> s.pointers, s.values
  ([tensor([[2]])], [tensor([0.5000])])
"""

from __future__ import annotations

import collections
import copy
import math
from typing import Any

import torch

from torch_bridge._errors import SummaryMismatchError
from torch_bridge.fingerprint import check_fingerprint_field

__all__ = ["Summary", "check_summary", "check_buffer", "check_method_name", "dtype_name", "is_int", "FORMAT", "FORMAT_VERSION",
           "LEGACY_FORMAT", "VALUE_DTYPES", "BUFFER_DTYPES"]

FORMAT = "optax_selective.torch_summary"
FORMAT_VERSION = 1
LEGACY_FORMAT = "selective_optimizers-0.4"
# dtype name (as in a summary's "dtype" field) -> torch dtype
VALUE_DTYPES = {d: getattr(torch, d) for d in (
    "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2")}
BUFFER_DTYPES = {**VALUE_DTYPES, "int64": torch.int64, "int32": torch.int32}


def dtype_name(dtype: torch.dtype) -> str:
    """The name a summary records for ``dtype``.

    Example:
      >>> dtype_name(torch.bfloat16)
      'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def is_int(x: Any) -> bool:
    """Whether ``x`` is an int and not a bool (a count or position read from a file).

    Example:
      >>> is_int(3), is_int(True), is_int(3.0)
      (True, False, False)
    """
    return isinstance(x, int) and not isinstance(x, bool)


class Summary(dict):
    """A summary dict (see the module docstring) that also answers selective-optimizers 0.4's
    attribute names: ``budget_used``; ``values``, ``pointers`` (``mask.nonzero()`` rows) and
    ``shapes``, one entry per ``model.parameters()`` (``None`` where nothing was selected);
    and ``bn_metadata``, one dict of running statistics per BatchNorm module.

    Note that ``summary.values`` is 0.4's list of value tensors; the dict's own values are
    ``dict.values(summary)``.

    Example:
      >>> import torch, torch_bridge
      >>> model = torch.nn.Linear(2, 1)
      >>> masks = [torch.tensor([[False, True]]), torch.tensor([False])]
      >>> s = torch_bridge.make_summary(model, list(model.parameters()), masks, method="pafi")
      >>> isinstance(s, torch_bridge.Summary), s["params"]["weight"]["indices"].tolist()
      (True, [1])
      >>> s.budget_used, s.pointers, s.shapes  # 0.4's attributes: one entry per parameter
      (1, [tensor([[0, 1]]), None], [torch.Size([1, 2]), None])
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
        for name, e in params.items():
            shape = tuple(e["shape"])
            if math.prod(shape) >= _INT64_ENTRIES:
                raise SummaryMismatchError(
                    f"summary: {name}: shape {list(shape)} has {math.prod(shape)} entries, more "
                    "than int64 indices reach (2**63); check_summary refuses it.")
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


MAX_METHOD_CHARS = 100
_INT64_ENTRIES = 2**63


def check_method_name(method: Any, where: str = "summary") -> None:
    """Refuses a ``method`` field that no method has: not a str, empty, longer than
    ``MAX_METHOD_CHARS`` or holding characters outside printable ASCII. Any well-formed name
    is accepted (methods registered with ``optax_selective.methods.register`` included).

    Example:
      >>> check_method_name("id3")
      >>> check_method_name("x" * 1000)
      Traceback (most recent call last):
      torch_bridge._errors.SummaryMismatchError: summary: method 'xxxxxxxxxxxxxxxxxxxx...' (1000 characters) is not a method name (printable ASCII, 1 to 100 characters).
    """
    if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD_CHARS or not (
            method.isascii() and method.isprintable()):
        shown = repr(method[:20] + "...") if isinstance(method, str) and len(method) > 20 \
            else repr(method)
        n = f" ({len(method)} characters)" if isinstance(method, str) else ""
        raise SummaryMismatchError(
            f"{where}: method {shown}{n} is not a method name (printable ASCII, 1 to "
            f"{MAX_METHOD_CHARS} characters).")


def check_buffer(name: str, t: torch.Tensor, where: str = "summary") -> None:
    """Refuses BatchNorm statistics a model cannot use: NaN or infinity, a negative
    ``running_var``, a negative ``num_batches_tracked``.

    Example:
      >>> check_buffer("bn.running_var", torch.tensor([1.0, -2.0]))
      Traceback (most recent call last):
      torch_bridge._errors.SummaryMismatchError: summary: buffer bn.running_var holds negative values (a variance cannot be negative).
    """
    if not t.numel():
        return
    if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
        raise SummaryMismatchError(f"{where}: buffer {name} holds NaN or infinity.")
    if name.rsplit(".", 1)[-1] == "running_var" and bool((t < 0).any()):
        raise SummaryMismatchError(
            f"{where}: buffer {name} holds negative values (a variance cannot be negative).")
    if not t.is_floating_point() and bool((t < 0).any()):
        raise SummaryMismatchError(f"{where}: buffer {name} holds negative counts.")


def check_summary(summary: Any, where: str = "summary", *, entries_checked: bool = False) -> None:
    """Checks a summary's own invariants (no model needed).

    ``entries_checked=True`` skips the per-entry index and value checks (the file reader
    has done them, vectorized, on the raw bytes).

    Raises:
      SummaryMismatchError: naming ``where`` and the first problem: fields missing or of the
        wrong type, a method name no method has, positions repeated, a shape of 2**63
        entries or more, indices not a strictly increasing 1-D int32/int64 tensor within the
        declared shape, values not finite or not of the declared dtype and length,
        ``budget_used`` different from the number of entries present, BatchNorm statistics
        that are not finite or negative (``running_var``, ``num_batches_tracked``).
    """
    _check_format(summary, where)
    for field, typ in (("method", str), ("budget_used", int), ("params", dict), ("buffers", dict)):
        if not isinstance(summary.get(field), typ) or isinstance(summary.get(field), bool):
            raise SummaryMismatchError(f"{where}: field {field!r} is missing or not a {typ.__name__}.")
    check_method_name(summary["method"], where)
    if "num_params" in summary and not (is_int(summary["num_params"]) and summary["num_params"] >= 0):
        raise SummaryMismatchError(f"{where}: num_params must be an int >= 0.")
    if summary.get("base_fingerprint") is not None:
        check_fingerprint_field(summary["base_fingerprint"], where)
    seen: set[int] = set()
    total = 0
    for name, e in summary["params"].items():
        if not isinstance(name, str) or not isinstance(e, dict):
            raise SummaryMismatchError(f"{where}: params must map names to entry dicts.")
        pos, shape, dtype = e.get("position"), e.get("shape"), e.get("dtype")
        if not is_int(pos) or pos < 0 or pos in seen:
            raise SummaryMismatchError(f"{where}: {name}: position {pos!r} is not a new int >= 0.")
        if summary.get("num_params") is not None and pos >= summary["num_params"]:
            raise SummaryMismatchError(f"{where}: {name}: position {pos} >= num_params.")
        seen.add(pos)
        if not isinstance(shape, (list, tuple)) or not all(is_int(d) and d >= 0 for d in shape):
            raise SummaryMismatchError(f"{where}: {name}: shape {shape!r} is not a list of ints >= 0.")
        if dtype not in VALUE_DTYPES:
            raise SummaryMismatchError(
                f"{where}: {name}: dtype {dtype!r} is not one of {sorted(VALUE_DTYPES)}.")
        idx, val = e.get("indices"), e.get("values")
        if not isinstance(idx, torch.Tensor) or not isinstance(val, torch.Tensor):
            raise SummaryMismatchError(f"{where}: {name}: indices and values must be tensors.")
        if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64) or val.shape != idx.shape:
            raise SummaryMismatchError(
                f"{where}: {name}: indices must be a 1-D int32/int64 tensor and values one of the "
                f"same length, got {tuple(idx.shape)} {idx.dtype} and {tuple(val.shape)}."
            )
        if val.dtype != VALUE_DTYPES[dtype]:
            raise SummaryMismatchError(f"{where}: {name}: values dtype {val.dtype}, declared {dtype}.")
        size = math.prod(shape)
        if size >= _INT64_ENTRIES:
            raise SummaryMismatchError(
                f"{where}: {name}: shape {list(shape)} has {size} entries, more than int64 "
                "indices reach (2**63).")
        if idx.numel() > size:
            raise SummaryMismatchError(
                f"{where}: {name}: {idx.numel()} indices for a shape of {size} entries.")
        if entries_checked:
            total += idx.numel()
            continue
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
        if dtype_name(t.dtype) not in BUFFER_DTYPES:
            raise SummaryMismatchError(f"{where}: buffer {name}: dtype {t.dtype} not supported.")
        check_buffer(name, t, where)
