"""The exact global top-k over a list of arrays (the leaves of a pytree, in leaf order).

Ties go to the lower global index and non-finite scores are never chosen; several exact
paths (picked from the static shapes by :func:`choose_path`) give the same masks. The
scores they rank come from :mod:`optax_selective.selection.scores`; where the arrays are
split over devices is asked of :mod:`optax_selective.sharding`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_selective import sharding
from optax_selective.selection.scores import NEG_INF

# ---------------------------------------------------------------------------- global top-k
#
# Semantics shared by every path below (and checked against each other by the tests): the
# chosen entries are the k highest finite scores over all leaves together; -0.0 equals 0.0;
# ties go to the lower global index (leaf position in the list, then row-major index); if
# fewer than k scores are finite, all finite ones are chosen.
#
# Paths, picked statically from the shapes (all exact, all O(N) or better in N):
#   reference  per-leaf lax.top_k(k_max) then one merge; used for small inputs.
#   rows       small k: one fused pass computes the maximum of each row of c entries; the k
#              rows with the largest maxima (ties: lower row) hold every chosen entry, so an
#              exact top-k runs on k_max * c candidates only.  Gives indices directly.
#   radix      large k (PaFI's init): two histogram passes (top and bottom 16 bits) over the
#              order-preserving uint32 view of the scores find the exact k-th value T; then an
#              elementwise pass picks key > T, plus ties with index <= a per-leaf cutoff.
#   counting   sharded inputs: the same threshold found with reductions only (binary search
#              on the uint32 key with count(key >= t)). Explicit mode refuses lax.top_k,
#              reshape, gather, scatter and cumsum along a sharded axis; in auto mode (under
#              a multi-device mesh context, see sharding.split_mode) XLA's partitioner would
#              accept them but reshard the scores, while reductions stay on the shards.

_SMALL = 1 << 14  # total entries at or below which the reference path is used
_RADIX_ABOVE = 256  # top_k_masks uses the radix path when k_max > N / 256
_ALL_BITS = 0xFFFFFFFF


def order_key(score: jax.Array) -> jax.Array:
    """Order-preserving uint32 view of a float score; non-finite scores map to 0.

    ``a < b`` (as floats, with ``-0.0 == 0.0``) iff ``order_key(a) < order_key(b)``, and every
    finite score has a key ``>= 0x00800000``, so ``key > 0`` means "eligible".

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> k = selection.order_key(jnp.array([-1.0, 0.0, 2.0, jnp.nan]))
      >>> bool(k[0] < k[1] < k[2]), int(k[3])
      (True, 0)
    """
    s = score.astype(jnp.float32)
    s = jnp.where(s == 0, jnp.float32(0), s)  # -0.0 -> +0.0
    b = lax.bitcast_convert_type(s, jnp.uint32)
    key = jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))
    return jnp.where(jnp.isfinite(s), key, jnp.uint32(0))


def _clean(score: jax.Array) -> jax.Array:
    """Float32 scores with non-finite -> -inf and -0.0 -> 0.0 (so lax.top_k ties agree)."""
    s = score.astype(jnp.float32)
    s = jnp.where(jnp.isfinite(s), s, NEG_INF)
    return jnp.where(s == 0, jnp.float32(0), s)



def _live(scores):
    return [(i, s) for i, s in enumerate(scores) if s is not None and s.size > 0]


def _empty_masks(scores):
    return [None if s is None else jnp.zeros(s.shape, bool) for s in scores]


def _row_width(total: int, k_max: int) -> int:
    """Row length c for the rows path: about sqrt(N / k_max), a power of two in [8, 4096]."""
    target = max(1.0, (total / max(k_max, 1)) ** 0.5)
    return int(min(4096, max(8, 1 << int(round(np.log2(target))))))


def choose_path(scores: Sequence[jax.Array | None], k_max: int) -> str:
    """Which exact top-k path :func:`top_k_masks` takes for these (static) shapes.

    ``"counting"`` where :func:`optax_selective.sharding.split_mode` says the scores are
    split over devices; else the fastest single-device path for the sizes.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> selection.choose_path([jnp.zeros(100)], 5)
      'reference'
    """
    live = _live(scores)
    mode = sharding.split_mode([s for _, s in live])
    if mode == "explicit":
        return "counting"
    if mode == "auto" and all(jnp.dtype(s.dtype).itemsize <= 4 for _, s in live):
        return "counting"  # auto mode over several devices: reductions partition cleanly
    return _fast_path(live, k_max)


def _fast_path(live, k_max: int) -> str:
    """The fastest exact path for unsplit scores (static shapes only)."""
    if any(jnp.dtype(s.dtype).itemsize > 4 for _, s in live):
        return "reference"  # float64 scores: the uint32 key would round them
    total = sum(int(s.size) for _, s in live)
    if total <= _SMALL or k_max == 0:
        return "reference"
    # The rows path runs lax.top_k (a partial sort) on N / c row maxima and k_max * c
    # candidates: cheap for ID3's per-step k, slower than two histogram passes for large k.
    if k_max * _RADIX_ABOVE <= total:
        return "rows"
    return "radix"


def top_k_masks(
    scores: Sequence[jax.Array | None], k: int | jax.Array, k_max: int, *, path: str | None = None
) -> list[jax.Array | None]:
    """Boolean masks of the ``k`` highest scores over all arrays together.

    Args:
      scores: one float array per leaf, in leaf order; ``None`` for a leaf that takes no part.
        Entries with a non-finite score are never chosen (use :func:`exclude`).
      k: how many to choose; may be traced, must be ``<= k_max``.
      k_max: static bound on ``k`` that fixes the shapes under ``jax.jit``.
      path: force one implementation ("reference", "rows", "radix", "counting"); by default
        :func:`choose_path` picks the fastest exact one. All give the same masks.

    Returns:
      One bool array per leaf, shaped like its score (``None`` where the score was ``None``),
      true at the chosen entries. If fewer than ``k`` entries have a finite score, all of them
      are chosen. Ties (``-0.0 == 0.0``) go to the lower global index (leaf offset in leaf
      order plus row-major index), which makes the choice reproducible across frameworks.
      No path sorts all N scores: the cost is O(N) passes plus work on O(k_max) candidates.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> masks = selection.top_k_masks([jnp.array([3.0, 1.0]), jnp.array([3.0, 5.0])], 2, 2)
      >>> [m.tolist() for m in masks]  # the tie 3.0 goes to the lower global index
      [[True, False], [False, True]]
    """
    path = path or choose_path(scores, k_max)
    if not _live(scores) or k_max == 0:
        return _empty_masks(scores)
    if path not in ("reference", "rows", "radix", "counting"):
        raise ValueError(f"unknown top-k path {path!r}; use reference, rows, radix or counting.")
    # One compiled program (cached per shapes) also when called eagerly, e.g. by PaFI's init:
    # op-by-op dispatch would write every intermediate of the O(N) passes to memory.
    inputs = [sharding.unsplit(s) for s in scores] if path != "counting" else list(scores)
    masks = _top_k_masks_jit(inputs, jnp.asarray(k, jnp.int32), k_max, path)
    return [sharding.retype_like(m, s) for m, s in zip(masks, scores)]


@partial(jax.jit, static_argnums=(2, 3))
def _top_k_masks_jit(scores, k, k_max, path):
    if path == "reference":
        return top_k_masks_reference(scores, k, k_max)
    if path == "rows":
        return indices_to_masks(scores, *_top_k_rows(scores, k, k_max))
    if path == "radix":
        return _top_k_threshold(scores, k, _radix_threshold, _cumsum_cutoff)
    return _top_k_threshold(scores, k, _counting_threshold, _counting_cutoff)


def top_k_indices(
    scores: Sequence[Any], k: int | jax.Array, k_max: int, *, score_fn: Callable[..., jax.Array] | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The entries :func:`top_k_masks` chooses, as ``k_max`` slots ``(leaf, index, valid)``.

    ``leaf`` is the position in ``scores``, ``index`` the row-major index in that leaf, and
    ``valid`` marks the slots in use (the first ``min(k, eligible)``; the rest are padding).
    With ``score_fn`` (elementwise), each ``scores[i]`` is a tuple of same-shape arrays (or
    None) and the score is ``score_fn(*scores[i])``; the rows path then never writes the
    full score arrays. Not for explicitly sharded inputs (it gathers).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> leaf, index, valid = selection.top_k_indices([jnp.array([1.0, 4.0]), jnp.array([2.0])], 2, 3)
      >>> leaf.tolist(), index.tolist(), valid.tolist()
      ([0, 1, 0], [1, 0, 0], [True, True, False])
    """
    if score_fn is None:
        scores = [sharding.unsplit(s) for s in scores]
        live = [s for s in scores if s is not None and s.size > 0]
        as_scores = list(scores)
    else:
        scores = [None if xs is None else tuple(sharding.unsplit(x) for x in xs) for xs in scores]
        live = [xs[0] for xs in scores if xs is not None and xs[0].size > 0]
        as_scores = None
    if not live or k_max == 0:
        z = jnp.zeros((k_max,), jnp.int32)
        return z, z, jnp.zeros((k_max,), bool)
    shapes_only = [None if x is None else (x if score_fn is None else x[0]) for x in scores]
    if sharding.split_mode([s for _, s in _live(shapes_only)]) == "explicit":
        raise ValueError("top_k_indices does not support explicitly sharded scores; use top_k_masks.")
    path = _fast_path(_live(shapes_only), k_max)
    if path in ("rows", "radix"):  # radix gives masks, not indices: rows is exact for any k
        return _top_k_rows(scores, k, k_max, score_fn)
    if as_scores is None:
        as_scores = [None if xs is None else score_fn(*xs) for xs in scores]
    return _top_k_reference_indices(as_scores, k, k_max)


# ---------------------------------------------------------------------- over shards
#
# A global top-k over scores split into shards (devices, processes, torch ranks) needs only
# each shard's own top-k_max: the k <= k_max best entries of the whole are among the union of
# the shards' top-k_max (a shard's local row-major order is the global order restricted to
# that shard, so its tie order agrees too). ``shard_candidates`` gives one shard's candidates;
# ``merge_candidates`` picks the global top-k from all of them with the tie rule above. Both
# the torch FSDP2 runner and sharded JAX selection go through these two functions.


def shard_candidates(
    scores: Sequence[Any], k_max: int, *, score_fn: Callable[..., jax.Array] | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One shard's top-``k_max`` entries as candidates for :func:`merge_candidates`.

    ``scores`` are this shard's local arrays in leaf order (``None``: no part). Returns
    ``k_max`` slots ``(value, leaf, index, valid)``: float32 score (``-inf`` in unused slots),
    leaf position, row-major index in the *local* array, and whether the slot is used. The
    caller turns local indices into indices in the whole leaf. With ``score_fn``
    (elementwise), each ``scores[i]`` is a tuple of same-shape arrays and the score is
    ``score_fn(*scores[i])``, as in :func:`top_k_indices`: it is then evaluated at the chosen
    entries only, so no full score array is written (the torch bridge scores one chunk of a
    leaf at a time this way).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> values, leaf, index, valid = selection.shard_candidates([jnp.array([1.0, 4.0])], 1)
      >>> values.tolist(), index.tolist()
      ([4.0], [1])
    """
    leaf, index, valid = top_k_indices(scores, k_max, k_max, score_fn=score_fn)
    values = jnp.full((k_max,), NEG_INF, jnp.float32)
    for i, s in _live([None if x is None else (x if score_fn is None else x[0]) for x in scores]):
        at = jnp.clip(index, 0, s.size - 1)
        if score_fn is None:
            picked = _clean(s).reshape(-1)[at]
        else:
            picked = _clean(score_fn(*(jnp.reshape(x, (-1,))[at] for x in scores[i])))
        values = jnp.where(valid & (leaf == i), picked, values)
    return values, leaf, index, valid


def merge_candidates(
    values: jax.Array, leaf: jax.Array, index: jax.Array, k: int | jax.Array, k_max: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``k`` best of all shards' candidates, as ``k_max`` slots ``(leaf, index, valid)``.

    ``values``, ``leaf`` and ``index`` (int32 index in the whole leaf) are the candidates of
    every shard concatenated, in any order; each entry may appear once only (offer a replicated
    leaf from one shard). The choice is :func:`top_k_masks`'s: highest score first, ties
    (``-0.0 == 0.0``) to the lower ``(leaf, index)``, non-finite scores never, fewer than ``k``
    if fewer are finite. Slots are in that order (best first).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> values, leaf, index = jnp.array([2.0, 5.0, 2.0]), jnp.array([1, 0, 0]), jnp.array([0, 7, 3])
      >>> leaf, index, valid = selection.merge_candidates(values, leaf, index, 2, 2)
      >>> leaf.tolist(), index.tolist()
      ([0, 0], [7, 3])
    """
    inverted = ~order_key(values)  # non-finite: key 0, inverted all ones, sorts last
    inverted, leaf, index = lax.sort(
        (inverted, leaf.astype(jnp.int32), index.astype(jnp.int32)), num_keys=3
    )
    kk = min(k_max, int(values.shape[0]))
    valid = (jnp.arange(kk) < k) & (inverted[:kk] != jnp.uint32(_ALL_BITS))
    return _pad_slots(leaf[:kk], index[:kk], valid, k_max)


# ------------------------------------------------------------------------- reference path


def _top_k_reference_indices(scores, k, k_max):
    cand_vals, cand_leaf, cand_idx = [], [], []
    for i, s in _live(scores):
        flat = _clean(s).reshape(-1)
        kk = min(k_max, flat.size)
        vals, idx = lax.top_k(flat, kk)  # ties: lower index first
        cand_vals.append(vals)
        cand_idx.append(idx.astype(jnp.int32))
        cand_leaf.append(jnp.full((kk,), i, jnp.int32))
    vals = jnp.concatenate(cand_vals)
    leaf = jnp.concatenate(cand_leaf)
    idx = jnp.concatenate(cand_idx)
    # Candidates are laid out in leaf order, each leaf's sorted by (score desc, index asc), so
    # lax.top_k's "lower position first" tie rule is exactly "lower global index first".
    kk = min(k_max, vals.size)
    top_vals, pos = lax.top_k(vals, kk)
    valid = (jnp.arange(kk) < k) & (top_vals > NEG_INF)
    return _pad_slots(leaf[pos], idx[pos], valid, k_max)


def _pad_slots(leaf, local, valid, k_max):
    pad = k_max - leaf.shape[0]
    if pad <= 0:
        return leaf, local, valid
    return (
        jnp.concatenate([leaf, jnp.zeros((pad,), jnp.int32)]),
        jnp.concatenate([local, jnp.zeros((pad,), jnp.int32)]),
        jnp.concatenate([valid, jnp.zeros((pad,), bool)]),
    )


def indices_to_masks(
    scores: Sequence[jax.Array | None], leaf: jax.Array, local: jax.Array, valid: jax.Array
) -> list[jax.Array | None]:
    """Bool masks shaped like ``scores`` that are true at the valid ``(leaf, index)`` slots.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> m = selection.indices_to_masks([jnp.zeros(3)], jnp.array([0]), jnp.array([2]), jnp.array([True]))
      >>> m[0].tolist()
      [False, False, True]
    """
    out = _empty_masks(scores)
    for i, s in _live(scores):
        target = jnp.where(valid & (leaf == i), local, s.size)  # s.size: dropped
        out[i] = jnp.zeros(s.size, bool).at[target].set(True, mode="drop").reshape(s.shape)
    return out


def top_k_masks_reference(
    scores: Sequence[jax.Array | None], k: int | jax.Array, k_max: int
) -> list[jax.Array | None]:
    """The simple exact version: per-leaf ``lax.top_k(k_max)`` then one merge (for tests).

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> selection.top_k_masks_reference([jnp.array([1.0, 2.0])], 1, 1)[0].tolist()
      [False, True]
    """
    if not _live(scores) or k_max == 0:
        return _empty_masks(scores)
    return indices_to_masks(scores, *_top_k_reference_indices(scores, k, k_max))


# ------------------------------------------------------------------------------ rows path


def _top_k_rows(scores, k, k_max, score_fn=None):
    """Rows path. With ``score_fn``, ``scores[i]`` is a tuple of same-shape arrays and the
    score is ``score_fn(*scores[i])``, computed per row and per candidate row, so the full
    score arrays of large leaves are never written out."""
    fn = (lambda x: x) if score_fn is None else score_fn  # noqa: E731
    parts = [(i, (x,) if score_fn is None else tuple(x)) for i, x in enumerate(scores) if x is not None]
    parts = [(i, xs) for i, xs in parts if xs[0].size > 0]
    total = sum(int(xs[0].size) for _, xs in parts)
    c = _row_width(total, k_max)
    small_rows = 64  # leaves with fewer rows (biases, norms) share one materialised view
    views = []  # (arrays viewed as (rows, c), row score function)
    # Per leaf (not per row: per-row tables would be compiled into the program as constants,
    # megabytes of them for large leaves): its first global row, its view and its first row there.
    seg_start, seg_leaf, seg_view, seg_pos, seg_rows = [], [], [], [], []
    small_flat = []
    first_row = 0
    for i, xs in parts:
        size = int(xs[0].size)
        n_rows = -(-size // c)
        if n_rows * c == size and n_rows >= small_rows:  # free reshapes, scores on the fly
            views.append((tuple(jnp.reshape(x, (n_rows, c)) for x in xs), fn))
            view, pos = len(views) - 1, 0
        else:  # small or odd-sized leaf: materialise its score, padded with -inf
            pos = sum(f.shape[0] for f in small_flat) // c
            small_flat.append(jnp.pad(_clean(fn(*xs)).reshape(-1), (0, n_rows * c - size), constant_values=NEG_INF))
            view = -1
        seg_start.append(first_row)
        seg_leaf.append(i)
        seg_view.append(view)
        seg_pos.append(pos)
        seg_rows.append(n_rows)
        first_row += n_rows
    if small_flat:
        flat = jnp.concatenate(small_flat)
        views.append(((flat.reshape(-1, c),), lambda x: x))
        seg_view = [len(views) - 1 if v < 0 else v for v in seg_view]
    # Row maxima in global row order (leaf order, then row), whatever view a row lives in.
    maxima = [_row_maxima(v, f) for v, f in views]
    offsets = np.concatenate([[0], np.cumsum([v[0].shape[0] for v, _ in views])[:-1]]).astype(np.int64)
    at = [int(offsets[v]) + p for v, p in zip(seg_view, seg_pos)]  # each leaf's rows in `maxima`
    all_max = jnp.concatenate(maxima)
    if at == seg_start:
        rowmax = all_max
    else:  # the position of each global row in `maxima`, built in the program (no constant)
        rowmax = all_max[jnp.concatenate([lax.iota(jnp.int32, n) + a for a, n in zip(at, seg_rows)])]
    rowmax = _zero_sign(rowmax)  # max may keep -0.0; ties need +0.0
    seg_start_j = jnp.asarray(np.array(seg_start, np.int32))
    seg_leaf_j, seg_view_j = jnp.asarray(np.array(seg_leaf, np.int32)), jnp.asarray(np.array(seg_view, np.int32))
    seg_pos_j = jnp.asarray(np.array(seg_pos, np.int32))
    # The kr rows with the largest maxima (ties: lower row) contain the exact top-k: they
    # hold >= kr entries >= the kr-th largest row maximum M, so the k-th value T >= M; any
    # entry > T lies in a row with maximum > M, and the first ties with T (by index) lie in
    # the lowest rows whose maximum equals T, which are taken before higher ones.
    kr = min(k_max, rowmax.shape[0])
    _, top_rows = lax.top_k(rowmax, kr)
    top_rows = jnp.sort(top_rows)  # ascending global row, so candidates are in index order
    seg = jnp.searchsorted(seg_start_j, top_rows, side="right").astype(jnp.int32) - 1
    row_in_leaf = top_rows - seg_start_j[seg]
    cand_view, cand_pos = seg_view_j[seg], seg_pos_j[seg] + row_in_leaf
    cand = jnp.full((kr, c), NEG_INF, jnp.float32)
    for j, (view, f) in enumerate(views):
        rows = jnp.clip(cand_pos, 0, view[0].shape[0] - 1)
        picked = _clean(f(*[v[rows] for v in view]))
        cand = jnp.where((cand_view == j)[:, None], picked, cand)
    kk = min(k_max, kr * c)
    vals, pos = lax.top_k(cand.reshape(-1), kk)
    valid = (jnp.arange(kk) < k) & (vals > NEG_INF)
    r, col = pos // c, pos % c
    return _pad_slots(seg_leaf_j[seg[r]], row_in_leaf[r] * c + col, valid, k_max)


_ROW_GROUPS = 8  # column groups combined elementwise by _row_maxima


def _row_maxima(arrays, fn):
    """``max(fn(*arrays), axis=1)`` over (rows, c) arrays (non-finite -> -inf), in one pass.

    XLA:CPU does not fuse an elementwise producer into a large reduction, and hands
    ``jnp.maximum`` chains to its YNNPACK fusion, so the plain form writes the full score array
    and reads it back: about 2 ns per entry on two cores. Here the score is computed per group
    of c / 8 columns, and the groups are combined with ``where(a > b, a, b)`` (which stays in
    XLA's own loop fusion), so one fused pass reads the inputs once and writes only N / 8
    values for the last, small reduction. ID3's whole per-step selection at 25M entries takes
    0.34x the time of the plain form on the 2-core CPU (``python -m benchmarks.selection_pass``);
    the values are the same on any backend.
    """
    rows, c = arrays[0].shape
    groups = min(_ROW_GROUPS, c)
    width = c // groups
    split = [jnp.reshape(x, (rows, groups, width)) for x in arrays]
    parts = [_finite_or_neg_inf(fn(*(x[:, j, :] for x in split))) for j in range(groups)]
    while len(parts) > 1:  # pairwise, so the tree has depth log2(groups)
        parts = [jnp.where(a > b, a, b) for a, b in zip(parts[::2], parts[1::2])]
    return jnp.max(parts[0], axis=1)


def row_maxima(arrays: Sequence[jax.Array], score_fn: Callable[..., jax.Array] | None = None) -> jax.Array:
    """The best score of each row: ``max(score_fn(*arrays), axis=1)`` over same-shape
    ``(rows, c)`` arrays, with non-finite scores as ``-inf`` and ``-0.0`` as ``0.0`` (the
    ranking :func:`top_k_masks` uses), in one fused pass that never writes the full scores.

    The rows whose maxima rank highest hold the top-k entries (the rows path's argument), so
    this is the pass a selection one leaf at a time (the torch bridge) starts from.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_selective import selection
      >>> selection.row_maxima([jnp.array([[1.0, -3.0], [jnp.nan, -0.0]])], jnp.abs).tolist()
      [3.0, 0.0]
    """
    fn = (lambda x: x) if score_fn is None else score_fn  # noqa: E731
    return _zero_sign(_row_maxima(tuple(arrays), fn))


def _finite_or_neg_inf(x):
    x = x.astype(jnp.float32)
    return jnp.where(jnp.isfinite(x), x, NEG_INF)


def _zero_sign(x):
    return jnp.where(x == 0, jnp.float32(0), x)


# ---------------------------------------------------------------- threshold paths (radix)


def _top_k_threshold(scores, k, find_threshold, find_cutoff):
    """Masks ``key > T`` plus ties ``key == T`` up to a per-leaf index cutoff."""
    live = _live(scores)
    keys = [order_key(s) for _, s in live]
    thr, n_gt, n_eq, n_eligible = find_threshold(keys, jnp.asarray(k, jnp.int32))
    kk = jnp.minimum(jnp.asarray(k, jnp.int32), n_eligible)
    r = kk - n_gt  # ties with T still to take, 1 <= r <= n_eq when kk > 0
    sizes = jnp.asarray([int(key.size) for key in keys], jnp.int32)

    def masks(ss, cut):
        out = []
        for j, x in enumerate(ss):
            key = order_key(x)
            chosen = (key > thr) | ((key == thr) & (_flat_iota(key.shape) < cut[j]))
            out.append(chosen & (key > 0) & (kk > 0))
        return out

    # Both branches recompute the keys from the scores (already in memory) and write the
    # masks: nothing N-sized crosses the cond, so XLA fuses each pass instead of writing out
    # the keys.
    chosen = lax.cond(
        n_eq > r,
        lambda ss: masks(ss, find_cutoff([order_key(x) for x in ss], thr, r)),
        lambda ss: masks(ss, sizes),
        [s for _, s in live],
    )
    out = _empty_masks(scores)
    for (i, _), m in zip(live, chosen):
        out[i] = m
    return out


def _flat_iota(shape) -> jax.Array:
    """Row-major flat index of every entry, built from per-axis iotas (no reshape)."""
    index = jnp.zeros(shape, jnp.int32)
    stride = 1
    for d in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.int32, shape, d) * stride
        stride *= shape[d]
    return index


# Counts over all leaves together may pass 2**31 (a 7B model has 6.7e9 entries) while every
# count within one leaf fits int32 (a leaf has fewer than 2**31 entries, checked at init). Sums
# over leaves therefore saturate at _COUNT_MAX: every count the threshold paths use exactly is
# below k <= 2**31 - 1 (the entries above the k-th largest, ties before the k-th), and the
# others (eligible entries, ties) are only compared with such counts or with k, which a
# saturated value still answers correctly.
_COUNT_MAX = 2**31 - 1


def _sat_add(a, b):
    """``a + b`` for non-negative int32 counts, saturating at ``_COUNT_MAX``."""
    return jnp.where(a > _COUNT_MAX - b, jnp.int32(_COUNT_MAX), a + b)


def _sat_cumsum(x):
    return lax.associative_scan(_sat_add, x)


def _hist16(keys, digit_fn, weight_fn):
    h = jnp.zeros((1 << 16,), jnp.int32)
    for key in keys:
        flat = key.reshape(-1)
        h = _sat_add(h, jax.ops.segment_sum(
            weight_fn(flat), digit_fn(flat).astype(jnp.int32), num_segments=1 << 16
        ))
    return h


def _digit_at_rank(hist, need):
    """Largest digit d with count(digit >= d) >= need, and count(digit > d) (exact: < need)."""
    at_or_above = _sat_cumsum(hist[::-1])[::-1]
    d = jnp.sum(at_or_above >= need, dtype=jnp.int32) - 1
    d = jnp.maximum(d, 0)
    above = jnp.concatenate([at_or_above[1:], jnp.zeros((1,), at_or_above.dtype)])
    return d, above[d]


def _radix_threshold(keys, k):
    """Exact kk-th largest key (kk = min(k, eligible)) in two 16-bit histogram passes.

    Returns ``(T, count(key > T), count(key == T), eligible)``.
    """
    one = lambda flat: jnp.ones(flat.shape, jnp.int32)  # noqa: E731
    hi = _hist16(keys, lambda f: f >> 16, one)
    hi = hi.at[0].set(0)  # bin 0 holds only key 0 (non-finite); finite keys start at 0x0080..
    n_eligible = _sat_cumsum(hi)[-1]
    kk = jnp.minimum(k, n_eligible)
    d_hi, above_hi = _digit_at_rank(hi, kk)
    lo = _hist16(
        keys,
        lambda f: f & jnp.uint32(0xFFFF),
        lambda f: ((f >> 16) == d_hi.astype(jnp.uint32)).astype(jnp.int32),
    )
    d_lo, above_lo = _digit_at_rank(lo, kk - above_hi)
    thr = (d_hi.astype(jnp.uint32) << 16) | d_lo.astype(jnp.uint32)
    return thr, above_hi + above_lo, lo[d_lo], n_eligible


def _cumsum_cutoff(keys, thr, r):
    """Per-leaf exclusive index cutoffs so that exactly the first r ties (global order) pass."""
    per_leaf = jnp.stack([jnp.sum(key == thr, dtype=jnp.int32) for key in keys])
    through = _sat_cumsum(per_leaf)  # ties up to and including each leaf
    before = jnp.concatenate([jnp.zeros((1,), jnp.int32), through[:-1]])  # exact up to the star
    star = jnp.sum(through < r, dtype=jnp.int32)  # leaf holding the r-th tie
    need = r - before[jnp.minimum(star, len(keys) - 1)]

    def branch(key):
        def f():
            ranks = jnp.cumsum((key.reshape(-1) == thr).astype(jnp.int32))
            return jnp.sum(ranks < need, dtype=jnp.int32) + 1  # index of the r-th tie, + 1
        return f

    pos = lax.switch(jnp.minimum(star, len(keys) - 1), [branch(key) for key in keys])
    return _cutoffs_from(keys, star, pos)


def _cutoffs_from(keys, star, pos):
    j = jnp.arange(len(keys))
    sizes = jnp.asarray([int(key.size) for key in keys], jnp.int32)
    return jnp.where(j < star, sizes, jnp.where(j == star, pos, 0))


# ------------------------------------------------------------ threshold paths (counting)


def _count(keys, pred):
    total = jnp.zeros([], jnp.int32)
    for key in keys:
        total = _sat_add(total, jnp.sum(pred(key), dtype=jnp.int32))
    return total


def _counting_threshold(keys, k):
    """Largest t with count(key >= t) >= kk, by binary search with reductions only."""
    n_eligible = _count(keys, lambda key: key > 0)
    kk = jnp.minimum(k, n_eligible)

    def body(_, lo_hi):
        lo, hi = lo_hi  # invariant: count(key >= lo) >= kk; answer in [lo, hi]
        gap = hi - lo
        mid = lo + gap // 2 + (gap & 1)  # ceil; hi - lo + 1 could wrap at 2**32
        ok = _count(keys, lambda key: key >= mid) >= kk
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = lax.fori_loop(0, 32, body, (jnp.uint32(0), jnp.uint32(_ALL_BITS)))
    n_gt = _count(keys, lambda key: key > lo)
    n_eq = _count(keys, lambda key: key == lo)
    return lo, n_gt, n_eq, n_eligible


def _counting_cutoff(keys, thr, r):
    per_leaf = jnp.stack([jnp.sum(key == thr, dtype=jnp.int32) for key in keys])
    through = _sat_cumsum(per_leaf)  # ties up to and including each leaf
    before = jnp.concatenate([jnp.zeros((1,), jnp.int32), through[:-1]])  # exact up to the star
    star = jnp.sum(through < r, dtype=jnp.int32)
    need = r - before[jnp.minimum(star, len(keys) - 1)]
    index = [_flat_iota(key.shape) for key in keys]

    def ties_below(bound):  # ties in leaf `star` with index < bound
        per = [jnp.sum((key == thr) & (ix < bound), dtype=jnp.int32) for key, ix in zip(keys, index)]
        return jnp.stack(per)[jnp.minimum(star, len(keys) - 1)]

    def body(_, lo_hi):
        lo, hi = lo_hi  # smallest bound with ties_below(bound) >= need lies in [lo, hi]
        mid = (lo + hi) // 2
        ok = ties_below(mid) >= need
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    biggest = max(int(key.size) for key in keys)
    pos, _ = lax.fori_loop(0, max(1, biggest.bit_length() + 1), body, (jnp.int32(0), jnp.int32(biggest)))
    return _cutoffs_from(keys, star, pos)
