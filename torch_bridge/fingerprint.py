"""The base-model fingerprint of a torch summary: which weights it was trained from.

A summary holds the selected entries only, so it loads onto any model of the same
architecture, also onto other weights (another checkpoint, a peft LoRA adapter initialised
with another seed), where it gives wrong outputs without a word. So :func:`fingerprint`
records, when a summary is made, a digest of the *base* values: for each parameter, a SHA-256
over its shape, dtype and its values at up to :data:`PROBES` entries spread over it, skipping
the entries the summary selected. Unselected entries are never changed by a selective
optimizer (bit for bit), so these are the values the training started from: the trained model
gives the same digests as the base model, and any other model almost surely does not.
Computing or checking it costs O(:data:`PROBES`) entries per parameter; with FSDP2 each
sharded parameter is gathered once (every rank calls it, as it calls ``get_summary``).

Fingerprinted: the optimizer's parameters (unselected entries never change) and the model's
``requires_grad=False`` parameters (the frozen base under LoRA); not trainable parameters
outside the optimizer, which another optimizer may change.

:func:`check_base` compares a summary's fingerprint with a model; ``load_weights_from_summary``
calls it before writing anything and refuses a mismatch (``force=True`` loads anyway).
Summaries without a fingerprint (written by selective-optimizers 0.4 or earlier versions of
this library) load as before.

Example:
  >>> import torch, torch_bridge
  >>> _ = torch.manual_seed(0); base = torch.nn.Linear(4, 2)
  >>> masks = [torch.zeros(2, 4, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
  >>> s = torch_bridge.make_summary(base, list(base.parameters()), masks, method="bitfit")
  >>> check_base(base, s)  # the model it was made against: no error
  >>> _ = torch.manual_seed(1); other = torch.nn.Linear(4, 2)
  >>> try:
  ...     check_base(other, s)
  ... except BaseModelMismatchError as e:
  ...     print(str(e)[:63])
  the summary was made against other base weights: weight differs
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from torch_bridge import names as _names
from torch_bridge._errors import SummaryMismatchError

__all__ = ["PROBES", "SCHEME", "BaseModelMismatchError", "fingerprint", "check_base",
           "check_fingerprint_field"]

PROBES = 16
SCHEME = "unselected-probes-sha256/1"
KEY = "base_fingerprint"
_HEX = re.compile(r"[0-9a-f]{64}")


class BaseModelMismatchError(SummaryMismatchError):
    """The model's weights are not the ones the summary was trained from (its base
    fingerprint differs); nothing was loaded. ``force=True`` loads anyway.

    Example:
      >>> issubclass(BaseModelMismatchError, SummaryMismatchError)
      True
    """


def _probe_positions(numel: int, selected: torch.Tensor | None) -> torch.Tensor:
    pos = torch.unique(torch.arange(PROBES, dtype=torch.int64) * numel // PROBES) if numel \
        else torch.zeros(0, dtype=torch.int64)
    if selected is not None and selected.numel():
        pos = pos[~torch.isin(pos, selected.to(torch.int64).cpu())]
    return pos


def _digest(p: torch.Tensor, selected: torch.Tensor | None) -> str:
    t = p.detach()
    if hasattr(t, "full_tensor"):  # a DTensor (FSDP2): the whole parameter, once
        t = t.full_tensor()
    pos = _probe_positions(t.numel(), selected)
    values = t[torch.unravel_index(pos.to(t.device), t.shape)] if t.dim() else t.reshape(1)[pos]
    h = hashlib.sha256(f"{list(t.shape)}|{t.dtype}|".encode())
    h.update(pos.numpy().tobytes())
    h.update(values.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: torch.nn.Module, params: Iterable[torch.Tensor],
                selected: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The base fingerprint of ``model`` for a summary with entries ``selected`` (name ->
    flat indices): one digest per parameter of ``params`` and per frozen parameter.

    Example:
      >>> import torch
      >>> model = torch.nn.Linear(2, 1)
      >>> fp = fingerprint(model, model.parameters(), {"bias": torch.tensor([0])})
      >>> fp["scheme"] == SCHEME, sorted(fp["params"])
      (True, ['bias', 'weight'])
    """
    ids = {id(p) for p in params}
    out = {}
    for name, p in _names.named_parameters(model):
        if id(p) in ids or not p.requires_grad:
            out[name] = _digest(p, selected.get(name))
    return {"scheme": SCHEME, "probes": PROBES, "params": out}


def check_fingerprint_field(fp: Any, where: str = "summary") -> None:
    """Checks the form of a summary's ``base_fingerprint`` field (the readers call it).

    Raises:
      SummaryMismatchError: if it is not a dict of a scheme and hex digests by name.

    Example:
      >>> check_fingerprint_field({"scheme": SCHEME, "probes": 16, "params": {"w": "0" * 64}})
    """
    ok = (isinstance(fp, dict) and isinstance(fp.get("scheme"), str)
          and isinstance(fp.get("params"), dict)
          and all(isinstance(k, str) and isinstance(v, str) and _HEX.fullmatch(v)
                  for k, v in fp["params"].items()))
    if not ok:
        raise SummaryMismatchError(
            f"{where}: its {KEY} is malformed (expected a scheme and one SHA-256 hex digest "
            "per parameter name).")


def check_base(model: torch.nn.Module, summary: Mapping[str, Any]) -> None:
    """Refuses ``model`` if it is not the base ``summary`` was made against.

    Does nothing for a summary without a fingerprint (selective-optimizers 0.4, earlier
    versions of this library) or with a scheme this version does not know.

    Raises:
      BaseModelMismatchError: naming the first parameter whose base values differ (or that
        the model lacks), and how to load anyway.

    Example:
      >>> import torch, torch_bridge
      >>> m = torch.nn.Linear(2, 1)
      >>> s = torch_bridge.make_summary(m, list(m.parameters()),
      ...     [torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)], method="fft")
      >>> check_base(m, s)
    """
    fp = summary.get(KEY)
    if fp is None:
        return
    check_fingerprint_field(fp)
    if fp["scheme"] != SCHEME:
        return  # written by a newer version: its scheme cannot be checked here
    named = dict(_names.named_parameters(model))
    entries = summary.get("params", {})
    how = ("Load it onto the weights it was trained from (the same checkpoint; for a peft "
           "LoRA adapter also the same seed, or the saved initial adapter), or pass "
           "force=True to load it anyway.")
    for name, want in fp["params"].items():
        if name not in named:
            raise BaseModelMismatchError(
                f"the summary was made against a model with a parameter {name!r}; this model "
                f"has none. {how}")
        e = entries.get(name)
        if _digest(named[name], e["indices"] if e is not None else None) != want:
            raise BaseModelMismatchError(
                f"the summary was made against other base weights: {name} differs at entries "
                f"the training never changed. {how}")
