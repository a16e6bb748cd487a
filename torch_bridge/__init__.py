"""PyTorch bridge of optax-selective: selective ``torch.optim`` optimizers and summaries.

The selection rules are the ones of ``optax_selective.methods`` (called through DLPack, see
:mod:`torch_bridge.jax_interop`); this package adds the torch side only. Importing it before
jax turns off JAX's GPU memory pre-allocation (see :mod:`torch_bridge._jax_env`).

Example:
  >>> import torch, torch_bridge
  >>> cls = torch_bridge.get_selective_optimizer(torch.optim.SGD, "pafi")
  >>> opt = cls(torch.nn.Linear(4, 2).parameters(), lr=0.1, budget=3)
  >>> opt.get_budget_used()
  3
"""

import torch_bridge._jax_env  # noqa: F401  (first: before anything imports jax)
from optax_selective.adapters.core import AdapterError
from optax_selective.verify import VerificationError
from torch_bridge._install import warn_if_foreign
from torch_bridge.adapters import (
    AttachedSummary,
    attach,
    load_pretrained,
    merge_summaries,
    read_pretrained,
    save_pretrained,
)
from torch_bridge.fingerprint import BaseModelMismatchError
from torch_bridge.legacy import convert_legacy_summary, read_legacy_summary
from torch_bridge.methods import METHOD_NAMES
from torch_bridge.optimizer import SelectiveOptimizer, get_selective_optimizer
from torch_bridge.row_grads import ChunkedLayers, chunk_weight_grads
from torch_bridge.summary import (
    Summary,
    SummaryMismatchError,
    UnsafeFileError,
    load_summary_from_disk,
    load_weights_from_summary,
    make_summary,
    write_summary_to_disk,
)

warn_if_foreign()  # the real selective-optimizers installed over our `selective_optimizers`

__all__ = [
    "METHOD_NAMES",
    "SelectiveOptimizer",
    "get_selective_optimizer",
    "chunk_weight_grads",
    "ChunkedLayers",
    "make_summary",
    "write_summary_to_disk",
    "load_summary_from_disk",
    "load_weights_from_summary",
    "read_legacy_summary",
    "convert_legacy_summary",
    "Summary",
    "SummaryMismatchError",
    "BaseModelMismatchError",
    "UnsafeFileError",
    "VerificationError",
    "save_pretrained",
    "load_pretrained",
    "read_pretrained",
    "attach",
    "AttachedSummary",
    "merge_summaries",
    "AdapterError",
]
