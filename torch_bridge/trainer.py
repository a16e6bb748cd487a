"""``transformers.Trainer`` integration: the O(budget) summary written with every checkpoint.

:class:`SelectiveCallback` writes ``optimizer.get_summary(model)`` into each checkpoint folder
Trainer saves (``<output_dir>/checkpoint-<step>/selective_summary.safetensors``) and into
``output_dir`` when training ends, so a run's output includes the small artifact, not only
full-model checkpoints. With ``stream_grads=True`` it also clips: Trainer's own clipping
(``max_grad_norm``, 1.0 by default) reads ``param.grad``, which streaming has consumed, so it
would clip nothing and log ``grad_norm`` 0. The callback turns Trainer's clipping off for the
run, clips with ``optimizer.clip_grad_norm_(max_grad_norm)`` before every optimizer step
(exact: the same norm and update as clipping dense gradients) and logs that norm.

Importing this module imports transformers (``torch_bridge`` itself does not).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from torch_bridge.optimizer import SelectiveOptimizer
from torch_bridge.summary import write_summary_to_disk

__all__ = ["SUMMARY_NAME", "SelectiveCallback"]

SUMMARY_NAME = "selective_summary.safetensors"


def _unwrap(optimizer: Any) -> Any:
    while not isinstance(optimizer, SelectiveOptimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer
    return optimizer


class SelectiveCallback(TrainerCallback):
    """Writes the selective optimizer's summary at every checkpoint and at the end of training.

    Args:
      optimizer: the selective optimizer; by default the one Trainer trains with.
      filename: the summary's file name in each checkpoint folder and in ``output_dir``.

    Example:
      >>> import tempfile, torch, transformers
      >>> from torch_bridge import get_selective_optimizer, load_summary_from_disk
      >>> model = torch.nn.Linear(4, 1)
      >>> opt = get_selective_optimizer(torch.optim.SGD, "pafi")(model.parameters(), lr=0.1,
      ...                                                          budget=2)
      >>> cb = SelectiveCallback(opt)
      >>> folder = tempfile.mkdtemp()
      >>> args = transformers.TrainingArguments(output_dir=folder, report_to="none")
      >>> cb.on_train_end(args, transformers.TrainerState(), None, model=model)
      >>> load_summary_from_disk(f"{folder}/{SUMMARY_NAME}")["budget_used"]
      2
    """

    def __init__(self, optimizer: Any = None, filename: str = SUMMARY_NAME):
        self.optimizer = optimizer
        self.filename = filename
        self._max_norm: float | None = None
        self._last_norm: float | None = None

    def _opt(self, kwargs: dict[str, Any]) -> SelectiveOptimizer:
        opt = _unwrap(self.optimizer if self.optimizer is not None else kwargs.get("optimizer"))
        if not isinstance(opt, SelectiveOptimizer):
            raise TypeError(
                f"SelectiveCallback needs a selective optimizer (get_selective_optimizer), got "
                f"{type(opt).__name__}; pass it: SelectiveCallback(optimizer) or "
                "Trainer(optimizers=(optimizer, None)).")
        return opt

    def _write(self, folder: str, state: Any, kwargs: dict[str, Any]) -> None:
        summary = self._opt(kwargs).get_summary(kwargs["model"])  # every rank (FSDP2)
        if getattr(state, "is_world_process_zero", True):
            os.makedirs(folder, exist_ok=True)
            write_summary_to_disk(os.path.join(folder, self.filename), summary)

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        opt = self._opt(kwargs)
        if opt.stream_grads and args.max_grad_norm and args.max_grad_norm > 0:
            self._max_norm, args.max_grad_norm = float(args.max_grad_norm), 0.0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # noqa: D102
        if self._max_norm is not None:
            self._last_norm = float(self._opt(kwargs).clip_grad_norm_(self._max_norm))

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if self._max_norm is not None and logs is not None and "grad_norm" in logs:
            logs["grad_norm"] = self._last_norm
            if state.log_history and "grad_norm" in state.log_history[-1]:
                state.log_history[-1]["grad_norm"] = self._last_norm

    def on_save(self, args, state, control, **kwargs):  # noqa: D102
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self._write(folder, state, kwargs)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        if self._max_norm is not None:
            args.max_grad_norm, self._max_norm = self._max_norm, None
        self._write(args.output_dir, state, kwargs)
