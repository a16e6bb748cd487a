"""Method names of the torch API -> the shared ``optax_selective`` method objects.

The selection rules live in ``optax_selective.methods``; this module only checks the
constructor arguments a torch user passes and builds the matching method object.
"""

from __future__ import annotations

import math
from typing import Any

from optax_selective import methods as _methods
from optax_selective.methods._base import check_budget, check_int
from optax_selective.methods.random import SEED_BOUND

METHOD_NAMES = ("id3", "pafi", "bitfit", "fish", "random", "fft")


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
    name: str,
    *,
    budget: Any,
    max_steps: Any = None,
    exp: Any = 1.0,
    eps: Any = 1e-8,
    fish_steps: Any = None,
    seed: Any = 0,
) -> _methods.Method:
    """The ``optax_selective`` method object for ``name``, with its arguments checked.

    ``budget`` is required for every method but fft (which ignores it); ``max_steps``, ``exp``
    and ``eps`` are read by id3 only, ``fish_steps`` by fish only (required there), ``seed``
    by random only.

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
    if name == "random":
        return _methods.RandomMask(budget=budget, seed=check_int("seed", seed, 0, SEED_BOUND - 1))
    if name == "fish":
        if fish_steps is None:
            raise ValueError(
                "method 'fish' needs fish_steps=<number of steps whose squared gradients make "
                "up the Fisher score>, got None."
            )
        return _methods.Fish(budget=budget, fish_steps=check_int("fish_steps", fish_steps, 1))
    if max_steps is None:
        raise ValueError(
            "method 'id3' needs max_steps=<number of optimizer steps over which the budget is "
            "spent>, got None."
        )
    max_steps = check_int("max_steps", max_steps, 1)
    for arg, value in (("exp", exp), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"id3: {arg} must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise ValueError(f"id3: {arg} must be finite, got {value!r}.")
    # Any finite exp (the ID3 paper sweeps exp in {-2, -1, 1, 2}; 0.4 took any); eps >= 0 so
    # |θ| + eps never crosses zero.
    if eps < 0:
        raise ValueError(f"id3: eps must be >= 0, got {eps!r}.")
    return _methods.ID3(budget=budget, max_steps=max_steps, exp=float(exp), eps=float(eps))
