"""Errors of torch summaries (in their own module so the readers and writers share them)."""

from __future__ import annotations

import pickle


class SummaryMismatchError(ValueError):
    """A summary file or dict is not a valid summary, or does not fit the model; the message
    names the file (or parameter) and the problem, and the model was left unchanged.

    Example:
      >>> import torch, torch_bridge
      >>> small = torch.nn.Linear(2, 1)
      >>> masks = [torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)]
      >>> s = torch_bridge.make_summary(small, list(small.parameters()), masks, method="pafi")
      >>> try:
      ...     torch_bridge.load_weights_from_summary(torch.nn.Linear(3, 1), s)
      ... except torch_bridge.SummaryMismatchError as e:
      ...     print(e)
      weight: summary shape [1, 2], model shape [1, 3].
    """


class UnsafeFileError(SummaryMismatchError, pickle.UnpicklingError):
    """The file names a Python global a summary never needs (it may try to run code); it was
    refused before anything in it ran.

    Example:
      >>> import os, tempfile, torch, torch_bridge
      >>> class Payload:  # unpickling it calls eval("1 + 1") (it could call anything)
      ...     def __reduce__(self):
      ...         return (eval, ("1 + 1",))
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "summary.pt")
      ...     torch.save({"params": Payload()}, path)
      ...     try:
      ...         torch_bridge.load_summary_from_disk(path)
      ...     except torch_bridge.UnsafeFileError as e:
      ...         print(str(e).replace(folder, "<folder>"))
      <folder>/summary.pt is not a weights-only summary file: refusing to load __builtin__.eval (a summary needs only tensors and plain values).
    """
