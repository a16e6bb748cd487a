"""Method names of the torch API -> the shared ``optax_selective`` method objects.

The names, the factories and their argument checks are ``optax_selective.methods``'
registry; this module only sorts a torch constructor's keyword arguments into the method's
and the inner optimizer's.
"""

from __future__ import annotations

from typing import Any

from optax_selective import methods as _methods

METHOD_NAMES = ("id3", "pafi", "bitfit", "fish", "random", "fft")  # the built-ins
# Accepted by every method's constructor in selective-optimizers 0.4: a method that does not
# take one of them ignores it (the others go to the inner optimizer unless the method takes them).
LEGACY_ARGS = ("budget", "max_steps", "fish_steps", "seed", "exp")


def check_method_name(name: Any) -> str:
    """Returns ``name`` lower-cased if it is registered, else raises.

    Example:
      >>> check_method_name("ID3")
      'id3'
    """
    _methods.get(name)  # raises a ValueError listing the registered names
    return name.lower()


def split_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Removes from ``kwargs`` (in place) and returns the arguments of method ``name``.

    The method gets the keyword arguments its factory names; the 0.4 method arguments it does
    not take (:data:`LEGACY_ARGS`) are dropped; the rest stay for the inner optimizer.

    Example:
      >>> kw = {"lr": 0.1, "budget": 5, "max_steps": 3, "eps": 1e-6}
      >>> split_kwargs("pafi", kw), kw
      ({'budget': 5}, {'lr': 0.1, 'eps': 1e-06})
    """
    takes = _methods.arguments(name)
    mine = {k: kwargs.pop(k) for k in list(kwargs) if k in takes}
    for k in LEGACY_ARGS:
        kwargs.pop(k, None)
    return mine


def build_method(name: str, **kwargs: Any) -> _methods.Method:
    """The ``optax_selective`` method object for ``name``, with its arguments checked.

    Example:
      >>> build_method("id3", budget=100, max_steps=10).frozen_after
      10
    """
    return _methods.build(check_method_name(name), **kwargs)
