"""Pure array code that decides which entries are selected.

Framework-free: no optax, no torch. Every method, in JAX and through the torch bridge,
chooses entries with the functions here, so the rules of ``DESIGN.md`` live in one place:

* the D3 score ``|g| / (|θ| + eps) ** exp``;
* ID3's increment schedule ``k_t``;
* global top-k over a list of arrays (the leaves of a pytree, in leaf order), exact, with
  ties broken by lower global index and non-finite scores never chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -jnp.inf


def d3_score(grad: jax.Array, param: jax.Array, exp: float | jax.Array, eps: float | jax.Array) -> jax.Array:
    """The D3 score ``|g| / (|θ| + eps) ** exp`` in float32 (non-finite scores become -inf)."""
    g = jnp.abs(grad.astype(jnp.float32))
    p = jnp.abs(param.astype(jnp.float32))
    score = g / (p + jnp.float32(eps)) ** jnp.float32(exp)
    return jnp.where(jnp.isfinite(score), score, NEG_INF)


def smallest_magnitude_score(param: jax.Array) -> jax.Array:
    """PaFI's score: ``-|θ|`` in float32, so the top-k are the smallest magnitudes."""
    score = -jnp.abs(param.astype(jnp.float32))
    return jnp.where(jnp.isfinite(score), score, NEG_INF)


def id3_increment(step: jax.Array, effective_budget: jax.Array, max_steps: int) -> jax.Array:
    """Entries ID3 adds at ``step``: ``B // T + (step < B % T)`` for ``step < T``, else 0."""
    base = effective_budget // max_steps
    extra = (step < effective_budget % max_steps).astype(base.dtype)
    return jnp.where(step < max_steps, base + extra, 0)


def max_increment(budget: int, max_steps: int) -> int:
    """A static upper bound on :func:`id3_increment` for any effective budget <= ``budget``."""
    return -(-budget // max_steps)


def exclude(score: jax.Array, exclusion_mask: jax.Array) -> jax.Array:
    """Scores with excluded entries (e.g. already selected) set to -inf."""
    return jnp.where(exclusion_mask, NEG_INF, score)


def top_k_masks(scores: Sequence[jax.Array | None], k: int | jax.Array, k_max: int) -> list[jax.Array | None]:
    """Boolean masks of the ``k`` highest scores over all arrays together.

    Args:
      scores: one float array per leaf, in leaf order; ``None`` for a leaf that takes no part.
        Entries with a non-finite score are never chosen (use :func:`exclude`).
      k: how many to choose; may be traced, must be ``<= k_max``.
      k_max: static bound on ``k`` that fixes the shapes under ``jax.jit``.

    Returns:
      One bool array per leaf, shaped like its score (``None`` where the score was ``None``),
      true at the chosen entries. If fewer than ``k`` entries have a finite score, all of them
      are chosen. Ties go to the lower global index (leaf offset in leaf order plus row-major
      index), which is what makes the choice reproducible across frameworks.
    """
    # Per-leaf top-k_max candidates, then one merge over the candidates: the global top-k is
    # always among them, and no array of all N scores is ever built.
    cand_vals, cand_leaf, cand_idx = [], [], []
    for i, s in enumerate(scores):
        if s is None or s.size == 0:
            continue
        flat = s.reshape(-1)
        flat = jnp.where(jnp.isfinite(flat), flat, NEG_INF)  # NaN would sort first in top_k
        kk = min(k_max, flat.size)
        vals, idx = lax.top_k(flat, kk)  # ties: lower index first
        cand_vals.append(vals)
        cand_idx.append(idx.astype(jnp.int32))
        cand_leaf.append(jnp.full((kk,), i, jnp.int32))
    out: list[jax.Array | None] = [None if s is None else jnp.zeros(s.shape, bool) for s in scores]
    if not cand_vals or k_max == 0:
        return out
    vals = jnp.concatenate(cand_vals)
    leaf = jnp.concatenate(cand_leaf)
    idx = jnp.concatenate(cand_idx)
    # Candidates are laid out in leaf order, each leaf's sorted by (score desc, index asc), so
    # lax.top_k's "lower position first" tie rule is exactly "lower global index first".
    kk = min(k_max, vals.size)
    top_vals, pos = lax.top_k(vals, kk)
    chosen = (jnp.arange(kk) < k) & (top_vals > NEG_INF)
    top_leaf, top_idx = leaf[pos], idx[pos]
    for i, s in enumerate(scores):
        if s is None or s.size == 0:
            continue
        target = jnp.where(chosen & (top_leaf == i), top_idx, s.size)  # s.size: dropped
        out[i] = jnp.zeros(s.size, bool).at[target].set(True, mode="drop").reshape(s.shape)
    return out
