"""Torch summaries as adapters: folders, attach / detach in place, merging, and the name
mapping that moves a summary between a torch model and its Flax port.

The framework-neutral logic (config, digests, checks, merge rules) is
:mod:`optax_selective.adapters.core`, shared with the JAX side. A torch adapter folder holds
``summary.safetensors`` (:func:`torch_bridge.write_summary_to_disk`'s format), optionally
``base.safetensors`` (the base model's values at the same entries) and
``adapter_config.json``. Reading goes through :func:`torch_bridge.load_summary_from_disk`,
so all its checks apply.

Example:
  >>> import torch, torch_bridge
  >>> model = torch.nn.Linear(3, 1, bias=False)
  >>> with torch.no_grad():
  ...     _ = model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
  >>> s = torch_bridge.make_summary(model, [model.weight], [torch.tensor([[False, True, False]])],
  ...                               method="pafi")
  >>> s["params"]["weight"]["values"][0] = 9.0
  >>> h = torch_bridge.attach(model, s)
  >>> model.weight.tolist()
  [[1.0, 9.0, 3.0]]
  >>> h.detach()
  >>> model.weight.tolist()
  [[1.0, 2.0, 3.0]]
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch

from optax_selective import __version__
from optax_selective.adapters import core
from optax_selective.adapters.core import AdapterError, ParamEntries, Pretrained
from torch_bridge import names as _names
from torch_bridge._errors import SummaryMismatchError
from torch_bridge.summary import (
    batchnorm_buffers,
    load_summary_from_disk,
    write_summary_to_disk,
)
from torch_bridge.summary_types import (
    FORMAT,
    FORMAT_VERSION,
    LEGACY_FORMAT,
    VALUE_DTYPES,
    Summary,
    check_summary,
    dtype_name,
)

__all__ = ["AttachedSummary", "attach", "save_pretrained", "load_pretrained", "read_pretrained",
           "merge_summaries", "merge_folders", "to_entries", "from_entries", "to_jax", "from_jax"]

_VIEWS = {"bfloat16": (torch.int16, np.int16, ml_dtypes.bfloat16),
          "float8_e4m3fn": (torch.uint8, np.uint8, ml_dtypes.float8_e4m3fn),
          "float8_e5m2": (torch.uint8, np.uint8, ml_dtypes.float8_e5m2)}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU copy of ``t`` as NumPy (``ml_dtypes`` for bfloat16 and float8), bit for bit.

    Example:
      >>> import torch
      >>> from torch_bridge.adapters import to_numpy
      >>> to_numpy(torch.tensor([1.5], dtype=torch.bfloat16)).dtype.name
      'bfloat16'
    """
    t = t.detach().cpu().contiguous()
    name = dtype_name(t.dtype)
    if name in _VIEWS:
        tview, _, np_dtype = _VIEWS[name]
        return t.view(tview).numpy().copy().view(np_dtype)
    return t.numpy().copy()


def to_torch(a: np.ndarray) -> torch.Tensor:
    """The inverse of :func:`to_numpy`.

    Example:
      >>> import numpy as np
      >>> from torch_bridge.adapters import to_torch
      >>> to_torch(np.array([1, 2], np.int64)).tolist()
      [1, 2]
    """
    a = np.ascontiguousarray(a)
    name = a.dtype.name
    if name in _VIEWS:
        _, np_view, _ = _VIEWS[name]
        return torch.from_numpy(a.view(np_view).copy()).view(VALUE_DTYPES[name])
    return torch.from_numpy(a.copy())


def _plain(summary: Any, model: torch.nn.Module | None = None) -> Summary:
    if isinstance(summary, dict) and summary.get("format") == LEGACY_FORMAT:
        if model is None:
            raise SummaryMismatchError("a selective-optimizers 0.4 summary needs its model: "
                                       "convert_legacy_summary(summary, model) first.")
        from torch_bridge.legacy import convert_legacy_summary

        summary = convert_legacy_summary(summary, model)
    check_summary(summary)
    return summary


def to_entries(summary: Mapping[str, Any], base: Mapping[str, Any] | None = None
               ) -> list[ParamEntries]:
    """The summary as framework-neutral :class:`~optax_selective.adapters.ParamEntries`
    (with ``base``'s values, a summary of the same indices, when given)."""
    out = []
    for name, e in summary["params"].items():
        b = None
        if base is not None:
            be = base["params"].get(name)
            if be is None or not torch.equal(be["indices"].to(torch.int64),
                                             e["indices"].to(torch.int64)):
                raise AdapterError(f"base values for {name} do not cover the summary's entries.")
            b = to_numpy(be["values"])
        out.append(ParamEntries(name, tuple(e["shape"]), e["dtype"],
                                e["indices"].cpu().numpy().astype(np.int64),
                                to_numpy(e["values"]), b))
    return out


def from_entries(entries: Sequence[ParamEntries], *, method: str,
                 positions: Mapping[str, int], num_params: int | None = None,
                 buffers: Mapping[str, torch.Tensor] | None = None,
                 base: bool = False) -> Summary:
    """A torch ``Summary`` of the entries' values (or base values with ``base=True``).

    ``positions`` gives each parameter's position in ``model.named_parameters()``.
    """
    params = {}
    for e in entries:
        if e.name not in positions:
            raise AdapterError(f"no position known for parameter {e.name!r}.")
        size = int(np.prod(e.shape, dtype=np.int64))
        idx = torch.from_numpy(e.indices.astype(np.int32 if size < 2**31 else np.int64))
        params[e.name] = {"position": int(positions[e.name]), "shape": list(e.shape),
                          "dtype": e.dtype, "indices": idx,
                          "values": to_torch(e.base if base else e.values)}
    s = Summary(format=FORMAT, format_version=FORMAT_VERSION, library_version=__version__,
                method=method, budget_used=sum(e.count for e in entries),
                params=dict(sorted(params.items(), key=lambda kv: kv[1]["position"])),
                buffers=dict(buffers or {}))
    if num_params is not None:
        s["num_params"] = int(num_params)
    check_summary(s)
    return s


def model_signature(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype name)}`` of ``model``'s parameters (plain names)."""
    return {n: (tuple(p.shape), dtype_name(p.dtype)) for n, p in _names.named_parameters(model)}


def _check_fits(summary: Mapping[str, Any], model: torch.nn.Module, where: str) -> None:
    core.check_fits(to_entries(summary), model_signature(model), SummaryMismatchError, where)
    positions = {n: i for i, (n, _) in enumerate(_names.named_parameters(model))}
    for name, e in summary["params"].items():
        if e["position"] != positions[name]:
            raise SummaryMismatchError(
                f"{where} parameter {name!r}: position {e['position']}, the model's "
                f"{positions[name]}.")
    bufs = batchnorm_buffers(model)
    for name, t in summary["buffers"].items():
        b = bufs.get(name)
        if b is None or b.shape != t.shape or b.dtype != t.dtype:
            raise SummaryMismatchError(f"{where} BatchNorm buffer {name!r} does not match the "
                                       "model's.")


def _flat_get(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    idx = idx.to(device=p.device, dtype=torch.int64)
    if p.is_contiguous():
        return p.detach().view(-1)[idx].clone()
    return p.detach()[torch.unravel_index(idx, p.shape)].clone()


def _flat_set(p: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> None:
    idx = idx.to(device=p.device, dtype=torch.int64)
    val = val.to(p.device)
    with torch.no_grad():
        if p.is_contiguous():
            p.detach().view(-1)[idx] = val
        else:
            p.detach()[torch.unravel_index(idx, p.shape)] = val


def gather_base(model: torch.nn.Module, summary: Mapping[str, Any]) -> Summary:
    """The values of ``model`` at the summary's entries (and its BatchNorm buffers of the
    same names), as a summary with method ``"base"``."""
    summary = _plain(summary, model)
    _check_fits(summary, model, "summary")
    named = dict(_names.named_parameters(model))
    params = {name: {**e, "indices": e["indices"].clone(),
                     "values": _flat_get(named[name], e["indices"]).cpu()}
              for name, e in summary["params"].items()}
    bufs = batchnorm_buffers(model)
    s = Summary(format=FORMAT, format_version=FORMAT_VERSION, library_version=__version__,
                method="base", budget_used=summary["budget_used"], params=params,
                buffers={n: bufs[n].detach().cpu().clone() for n in summary["buffers"]})
    if "num_params" in summary:
        s["num_params"] = summary["num_params"]
    return s


# --------------------------------------------------------------------------------------------
# folders


def _buffers_digest(buffers: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256(b"optax_selective.adapter.buffers.v1")
    for name, t in buffers.items():
        h.update(b"\0" + json.dumps([name, list(t.shape), dtype_name(t.dtype)]).encode() + b"\0")
        h.update(to_numpy(t).view(np.uint8).tobytes())
    return h.hexdigest()


def save_pretrained(
    summary: Mapping[str, Any],
    folder: str | os.PathLike,
    *,
    base_model: Any = None,
    base: Any = None,
    hyperparameters: Mapping[str, Any] | None = None,
    budget: int | None = None,
    naming: str | None = None,
    overwrite: bool = False,
) -> str:
    """Writes a torch summary as an adapter folder, atomically; returns the folder's path.

    The folder holds ``summary.safetensors`` (:func:`torch_bridge.write_summary_to_disk`),
    ``adapter_config.json`` (library version, method, ``hyperparameters``, ``budget`` and
    entries used, ``base_model``, the base fingerprint when the summary has one, each
    parameter's name, shape, dtype and entries, digests) and, with ``base``,
    ``base.safetensors``: the base model's values at the same entries, which merging needs.

    Args:
      summary: from ``SelectiveOptimizer.get_summary(model)`` or a load.
      folder: the folder to create (must not exist unless ``overwrite=True``, which
        replaces adapter folders only).
      base_model: an identifier (``"org/name"`` or ``"org/name@revision"``) or a dict with
        ``id`` and ``revision``, recorded in the config.
      base: the base (pretrained) model, or a summary of its values at the same entries.
      hyperparameters: the method's hyperparameters (JSON values), recorded as given.
      budget: the budget the method was given.
      naming: the naming scheme recorded (default ``"torch-named-parameters"``).
      overwrite: replace an existing adapter folder.

    Example:
      >>> import os, tempfile, torch, torch_bridge
      >>> model = torch.nn.Linear(2, 1)
      >>> masks = [torch.tensor([[True, False]]), torch.tensor([False])]
      >>> s = torch_bridge.make_summary(model, list(model.parameters()), masks, method="pafi")
      >>> folder = torch_bridge.save_pretrained(s, os.path.join(tempfile.mkdtemp(), "a"),
      ...                                       base_model="me/tiny@v1", base=model)
      >>> sorted(os.listdir(folder))
      ['adapter_config.json', 'base.safetensors', 'summary.safetensors']
      >>> torch_bridge.load_pretrained(folder, model)["budget_used"]
      1
    """
    summary = _plain(summary)
    base_summary = None
    if base is not None:
        base_summary = base if isinstance(base, dict) else gather_base(base, summary)
        base_summary = _plain(base_summary)
    entries = to_entries(summary, base_summary)
    cfg = core.build_config(
        framework="torch", entries=entries, method=summary["method"],
        budget_used=summary["budget_used"], summary_version=str(summary.get("library_version")),
        base_model=base_model, hyperparameters=hyperparameters, budget=budget,
        base_fingerprint=summary.get("base_fingerprint"), naming=naming)
    cfg["buffers_digest"] = _buffers_digest(summary["buffers"])

    def payload(tmp: str) -> None:
        write_summary_to_disk(os.path.join(tmp, cfg["summary_file"]), summary)
        if base_summary is not None:
            write_summary_to_disk(os.path.join(tmp, cfg["base_file"]), base_summary)

    return core.write_folder(folder, cfg, payload, overwrite=overwrite)


def read_pretrained(folder: str | os.PathLike, model: torch.nn.Module | None = None
                    ) -> Pretrained:
    """Reads a torch adapter folder (summary, base values, config), checks each against the
    others and, with ``model``, that the summary fits it.

    Raises:
      FileNotFoundError: no folder at ``folder``.
      AdapterError: the config is malformed or does not match the files (a tampered folder),
        or the folder holds a JAX adapter.
      SummaryMismatchError: a summary file is invalid, or the summary does not fit ``model``
        (naming the first differing parameter).

    Example:
      >>> import os, tempfile, torch, torch_bridge
      >>> model = torch.nn.Linear(2, 1)
      >>> masks = [torch.tensor([[True, False]]), torch.tensor([False])]
      >>> s = torch_bridge.make_summary(model, list(model.parameters()), masks, method="pafi")
      >>> folder = torch_bridge.save_pretrained(s, os.path.join(tempfile.mkdtemp(), "a"))
      >>> try:
      ...     torch_bridge.read_pretrained(folder, torch.nn.Linear(3, 1))
      ... except torch_bridge.SummaryMismatchError as e:
      ...     print(str(e).replace(folder, "<folder>"))
      <folder>: parameter 'weight': shape (1, 2), the model's (1, 3).
    """
    path = os.path.abspath(os.fspath(folder))
    cfg = core.read_config(path)
    if cfg["framework"] != "torch":
        raise AdapterError(f"{path} holds a {cfg['framework']} adapter; load it with "
                           "optax_selective.load_pretrained (or convert it with from_jax).")
    summary = load_summary_from_disk(os.path.join(path, cfg["summary_file"]))
    base = None
    if cfg["base_file"] is not None:
        base = load_summary_from_disk(os.path.join(path, cfg["base_file"]))
    try:
        entries = to_entries(summary, base)
    except AdapterError as e:
        raise AdapterError(f"{path} is not a valid adapter folder: {e}") from None
    core.check_entries_match_config(path, cfg, entries)
    if (summary["method"] != cfg["method"] or summary["budget_used"] != cfg["budget_used"]
            or cfg.get("buffers_digest") != _buffers_digest(summary["buffers"])):
        raise AdapterError(f"{path} is not a valid adapter folder: its summary's method, "
                           "budget_used or buffers differ from the config")
    if model is not None:
        _check_fits(summary, model, f"{path}:")
    return Pretrained(summary, base, cfg)


def load_pretrained(folder: str | os.PathLike, model: torch.nn.Module | None = None) -> Summary:
    """The summary of a torch adapter folder, checked against its config and (when given)
    ``model``; see :func:`read_pretrained`.

    Example:
      >>> import os, tempfile, torch, torch_bridge
      >>> model = torch.nn.Linear(2, 1)
      >>> s = torch_bridge.make_summary(model, list(model.parameters()),
      ...     [torch.tensor([[True, True]]), torch.tensor([False])], method="pafi")
      >>> folder = torch_bridge.save_pretrained(s, os.path.join(tempfile.mkdtemp(), "a"))
      >>> torch_bridge.load_pretrained(folder, model)["params"]["weight"]["indices"].tolist()
      [0, 1]
    """
    return read_pretrained(folder, model).summary


# --------------------------------------------------------------------------------------------
# attach / detach

_ATTACHED: dict[int, tuple[Any, list]] = {}  # id(tensor) -> (weak ref, [(handle, indices)])
_COUNT = [0]


def _held(t: torch.Tensor) -> list:
    """The attached summaries (with their indices) held by tensor ``t``, a live list."""
    got = _ATTACHED.get(id(t))
    if got is not None and got[0]() is t:
        return got[1]
    held: list = []
    key = id(t)
    _ATTACHED[key] = (weakref.ref(t, lambda _r, reg=_ATTACHED: reg.pop(key, None)), held)
    return held


class AttachedSummary:
    """A summary attached in place by :func:`attach`; :meth:`detach` restores the model.

    Attributes:
      summary: the attached summary.
      label: its name in error messages.
      attached: whether :meth:`detach` has not run yet.

    Example:
      >>> import torch, torch_bridge
      >>> model = torch.nn.Linear(2, 1, bias=False)
      >>> s = torch_bridge.make_summary(model, [model.weight], [torch.tensor([[True, False]])],
      ...                               method="pafi")
      >>> h = torch_bridge.attach(model, s)
      >>> h.attached, h.nbytes  # one int64 index and one float32 old value
      (True, 12)
      >>> h.detach(); h.attached
      False
    """

    def __init__(self, label: str, summary: Summary, saved: list, saved_buffers: list):
        self.label, self.summary = label, summary
        self._saved, self._saved_buffers = saved, saved_buffers
        self.attached = True

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"AttachedSummary({self.label}, {self.summary['budget_used']} entries, {state})"

    @property
    def nbytes(self) -> int:
        """Bytes of the saved base values (and indices) this handle keeps."""
        return sum(i.numel() * i.element_size() + v.numel() * v.element_size()
                   for _, i, v in self._saved) + sum(
            v.numel() * v.element_size() for _, v in self._saved_buffers)

    def detach(self) -> None:
        """Writes the saved base values back into the model, in place, bit for bit.

        Raises:
          AdapterError: if it was detached already.
        """
        if not self.attached:
            raise AdapterError(f"{self.label} was detached already.")
        for p, idx, old in self._saved:
            _flat_set(p, idx, old)
            held = _held(p)
            held[:] = [h for h in held if h[0] is not self]
        for b, old in self._saved_buffers:
            with torch.no_grad():
                b.copy_(old)
            held = _held(b)
            held[:] = [h for h in held if h[0] is not self]
        self.attached = False
        self._saved, self._saved_buffers = [], []


def attach(model: torch.nn.Module, summary: Mapping[str, Any], *,
           label: str | None = None) -> AttachedSummary:
    """Writes ``summary`` into ``model`` in place and keeps the O(budget) values it
    overwrote; returns the handle whose :meth:`~AttachedSummary.detach` restores them.

    Several summaries may be attached and detached in any order if they touch disjoint
    entries (and BatchNorm buffers); an overlapping attach is refused.

    Raises:
      SummaryMismatchError: the summary does not fit ``model`` (naming the first differing
        parameter); nothing was changed.
      AdapterError: it touches an entry an attached summary holds; nothing was changed.

    Example:
      >>> import torch, torch_bridge
      >>> model = torch.nn.Linear(2, 1, bias=False)
      >>> with torch.no_grad():
      ...     _ = model.weight.copy_(torch.tensor([[1.0, 2.0]]))
      >>> s = torch_bridge.make_summary(model, [model.weight], [torch.tensor([[True, False]])],
      ...                               method="pafi")
      >>> s["params"]["weight"]["values"][0] = -4.0
      >>> h = torch_bridge.attach(model, s, label="neg")
      >>> try:
      ...     torch_bridge.attach(model, s)
      ... except torch_bridge.AdapterError as e:
      ...     print(str(e)[:70])
      cannot attach: parameter 'weight' entry 0 is already changed by the at
      >>> model.weight.tolist(), h.detach(), model.weight.tolist()
      ([[-4.0, 2.0]], None, [[1.0, 2.0]])
    """
    summary = _plain(summary, model)
    _COUNT[0] += 1
    label = label or f"summary #{_COUNT[0]} ({summary['method']})"
    _check_fits(summary, model, label)
    named = dict(_names.named_parameters(model))
    bufs = batchnorm_buffers(model)
    for name, e in summary["params"].items():
        mine = e["indices"].cpu().numpy().astype(np.int64)
        for h, idx in _held(named[name]):
            at = core.first_overlap(idx, mine)
            if at is not None:
                raise core.overlap_error(name, at, h.label)
    for name in summary["buffers"]:
        held = _held(bufs[name])
        if held:
            raise AdapterError(f"cannot attach: BatchNorm buffer {name!r} is held by the attached "
                               f"summary {held[0][0].label}; detach it first.")
    saved = [(named[n], e["indices"].to(torch.int64), _flat_get(named[n], e["indices"]))
             for n, e in summary["params"].items()]
    saved_buffers = [(bufs[n], bufs[n].detach().clone()) for n in summary["buffers"]]
    handle = AttachedSummary(label, summary, saved, saved_buffers)
    for (p, idx, _), e in zip(saved, summary["params"].values()):
        _flat_set(p, idx, e["values"])
        _held(p).append((handle, idx.cpu().numpy()))
    for (b, _), t in zip(saved_buffers, summary["buffers"].values()):
        with torch.no_grad():
            b.copy_(t.to(b.device))
        _held(b).append((handle, None))
    return handle


# --------------------------------------------------------------------------------------------
# merging


def _with_base(item: Any, base: torch.nn.Module | None, i: int):
    if isinstance(item, (str, os.PathLike)):
        item = read_pretrained(item)
    if isinstance(item, Pretrained):
        s, b = item.summary, item.base
    elif isinstance(item, dict):
        s, b = _plain(item, base), None
    else:
        raise TypeError(f"summaries[{i}] must be a summary, a Pretrained or a folder, got "
                        f"{type(item).__name__}.")
    if s["buffers"]:
        raise AdapterError(f"summaries[{i}] holds BatchNorm statistics, which cannot be merged "
                           "entry by entry; merge summaries of models without BatchNorm.")
    if base is not None:
        from_model = gather_base(base, s)
        if b is not None:
            for x, y in zip(to_entries(s, b), to_entries(s, from_model)):
                if x.base.view(np.uint8).tobytes() != y.base.view(np.uint8).tobytes():
                    raise AdapterError(
                        f"summaries[{i}]: the base values it recorded for {x.name} differ from "
                        "base=; it was fine-tuned from another base model.")
        b = from_model
    if b is None:
        raise AdapterError(f"summaries[{i}] has no base values: pass base=model, or save it "
                           "with save_pretrained(..., base=model).")
    return s, to_entries(s, b)


def merge_pretrained(summaries: Sequence[Any], weights: Sequence[float] | None = None, *,
                     rule: str = "sum", budget: int | None = None,
                     base: torch.nn.Module | None = None) -> Pretrained:
    """:func:`merge_summaries`, returning the merged summary with its base values."""
    core.check_rule(rule)
    items = [read_pretrained(s) if isinstance(s, (str, os.PathLike)) else s for s in summaries]
    core.check_same_base([s.config if isinstance(s, Pretrained) else None for s in items])
    pairs = [_with_base(s, base, i) for i, s in enumerate(items)]
    positions: dict[str, int] = {}
    nums = {s.get("num_params") for s, _ in pairs} - {None}
    if len(nums) > 1:
        raise AdapterError(f"the summaries come from models of different parameter counts "
                           f"({sorted(nums)}).")
    for i, (s, _) in enumerate(pairs):
        for name, e in s["params"].items():
            if positions.setdefault(name, e["position"]) != e["position"]:
                raise AdapterError(f"summaries disagree on the position of {name!r} "
                                   f"(summary {i}: {e['position']}).")
    merged = core.merge_entries([e for _, e in pairs], weights, rule=rule, budget=budget)
    num = next(iter(nums), None)
    return Pretrained(
        from_entries(merged, method=f"merge-{rule}", positions=positions, num_params=num),
        from_entries(merged, method="base", positions=positions, num_params=num, base=True), {})


def merge_summaries(summaries: Sequence[Any], weights: Sequence[float] | None = None, *,
                    rule: str = "sum", budget: int | None = None,
                    base: torch.nn.Module | None = None) -> Summary:
    """Merges torch summaries of one base model; the rules are those of
    :func:`optax_selective.adapters.core.merge_entries` (``"sum"``, ``"mean"``, ``"ties"``,
    optional ``budget``).

    Deltas are taken against the base values: pass ``base`` (the base model), or adapter
    folders (or :class:`~optax_selective.adapters.Pretrained`) saved with their base values.
    Base values must agree bit for bit wherever two summaries share an entry.

    Example:
      >>> import torch, torch_bridge
      >>> base = torch.nn.Linear(2, 1, bias=False)
      >>> with torch.no_grad():
      ...     _ = base.weight.zero_()
      >>> m1 = [torch.tensor([[True, False]])]
      >>> s = torch_bridge.make_summary(base, [base.weight], m1, method="pafi")
      >>> s["params"]["weight"]["values"][:] = torch.tensor([2.0])
      >>> m = torch_bridge.merge_summaries([s, s], [1.0, 0.5], rule="sum", base=base)
      >>> m["params"]["weight"]["values"].tolist()
      [3.0]
    """
    return merge_pretrained(summaries, weights, rule=rule, budget=budget, base=base).summary


def merge_folders(out: str | os.PathLike, inputs: Sequence[str | os.PathLike],
                  weights: Sequence[float] | None = None, *, rule: str = "sum",
                  budget: int | None = None, overwrite: bool = False) -> str:
    """Merges torch adapter folders saved with their base values into the folder ``out``.

    Example:
      >>> import os, tempfile, torch, torch_bridge
      >>> from torch_bridge.adapters import merge_folders
      >>> root, model = tempfile.mkdtemp(), torch.nn.Linear(2, 1, bias=False)
      >>> s = torch_bridge.make_summary(model, [model.weight], [torch.tensor([[True, False]])],
      ...                               method="pafi")
      >>> a = torch_bridge.save_pretrained(s, os.path.join(root, "a"), base=model)
      >>> out = merge_folders(os.path.join(root, "m"), [a, a], rule="mean")
      >>> torch_bridge.load_pretrained(out)["method"]
      'merge-mean'
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


# --------------------------------------------------------------------------------------------
# one summary for both frameworks

NameMap = Callable[[str], "tuple[str, bool] | None"]


def to_jax(summary: Mapping[str, Any], name_map: NameMap):
    """The torch summary as a JAX :class:`~optax_selective.SparseSummary` of the Flax port.

    ``name_map(torch_name)`` returns ``(jax_key, transpose)``: the parameter's path key in the
    Flax params (``jax.tree_util.keystr``) and whether the Flax leaf is the transpose of the
    torch one (``nn.Linear`` weight ``(out, in)`` vs Flax kernel ``(in, out)``), or None for
    a parameter with no counterpart (refused). Values are moved, not recomputed: bit for bit.

    Example:
      >>> import torch, torch_bridge
      >>> from torch_bridge.adapters import from_jax, to_jax
      >>> model = torch.nn.Linear(3, 2, bias=False)   # weight (2, 3); a Flax kernel is (3, 2)
      >>> mask = torch.tensor([[False, True, False], [False, False, True]])
      >>> s = torch_bridge.make_summary(model, [model.weight], [mask], method="pafi")
      >>> name_map = lambda name: ("['kernel']", True) if name == "weight" else None
      >>> j = to_jax(s, name_map)
      >>> j.leaves[0].key, j.leaves[0].shape, j.leaves[0].indices.tolist()
      ("['kernel']", (3, 2), [2, 5])
      >>> back = from_jax(j, model, name_map)
      >>> back["params"]["weight"]["indices"].tolist()
      [1, 5]
    """
    from optax_selective.summary.types import SparseSummary, SummaryLeaf, index_dtype

    summary = _plain(summary)
    if summary["buffers"]:
        raise AdapterError("a summary with BatchNorm statistics has no Flax counterpart here.")
    leaves = []
    for e in to_entries(summary):
        mapped = name_map(e.name)
        if mapped is None:
            raise AdapterError(f"parameter {e.name!r} has no counterpart in the name mapping.")
        key, transpose = mapped
        idx, vals, shape = _move(e.indices, e.values, e.shape, transpose)
        size = int(np.prod(shape, dtype=np.int64))
        leaves.append(SummaryLeaf(key, shape, vals.dtype, idx.astype(index_dtype(size)), vals))
    return SparseSummary(tuple(leaves), summary["budget_used"], summary["method"])


def from_jax(summary: Any, model: torch.nn.Module, name_map: NameMap) -> Summary:
    """The inverse of :func:`to_jax`: a JAX summary of the Flax port as a torch summary of
    ``model`` (``name_map`` is the same torch-to-JAX mapping); example in :func:`to_jax`.

    Example:
      >>> import numpy as np, optax_selective as osel, torch
      >>> from torch_bridge.adapters import from_jax
      >>> leaf = osel.SummaryLeaf("['bias']", (2,), np.float32, np.array([1], np.int32),
      ...                         np.array([0.5], np.float32))
      >>> s = from_jax(osel.SparseSummary((leaf,), 1, "bitfit"), torch.nn.Linear(3, 2),
      ...              lambda name: ("['bias']", False) if name == "bias" else None)
      >>> s["params"]["bias"]["position"], s["params"]["bias"]["values"].tolist()
      (1, [0.5])
    """
    inverse = {}
    named = list(_names.named_parameters(model))
    for pos, (n, _) in enumerate(named):
        mapped = name_map(n)
        if mapped is not None:
            inverse[mapped[0]] = (n, mapped[1], pos)
    params = {}
    for leaf in summary.leaves:
        if leaf.key not in inverse:
            raise AdapterError(f"JAX leaf {leaf.key} has no torch counterpart in the mapping.")
        name, transpose, pos = inverse[leaf.key]
        shape = leaf.shape[::-1] if transpose else leaf.shape
        idx, vals, _ = _move(leaf.indices.astype(np.int64), leaf.values, leaf.shape, transpose)
        size = int(np.prod(shape, dtype=np.int64))
        params[name] = {"position": pos, "shape": list(shape), "dtype": leaf.dtype.name,
                        "indices": torch.from_numpy(idx.astype(
                            np.int32 if size < 2**31 else np.int64)),
                        "values": to_torch(vals)}
    s = Summary(format=FORMAT, format_version=FORMAT_VERSION, library_version=__version__,
                method=summary.method, budget_used=summary.budget_used, num_params=len(named),
                params=dict(sorted(params.items(), key=lambda kv: kv[1]["position"])),
                buffers={})
    check_summary(s)
    return s


def _move(idx: np.ndarray, vals: np.ndarray, shape: tuple[int, ...], transpose: bool):
    """Indices and values of a leaf of ``shape`` as entries of its transpose (2-D only)."""
    if not transpose:
        return idx, vals, tuple(shape)
    if len(shape) != 2:
        raise AdapterError(f"only 2-D parameters can be transposed, got shape {shape}.")
    rows, cols = np.divmod(idx, shape[1])
    new = cols * shape[0] + rows
    order = np.argsort(new, kind="stable")
    return new[order], vals[order], (shape[1], shape[0])
