"""The scores methods rank entries by, and ID3's schedule (framework-free: no optax, no torch).

* the D3 score ``|g| / (|θ| + eps) ** exp``;
* PaFI's smallest-magnitude score;
* ID3's increment schedule ``k_t``.

Non-finite scores become ``-inf``, which :mod:`optax_selective.selection.topk` never chooses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def d3_score(grad: jax.Array, param: jax.Array, exp: float | jax.Array, eps: float | jax.Array) -> jax.Array:
    """The D3 score ``|g| / (|θ| + eps) ** exp`` in float32 (non-finite scores become -inf).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> selection.d3_score(jnp.array([1.0, -4.0]), jnp.array([1.0, 1.0]), 1.0, 0.0).tolist()
      [1.0, 4.0]
    """
    g = jnp.abs(grad.astype(jnp.float32))
    p = jnp.abs(param.astype(jnp.float32))
    denom = p + jnp.float32(eps)
    # pow is a transcendental (exp/log) on XLA: avoid it for the common static exponents;
    # x**1 == x and x*x is the correctly rounded square, as torch computes them.
    if isinstance(exp, (int, float)) and exp == 1:
        pass
    elif isinstance(exp, (int, float)) and exp == 2:
        denom = denom * denom
    else:
        denom = denom ** jnp.float32(exp)
    score = g / denom
    return jnp.where(jnp.isfinite(score), score, NEG_INF)


def smallest_magnitude_score(param: jax.Array) -> jax.Array:
    """PaFI's score: ``-|θ|`` in float32, so the top-k are the smallest magnitudes.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> selection.smallest_magnitude_score(jnp.array([-2.0, 0.5])).tolist()
      [-2.0, -0.5]
    """
    score = -jnp.abs(param.astype(jnp.float32))
    return jnp.where(jnp.isfinite(score), score, NEG_INF)


def id3_increment(step: jax.Array, effective_budget: jax.Array, max_steps: int) -> jax.Array:
    """Entries ID3 adds at ``step``: ``B // T + (step < B % T)`` for ``step < T``, else 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> k = selection.id3_increment(jnp.arange(4), jnp.int32(7), 3)
      >>> k.tolist()
      [3, 2, 2, 0]
    """
    base = effective_budget // max_steps
    extra = (step < effective_budget % max_steps).astype(base.dtype)
    return jnp.where(step < max_steps, base + extra, 0)


def max_increment(budget: int, max_steps: int) -> int:
    """A static upper bound on :func:`id3_increment` for any effective budget <= ``budget``.

    Example:
      >>> from optax_selective import selection
      >>> selection.max_increment(7, 3)
      3
    """
    return -(-budget // max_steps)


def exclude(score: jax.Array, exclusion_mask: jax.Array) -> jax.Array:
    """Scores with excluded entries (e.g. already selected) set to -inf.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> selection.exclude(jnp.array([1.0, 2.0]), jnp.array([False, True])).tolist()
      [1.0, -inf]
    """
    return jnp.where(exclusion_mask, NEG_INF, score)
