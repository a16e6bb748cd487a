"""Pytree helpers shared by the methods, the transform and the summaries."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
ChooseAll = PyTree | Callable[[PyTree], PyTree] | None


def unwrap_nnx(tree: Any) -> Any:
    """``tree`` with flax.nnx Variables replaced by their arrays (no-op without flax.nnx).

    ``nnx.state(model)`` and ``nnx.Optimizer.opt_state`` wrap every array in a Variable, while
    ``tx.update`` sees plain arrays; user-facing helpers accept both.
    """
    nnx = sys.modules.get("flax.nnx")
    return tree if nnx is None else nnx.as_pure(tree)


def is_float(x: Any) -> bool:
    """Whether a leaf takes part in selection (real floating point only)."""
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def leaf_paths(tree: PyTree) -> tuple[str, ...]:
    """Path strings of the leaves of ``tree`` in leaf order (the summary keys)."""
    return tuple(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree))


class LeafLayout(NamedTuple):
    """Static description of a parameter pytree, computed once at init.

    ``selectable[i]`` is true for float leaves that are not choose_all: the leaves whose entries
    a method may pick. ``choose_all[i]`` is true for float leaves trainable from step 0.
    Methods receive it in ``init`` (public as ``optax_selective.methods.LeafLayout``).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective._tree import make_layout
      >>> layout = make_layout({"b": jnp.zeros(2), "w": jnp.zeros((2, 3))}, {"b": True, "w": False})
      >>> layout.paths, layout.num_choose_all, layout.num_selectable
      (("['b']", "['w']"), 2, 6)
    """

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    selectable: tuple[bool, ...]
    choose_all: tuple[bool, ...]

    @property
    def num_choose_all(self) -> int:
        return sum(_size(s) for s, c in zip(self.shapes, self.choose_all) if c)

    @property
    def num_selectable(self) -> int:
        return sum(_size(s) for s, c in zip(self.shapes, self.selectable) if c)


def _size(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def expand_choose_all(choose_all: ChooseAll, params: PyTree) -> list[bool]:
    """Turns a choose_all spec into one Python bool per leaf of ``params``.

    Accepts None, a bool pytree prefix of ``params`` or a callable ``params -> such a prefix``.
    """
    leaves = jax.tree.leaves(params)
    if choose_all is None:
        return [False] * len(leaves)
    spec = choose_all(params) if callable(choose_all) else choose_all
    try:
        full = jax.tree.map(lambda c, sub: jax.tree.map(lambda _: c, sub), spec, params)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "choose_all must be a bool pytree prefix of params (or a callable returning one); "
            f"its structure does not match params: {e}"
        ) from None
    flags = jax.tree.leaves(full)
    out = []
    for f in flags:
        if isinstance(f, (bool, np.bool_)) or (
            isinstance(f, (np.ndarray, jax.Array)) and np.shape(f) == () and f.dtype == bool
        ):
            out.append(bool(f))
        else:
            raise TypeError(
                f"choose_all leaves must be Python bools (one per parameter leaf), got {f!r}"
            )
    if len(out) != len(leaves):  # pragma: no cover - tree.map guarantees this
        raise ValueError("choose_all does not cover every leaf of params")
    return out


def make_layout(params: PyTree, choose_all: ChooseAll = None) -> LeafLayout:
    """Computes the static :class:`LeafLayout` of ``params``."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params is an empty pytree: there is nothing to select from.")
    flags = expand_choose_all(choose_all, params)
    floats = [is_float(x) for x in leaves]
    return LeafLayout(
        paths=leaf_paths(params),
        shapes=tuple(tuple(np.shape(x)) for x in leaves),
        selectable=tuple(f and not c for f, c in zip(floats, flags)),
        choose_all=tuple(f and c for f, c in zip(floats, flags)),
    )


def zero_outside(mask: jax.Array, update: jax.Array, *, negative: bool = False) -> jax.Array:
    """``update`` where ``mask`` is true, exact zeros elsewhere; dtype preserved.

    ``negative=True`` fills with ``-0.0``: the zero *update* that leaves every value
    bit-identical under ``optax.apply_updates`` (``x + -0.0 == x`` bitwise, ``-0.0``
    included, while ``-0.0 + 0.0 == +0.0``). Masked *gradients* keep ``+0.0``: descent
    optimizers negate them (``-lr * +0.0 == -0.0``), which is the zero update again.
    """
    if update.dtype == jax.dtypes.float0:
        return update
    if not jnp.issubdtype(update.dtype, jnp.inexact):
        return jnp.zeros_like(update)
    return jnp.where(mask, update, jnp.full_like(update, -0.0 if negative else 0.0))


def zero_update_like(x: Any, shape: Any = None) -> jax.Array:
    """The update that changes nothing: ``-0.0`` for inexact dtypes, ``0`` otherwise."""
    dtype = jnp.result_type(x)
    fill = -0.0 if jnp.issubdtype(dtype, jnp.inexact) else 0
    return jnp.full(np.shape(x) if shape is None else shape, fill, dtype)
