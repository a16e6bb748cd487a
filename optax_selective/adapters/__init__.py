"""Summaries as adapters (JAX): folders, attach / detach, merging.

* :func:`save_pretrained` / :func:`load_pretrained` / :func:`read_pretrained`: an adapter
  folder holds the summary, optionally the base values at its entries, and a JSON config
  (:mod:`optax_selective.adapters.core`).
* :func:`attach` writes a summary into params and keeps the O(budget) values it overwrote;
  ``handle.detach()`` restores them bit for bit. Overlapping attaches are refused.
* :func:`merge_summaries` merges summaries of one base model (rules ``"sum"``, ``"mean"``,
  ``"ties"``; optional ``budget``); :func:`merge_folders` does it folder to folder.

The torch side is :mod:`torch_bridge.adapters`; both share
:mod:`optax_selective.adapters.core`. The command line is ``python -m optax_selective``.
"""

from optax_selective.adapters.attach import AttachedSummary, attach
from optax_selective.adapters.core import AdapterError, ParamEntries, Pretrained
from optax_selective.adapters.pretrained import (
    load_pretrained,
    merge_folders,
    merge_summaries,
    read_pretrained,
    save_pretrained,
)

__all__ = [
    "AdapterError",
    "AttachedSummary",
    "ParamEntries",
    "Pretrained",
    "attach",
    "load_pretrained",
    "merge_folders",
    "merge_summaries",
    "read_pretrained",
    "save_pretrained",
]
