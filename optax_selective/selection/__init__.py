"""Which entries are selected: the rules every method uses, in JAX and through the torch bridge.

Framework-free (no optax, no torch), so ``DESIGN.md``'s rules live in one place. Two parts:

* :mod:`optax_selective.selection.scores`: what entries are ranked by (the D3 score, PaFI's
  smallest magnitude) and ID3's increment schedule ``k_t``;
* :mod:`optax_selective.selection.topk`: the exact global top-k over the leaves of a
  pytree, ties to the lower global index, non-finite scores never chosen, with the merge
  of per-shard candidates that sharded runs use.

Every public name of both is importable from here.

Example:
  >>> import jax.numpy as jnp
  >>> from optax_selective import selection
  >>> scores = [selection.d3_score(jnp.array([1.0, 3.0]), jnp.ones(2), 1.0, 0.0)]
  >>> selection.top_k_masks(scores, 1, 1)[0].tolist()
  [False, True]
"""

from optax_selective.selection.scores import (
    NEG_INF,
    d3_score,
    exclude,
    id3_increment,
    max_increment,
    smallest_magnitude_score,
)
from optax_selective.selection.topk import (
    choose_path,
    indices_to_masks,
    merge_candidates,
    order_key,
    row_maxima,
    shard_candidates,
    top_k_indices,
    top_k_masks,
    top_k_masks_reference,
)

__all__ = [
    "NEG_INF",
    "d3_score",
    "smallest_magnitude_score",
    "id3_increment",
    "max_increment",
    "exclude",
    "order_key",
    "choose_path",
    "top_k_masks",
    "top_k_indices",
    "shard_candidates",
    "merge_candidates",
    "row_maxima",
    "indices_to_masks",
    "top_k_masks_reference",
]
