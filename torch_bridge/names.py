"""Parameter and module names as the plain model has them, whether or not it was compiled.

``torch.compile(model)`` returns a wrapper that holds the model as its attribute
``_orig_mod``, so the wrapper's ``named_parameters()`` reads ``_orig_mod.0.weight`` where the
model reads ``0.weight`` (and a compiled submodule adds ``_orig_mod`` in the middle of the
path). Summaries name parameters with the plain names, so a summary taken from a compiled
model loads onto the plain one and the other way round.

Example:
  >>> import torch
  >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1))
  >>> plain_name("_orig_mod.0.weight")
  '0.weight'
  >>> [n for n, _ in named_parameters(torch.compile(model))]
  ['0.weight', '0.bias']
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

COMPILE_WRAPPER_ATTR = "_orig_mod"  # where torch.compile's OptimizedModule keeps the model


def plain_name(name: str) -> str:
    """``name`` without the path segments added by ``torch.compile`` wrappers."""
    return ".".join(part for part in name.split(".") if part != COMPILE_WRAPPER_ATTR)


def named_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``model.named_parameters()`` (same order, so the same positions) with plain names."""
    for name, p in model.named_parameters():
        yield plain_name(name), p


def named_modules(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``model.named_modules()`` with plain names (a wrapper shares its model's name)."""
    for name, m in model.named_modules():
        yield plain_name(name), m
