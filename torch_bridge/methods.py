"""Method names of the torch API -> the shared ``optax_selective`` method objects.

The selection rules live in ``optax_selective.methods``; this module only checks the
constructor arguments a torch user passes and builds the matching method object.
"""

from __future__ import annotations

from typing import Any

from optax_selective import methods as _methods
from optax_selective.methods._base import check_budget, check_int
from optax_selective.transform import _check_nonnegative

METHOD_NAMES = ("id3", "pafi", "bitfit", "fft")


def check_method_name(name: Any) -> str:
    """Returns ``name`` lower-cased if it is one of :data:`METHOD_NAMES`, else raises.

    Example:
      >>> check_method_name("ID3")
      'id3'
    """
    if not isinstance(name, str) or name.lower() not in METHOD_NAMES:
        raise ValueError(
            f"Unsupported PEFT method: {name!r}. Choose one of {', '.join(map(repr, METHOD_NAMES))}."
        )
    return name.lower()


def build_method(
    name: str, *, budget: Any, max_steps: Any = None, exp: Any = 1.0, eps: Any = 1e-8
) -> _methods.Method:
    """The ``optax_selective`` method object for ``name``, with its arguments checked.

    ``budget`` is required for id3, pafi and bitfit (fft ignores it); ``max_steps``, ``exp``
    and ``eps`` are read by id3 only.

    Example:
      >>> build_method("id3", budget=100, max_steps=10).frozen_after
      10
    """
    name = check_method_name(name)
    if name == "fft":
        return _methods.FFT()
    if budget is None:
        raise ValueError(f"method {name!r} needs budget=<entries that may change>, got None.")
    budget = check_budget(budget)
    if name == "pafi":
        return _methods.PaFI(budget=budget)
    if name == "bitfit":
        return _methods.BitFit(budget=budget)
    if max_steps is None:
        raise ValueError(
            "method 'id3' needs max_steps=<number of optimizer steps over which the budget is "
            "spent>, got None."
        )
    max_steps = check_int("max_steps", max_steps, 1)
    for arg, value in (("exp", exp), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"id3: {arg} must be a number, got {value!r}.")
        _check_nonnegative(arg, value)
    return _methods.ID3(budget=budget, max_steps=max_steps, exp=float(exp), eps=float(eps))
