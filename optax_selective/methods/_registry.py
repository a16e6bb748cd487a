"""Method names -> factories: the one table every caller (JAX, torch, tests) reads.

A factory takes the keyword arguments a user passes (``budget``, ``max_steps``, ...), checks
them, and returns a :class:`~optax_selective.methods.Method`. Its named keyword parameters
are the method's arguments: the torch bridge hands exactly those to it and the rest of its
constructor's keyword arguments to the inner optimizer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from optax_selective.methods._base import Method

Factory = Callable[..., Method]
_FACTORIES: dict[str, Factory] = {}


def register(name: str, factory: Factory | None = None, *, replace: bool = False) -> Any:
    """Registers ``factory`` under ``name`` (case-insensitive); usable as a decorator.

    Args:
      name: the method's name, e.g. ``"my_method"``; the method object's ``name`` should be
        the same (summaries and state dicts record it).
      factory: ``factory(**kwargs) -> Method``, e.g. the method's class. Its keyword
        parameters must be named (no ``**kwargs``), so the torch bridge can tell them from
        the inner optimizer's.
      replace: allow replacing an existing registration (built-ins included).

    Returns:
      ``factory`` (or, without it, a decorator that registers its argument).

    Example:
      >>> from optax_selective import methods
      >>> @methods.register("smallest_first")
      ... def make(*, budget=None):
      ...     return methods.PaFI(budget=methods.required_budget("smallest_first", budget))
      >>> methods.get("smallest_first")(budget=3).budget
      3
      >>> methods.unregister("smallest_first")
    """
    if factory is None:
        return lambda f: register(name, f, replace=replace)
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"method name must be a non-empty str without spaces around it, got {name!r}.")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable, got {factory!r}.")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _parameters(factory).values()):
        raise TypeError(
            f"factory for {name!r} takes **kwargs; name its keyword arguments (budget=..., "
            "...) so callers can tell them from the inner optimizer's."
        )
    key = name.lower()
    if key in _FACTORIES and not replace and _FACTORIES[key] is not factory:
        raise ValueError(f"method {name!r} is already registered; pass replace=True to replace it.")
    _FACTORIES[key] = factory
    return factory


def unregister(name: str) -> None:
    """Removes a registration (e.g. a test's own method).

    Example:
      >>> from optax_selective import methods
      >>> factory = methods.register("pafi_copy", methods.get("pafi"))
      >>> methods.build("pafi_copy", budget=2).budget
      2
      >>> methods.unregister("pafi_copy")
      >>> "pafi_copy" in methods.names()
      False
    """
    _FACTORIES.pop(_key(name), None)


def get(name: str) -> Factory:
    """The factory registered under ``name`` (case-insensitive).

    Example:
      >>> from optax_selective import methods
      >>> methods.get("ID3")(budget=10, max_steps=5).k_max
      2
    """
    return _FACTORIES[_key(name)]


def names() -> tuple[str, ...]:
    """The registered names, in registration order (the built-ins first).

    Example:
      >>> from optax_selective import methods
      >>> methods.names()[:6]
      ('bitfit', 'fft', 'fish', 'id3', 'pafi', 'random')
    """
    return tuple(_FACTORIES)


def arguments(name: str) -> tuple[str, ...]:
    """The keyword arguments the factory of ``name`` takes.

    Example:
      >>> from optax_selective import methods
      >>> methods.arguments("id3")
      ('budget', 'max_steps', 'exp', 'eps', 'score_decay', 'leaf_share')
    """
    return tuple(
        n for n, p in _parameters(get(name)).items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )


def build(name: str, **kwargs: Any) -> Method:
    """``get(name)(**kwargs)``, with an error naming the arguments the method takes.

    Example:
      >>> from optax_selective import methods
      >>> methods.build("pafi", budget=3)
      PaFI(budget=3, name='pafi', needs_params=False)
      >>> methods.build("pafi", budget=3, max_steps=2)
      Traceback (most recent call last):
      ...
      TypeError: method 'pafi' takes no argument 'max_steps'; it takes 'budget'.
    """
    factory = get(name)
    unknown = sorted(set(kwargs) - set(arguments(name)))
    if unknown:
        raise TypeError(
            f"method {name!r} takes no argument {', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(map(repr, arguments(name))) or 'none'}."
        )
    return factory(**kwargs)


def _key(name: Any) -> str:
    if not isinstance(name, str) or name.lower() not in _FACTORIES:
        raise ValueError(
            f"Unsupported PEFT method: {name!r}. Choose one of {', '.join(map(repr, _FACTORIES))}, "
            "or register your own with optax_selective.methods.register(name, factory)."
        )
    return name.lower()


def _parameters(factory: Factory) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # no signature (some builtins): takes nothing we can name
        return {}
