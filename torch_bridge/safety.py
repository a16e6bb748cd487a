"""Which parameters must be restored after the inner step so unselected entries never move.

The bridge zeroes the gradient outside the mask (with exact ``+0.0``) before the inner step.
For the optimizers below, with no weight decay and ``maximize=False``, a gradient that has
been zero since step 0 gives an update of exactly ``-0.0``/``+0.0`` that leaves every value,
signed zeros included, bit-identical (tested in ``tests/test_torch_safety.py``), so
nothing needs restoring. Everything else is restored from a copy taken before the step:

* weight decay (coupled L2 or decoupled, any group's ``weight_decay``) or ``maximize`` with a
  built-in optimizer: restore the non-full parameters that have a gradient (built-in torch
  optimizers never touch a parameter whose ``grad`` is None);
* Adam, AdamW, Adagrad and RMSprop divide by ``sqrt(state) + eps``: where ``eps`` is 0 in the
  parameter's dtype (float16 turns the default ``1e-8`` into 0; or ``eps=0`` in any dtype) a
  zero gradient gives ``0 / 0 = NaN``, so those parameters are restored too (tested in
  ``tests/test_torch_edges.py``);
* any optimizer class outside ``torch.optim``: restore every non-full parameter.

The copy is transient: it exists only during ``step()`` and costs one extra tensor per
restored parameter (at most the size of the parameters) on the parameter's own device.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

RestoreScope = Literal["none", "with_grad", "all"]

ZERO_GRAD_EXACT: tuple[type, ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
)


def nonzero(value: Any) -> bool:
    """Whether a hyper-parameter (a number or a tensor, e.g. ``weight_decay``) is set.

    Example:
      >>> nonzero(0.0), nonzero(0.01), nonzero(torch.tensor([0.0, 1e-4]))
      (False, True, True)
    """
    if isinstance(value, torch.Tensor):
        return bool((value != 0).any())
    return bool(value)


# Their update of an entry is ``state / (sqrt(state) + eps)``-like: exact for a zero gradient
# only while ``eps`` is not 0 in the parameter's dtype.
EPS_DIVIDED: tuple[type, ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
)


def _eps_vanishes(group: dict[str, Any], dtype: torch.dtype) -> bool:
    eps = group.get("eps", 0.0)
    eps = float(eps.item() if isinstance(eps, torch.Tensor) else eps)
    return bool(torch.tensor(eps, dtype=dtype) == 0)


def restore_scope(
    optimizer_class: type, group: dict[str, Any], dtype: torch.dtype = torch.float32
) -> RestoreScope:
    """Which non-full parameters of ``group`` (of dtype ``dtype``) are restored after
    ``optimizer_class.step``.

    Example:
      >>> restore_scope(torch.optim.AdamW, {"weight_decay": 0.01})
      'with_grad'
      >>> restore_scope(torch.optim.Adam, {"weight_decay": 0.0, "maximize": False, "eps": 1e-8})
      'none'
      >>> restore_scope(torch.optim.Adam, {"weight_decay": 0.0, "eps": 1e-8}, torch.float16)
      'with_grad'
    """
    if not optimizer_class.__module__.startswith("torch.optim"):
        return "all"
    if (
        optimizer_class in ZERO_GRAD_EXACT
        and not nonzero(group.get("weight_decay", 0.0))
        and not group.get("maximize", False)
        and not (optimizer_class in EPS_DIVIDED and _eps_vanishes(group, dtype))
    ):
        return "none"
    return "with_grad"
