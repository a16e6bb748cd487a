"""Global top-k selection computed one parameter (one chunk of a parameter) at a time.

Used for ID3's per-step top-``k_t`` (:class:`LeafwiseSelector`) and for PaFI's fixed mask at
construction (:func:`choose_fixed_mask`). The compact state (:mod:`torch_bridge.compact`)
needs only the entries a step adds, so the step does not have to hand every leaf to one JAX
program at once.

:class:`LeafwiseSelector` takes the leaves in any order (as ``backward`` produces their
gradients, with ``stream_grads=True``). Each leaf is cut into equal chunks of at most
:data:`CHUNK` entries, and each chunk into rows of ``c`` entries. Per chunk, one fused JAX pass
(``selection.row_maxima`` with the method's own elementwise ``score``) gives the best score of
every row; the rows that can hold a candidate (at most ``k_max``, best maxima first, and none
whose maximum is below the ``k_max``-th best entry kept so far) are gathered and scored by a
second, small JAX program; their entries at or above that floor join the pending candidates,
which are reduced to the best ``k_max`` whenever they fill a fixed buffer;
:meth:`LeafwiseSelector.finish` picks the step's ``k``. Exact: a chunk's best ``k_max``
entries lie in its ``k_max`` rows with the highest maxima (ties: lower row), every entry of
the global top-``k_max`` is among its chunk's best ``k_max``, and an entry below the floor
is beaten by ``k_max`` others; ties go to the lower global index (leaf order, then row-major)
in every reduction, so the entries are exactly those the whole-model selection picks. Nothing
is sorted but the candidates; the k-th values are found with ``torch.kthvalue`` (linear time).

Memory: besides the tensors being read, one chunk's row maxima (``chunk / c`` floats), one
block of gathered rows and ``(1 + _PENDING) * k_max`` candidates; two compiled programs per
distinct chunk size and one per dtype combination (the heap is trimmed after compiling).
Indices are int64 in torch; JAX sees a chunk only, so leaves with 2**31 entries or more are
handled (in chunks) too.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from optax_selective import selection

CHUNK = 1 << 24  # entries per row-maxima pass (16M: 1M row maxima at c = 16)
_PENDING = 4  # the candidate buffer holds (1 + _PENDING) * k_max entries
_BLOCK = 8192  # most rows scored by one call of the row-scoring program
_ROW = 16  # entries per row
NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class _Unmasked:
    """``method.score(grad, param, False)``: excluded entries arrive with a NaN gradient
    instead of a mask, which the score maps to -inf exactly as the exclusion would (no mask
    needed). Holds the method (a frozen dataclass, equal by value), so equal methods share
    compiled programs."""

    method: Any

    def __call__(self, grad, param):
        return self.method.score(grad, param, False)


@dataclasses.dataclass(frozen=True)
class _InitScore:
    """``method.score(param)``: a fixed mask's score (PaFI), one input per entry."""

    method: Any

    def __call__(self, param):
        return self.method.score(param)


TRACES = [0]  # compilations of the programs below, all selectors together (tests read it)
TRIMS = [0]  # heap trims after those compilations (tests read it)


def _glibc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return None


_MALLOC_TRIM = _glibc_trim()


def trim_heap() -> None:
    """Hands the memory a compilation freed back to the system. XLA's compiler frees most of
    what it allocates, but glibc keeps freed small blocks in its heaps (one per thread), so
    the process stays larger by about 10 MiB after the first programs; a compilation happens
    while backward runs, so that memory would add to every later step's peak."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
        TRIMS[0] += 1


def _clean(score):
    """float32 scores as ``selection`` ranks them: non-finite -> -inf, -0.0 -> 0.0."""
    s = score.astype(jnp.float32)
    s = jnp.where(jnp.isfinite(s), s, -jnp.inf)
    return jnp.where(s == 0, jnp.float32(0), s)


@partial(jax.jit, static_argnums=(0, 1))
def _row_max(score_fn: Callable, c: int, *xs):
    """The best score of each row of ``c`` entries of the flat chunk ``xs`` (the last row: the
    entries left), one fused pass."""
    TRACES[0] += 1
    n = xs[0].shape[0]
    full = n // c * c
    parts = []
    if full:
        parts.append(selection.row_maxima([x[:full].reshape(-1, c) for x in xs], score_fn))
    if n > full:
        parts.append(jnp.max(_clean(score_fn(*(x[full:] for x in xs))), keepdims=True))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


@partial(jax.jit, static_argnums=(0, 1))
def _row_scores(score_fn: Callable, c: int, rows, *xs):
    """The scores of rows ``rows`` (int32, ``(block,)``) of ``c`` entries of the flat chunk
    ``xs``, as ``(block, c)``; entries past the chunk's end are -inf."""
    TRACES[0] += 1
    n = xs[0].shape[0]
    idx = rows[:, None] * c + jnp.arange(c, dtype=jnp.int32)
    s = _clean(score_fn(*(x[jnp.minimum(idx, n - 1)] for x in xs)))
    return jnp.where(idx < n, s, -jnp.inf)


@partial(jax.jit, static_argnums=0)
def _increment(method, count, effective_budget):
    TRACES[0] += 1
    return method.increment(count, effective_budget)


def step_size(method: Any, count: int, effective_budget: int) -> int:
    """``method.increment(count, effective_budget)`` (ID3's ``k_t``) as an int: one compiled
    program, where calling it eagerly would compile one per JAX operation in it."""
    traces = TRACES[0]
    k = int(_increment(method, np.int32(count), np.int32(effective_budget)))
    if TRACES[0] != traces:
        trim_heap()
    return k


def _to_jax(t: torch.Tensor) -> jax.Array:
    return jax.dlpack.from_dlpack(t.detach())


def _best_positions(values: np.ndarray, order: np.ndarray | None, m: int) -> np.ndarray:
    """Positions of the ``m`` best of ``values`` (float32, ``-inf``: never chosen), highest
    first by value and then by lowest ``order`` (default: the position), as a sorted int64
    array; all finite ones if fewer. Linear time (``np.partition``) but for the ties. NumPy:
    one thread, so it stays fast where torch's small parallel operations wait for a loaded
    machine's cores.

    Example:
      >>> _best_positions(np.array([1.0, 3.0, 1.0, -np.inf], np.float32), None, 2).tolist()
      [0, 1]
      >>> _best_positions(np.array([1.0, 3.0, 1.0], np.float32), np.array([5, 0, 2]), 2).tolist()
      [1, 2]
    """
    n = int(values.size)
    if m <= 0:
        return np.zeros(0, np.int64)
    live = values > NEG_INF
    if m >= n or m >= int(np.count_nonzero(live)):
        return np.flatnonzero(live)
    threshold = np.partition(values, n - m)[n - m]  # the m-th highest
    chosen = values > threshold
    tied = np.flatnonzero(values == threshold)
    need = m - int(np.count_nonzero(chosen))
    if order is not None and tied.size > need:
        tied = tied[np.argsort(order[tied], kind="stable")]
    chosen[tied[:need]] = True
    return np.flatnonzero(chosen)


class LeafwiseSelector:
    """Collects one step's candidates leaf by leaf and picks the global top-``k``.

    Args:
      method: a ``LeafwiseMethod`` (ID3): its elementwise ``score(grad, param, mask)`` is called
        with ``mask=False`` (excluded entries come with a NaN gradient), and ``k_max`` bounds
        the entries one step adds.
      numels: the number of entries of every leaf, in leaf order (fixes the global indices).
      chunk: the most entries per scoring call (default :data:`CHUNK`, read at construction;
        tests lower it to exercise leaves split into chunks). A leaf of ``n`` entries is cut
        into ``ceil(n / chunk)`` chunks of ``ceil(n / ceil(n / chunk))`` entries (the last
        may be shorter).
      row_chunks: ``{leaf: (row_length, rows)}``: those leaves are cut into chunks of
        ``rows`` whole rows of ``row_length`` entries instead (``chunk`` aside), so that each
        block of rows a layer of :func:`torch_bridge.chunk_weight_grads` produces is one
        chunk, offered alone (:meth:`offer_rows`) before the rest of the gradient exists.
      keep_grads: keep the gradient values of the candidates (for ``stream_grads=True``, where
        the dense gradient is gone by :meth:`finish`); default True.

    Example:
      >>> from optax_selective.methods import ID3
      >>> m = ID3(budget=2, max_steps=1)
      >>> g, p = torch.tensor([0.1, 3.0, -2.0]), torch.ones(3)
      >>> sel = LeafwiseSelector(m, [3])
      >>> sel.offer(0, g, p)
      >>> leaf_idx = sel.finish(2)
      >>> leaf_idx[0][0].tolist(), leaf_idx[0][1].tolist()
      ([1, 2], [3.0, -2.0])
    """

    def __init__(self, method: Any, numels: Sequence[int], chunk: int | None = None, *,
                 row_chunks: dict[int, tuple[int, int]] | None = None, keep_grads: bool = True):
        chunk = CHUNK if chunk is None else chunk
        if not 0 < chunk < 2**31:
            raise ValueError(f"chunk must be in [1, 2**31), got {chunk}.")
        self.score_fn = _Unmasked(method)
        self.k_max = int(method.k_max)
        self.chunk = int(chunk)
        counts = [max(1, -(-int(n) // self.chunk)) for n in numels]
        # a leaf's chunks are equal (but the last): fewer distinct shapes to compile (the
        # 32000-row embedding and LM head: one program, not two)
        sizes = [-(-int(n) // c) for n, c in zip(numels, counts)]
        self._row_chunks = dict(row_chunks or {})
        for i, (row_len, rows) in self._row_chunks.items():  # a block of rows is one chunk
            sizes[i] = int(row_len) * int(rows)
        self._size = np.array(sizes, np.int64)
        self._offset = np.concatenate([[0], np.cumsum([int(n) for n in numels])]).astype(np.int64)
        # rows of c entries: a row whose maximum reaches the floor is scored whole, so the
        # entries scored are about c times those at or above the floor, and the row maxima of
        # a chunk are 1/c of its entries
        self.row = _ROW
        self._block = int(min(_BLOCK, max(16, 1 << max(0, self.k_max - 1).bit_length())))
        self._keep_grads = keep_grads
        self._cap = (1 + _PENDING) * self.k_max
        self.reset()

    def reset(self) -> None:
        """Forgets every candidate offered (a new step, or the user zeroed the gradients)."""
        self._values: list[np.ndarray] = []  # pending candidates (float32 scores), in parts
        self._gidx: list[np.ndarray] = []  # their global indices (int64)
        self._grads: list[np.ndarray] = []  # their gradient values (float64)
        self._n = 0
        # the k_max-th best value kept so far: an entry scoring below it cannot be among the
        # best k_max (ties can, by their index), so it is not even pushed
        self._floor = NEG_INF
        self.offered: set[int] = set()

    def offer(self, leaf: int, grad: torch.Tensor, param: torch.Tensor,
              selected: torch.Tensor | None = None) -> None:
        """Adds leaf ``leaf``'s entries that may be among the step's best ``k_max`` to the
        candidates, with the gradient values there (needed once the dense gradient is gone).
        ``selected`` (flat int64 indices) are excluded: their gradient is set to NaN during
        the call and put back after it. Reads the tensors during the call only."""
        if self.k_max == 0:
            return
        self.offered.add(leaf)
        flat_grad = grad.detach().reshape(-1)
        if selected is not None and selected.numel():
            if flat_grad.data_ptr() != grad.data_ptr() or not grad.is_contiguous():
                flat_grad = flat_grad.clone()  # a copy: nothing to put back
                selected_values = None
            else:
                selected_values = flat_grad[selected]
            flat_grad[selected] = float("nan")
            try:
                self._offer(leaf, flat_grad, param.detach().reshape(-1))
            finally:
                if selected_values is not None:
                    flat_grad[selected] = selected_values
            return
        self._offer(leaf, flat_grad, param.detach().reshape(-1))

    def rows_per_chunk(self, leaf: int) -> int | None:
        """Rows of leaf ``leaf`` per chunk (for :meth:`offer_rows`), or None for a leaf not
        given in ``row_chunks``."""
        return int(self._row_chunks[leaf][1]) if leaf in self._row_chunks else None

    def offer_rows(self, leaf: int, start: int, grad_rows: torch.Tensor, param: torch.Tensor,
                   selected: torch.Tensor | None = None) -> None:
        """:meth:`offer` for one chunk of leaf ``leaf`` only: the gradient of its rows
        ``start:start + rows_per_chunk(leaf)`` (fewer at the end of the leaf), given before
        the rest of the leaf's gradient exists. ``param`` is the whole parameter and
        ``selected`` the leaf's selected entries (flat, int64) as for :meth:`offer`."""
        if self.k_max == 0:
            return
        rows = self.rows_per_chunk(leaf)
        if rows is None or start % rows:
            raise ValueError(f"rows from {start} are not a chunk of leaf {leaf} "
                             f"({rows} rows per chunk).")
        self.offered.add(leaf)
        lo = start * int(self._row_chunks[leaf][0])
        flat_grad = grad_rows.detach().reshape(-1)
        if selected is not None and selected.numel():
            here = selected[(selected >= lo) & (selected < lo + flat_grad.numel())] - lo
            flat_grad[here] = float("nan")  # the block is consumed: nothing to put back
        flat_param = param.detach().reshape(-1)[lo:lo + flat_grad.numel()]
        self._offer(leaf, flat_grad, flat_param, first=lo)

    def _offer(self, leaf: int, flat_grad: torch.Tensor, flat_param: torch.Tensor,
               first: int = 0) -> None:
        """Offers the chunks of ``flat_grad`` / ``flat_param``: entries ``first, first + 1,
        ...`` of leaf ``leaf``."""
        n = flat_grad.numel()
        size = int(self._size[leaf])
        c = self.row
        traces = TRACES[0]
        for start in range(0, n, size):
            end = min(n, start + size)
            xs = (_to_jax(flat_grad[start:end]), _to_jax(flat_param[start:end]))
            maxima = np.asarray(_row_max(self.score_fn, c, *xs))
            # rows that can hold a candidate: none below the floor, and at most k_max (the
            # chunk's best k_max entries lie in its k_max rows of highest maxima)
            rows = np.flatnonzero(maxima >= self._floor if self._floor > NEG_INF
                                  else maxima > NEG_INF)
            if rows.size > self.k_max:
                rows = rows[_best_positions(maxima[rows], None, self.k_max)]
            if not rows.size:
                continue
            values = self._score_rows(xs, rows)
            keep = np.flatnonzero(values >= self._floor if self._floor > NEG_INF
                                  else values > NEG_INF)
            if keep.size > self.k_max:  # the chunk's best k_max (positions are in order)
                keep = keep[_best_positions(values[keep], None, self.k_max)]
            if not keep.size:
                continue
            local = rows[keep // c] * c + keep % c + start  # in index order
            grads = (flat_grad[torch.from_numpy(local)].to(torch.float64).numpy()
                     if self._keep_grads else None)
            self._push(values[keep], local + (int(self._offset[leaf]) + first), grads)
        if TRACES[0] != traces:
            trim_heap()

    def _score_rows(self, xs: tuple[jax.Array, ...], rows: np.ndarray) -> np.ndarray:
        """The scores of the entries of chunk rows ``rows``, flat (``len(rows) * c``)."""
        block = self._block
        out = []
        for a in range(0, rows.size, block):
            part = np.zeros(block, np.int32)  # a fixed shape (one program per chunk size)
            m = min(block, rows.size - a)
            part[:m] = rows[a:a + m]
            out.append(np.asarray(_row_scores(self.score_fn, self.row, part, *xs))[:m].reshape(-1))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _push(self, values: np.ndarray, gidx: np.ndarray, grads: np.ndarray | None) -> None:
        """Adds candidates (float32 scores, int64 global indices, float64 gradient values)."""
        self._values.append(values)
        self._gidx.append(gidx)
        if grads is not None:
            self._grads.append(grads)
        self._n += int(values.size)
        # the first k_max at once (a floor as early as possible), then every k_max more
        if self._n > 2 * self.k_max or (self._floor == NEG_INF and self._n >= self.k_max):
            self._reduce(self.k_max)

    def _joined(self):
        cat = (lambda xs: xs[0] if len(xs) == 1 else np.concatenate(xs))  # noqa: E731
        return cat(self._values), cat(self._gidx), cat(self._grads) if self._grads else None

    def _reduce(self, k: int) -> None:
        """Keeps the best ``k`` candidates (score, then lower global index)."""
        if not self._n:
            return
        values, gidx, grads = self._joined()
        keep = _best_positions(values, gidx, k)
        values, gidx = values[keep], gidx[keep]
        self._values, self._gidx = [values], [gidx]
        self._grads = [] if grads is None else [grads[keep]]
        self._n = int(values.size)
        if self._n == k == self.k_max:
            self._floor = float(values.min())

    def finish(self, k: int) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """The step's ``k`` entries: ``{leaf: (int64 flat indices, float64 gradient values)}``,
        in the order the method ranks them (best first; leaves ascending); then forgets the
        candidates. The gradient values are None for a selector built with
        ``keep_grads=False``."""
        out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if self.k_max and self._n:
            self._reduce(k)
            values, gidx, grads = self._joined()
            # leaf by leaf (ascending), best first in each: by score descending, ties by
            # global index (stable sorts)
            order = np.argsort(gidx, kind="stable")
            order = order[np.argsort(-values[order], kind="stable")]
            leaf = np.searchsorted(self._offset, gidx[order], side="right") - 1
            by_leaf = np.argsort(leaf, kind="stable")
            order, leaf = order[by_leaf], leaf[by_leaf]
            flat = gidx[order] - self._offset[leaf]
            cuts = np.flatnonzero(leaf[1:] != leaf[:-1]) + 1
            for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), leaf.size]):
                out[int(leaf[a])] = (torch.from_numpy(flat[a:b].copy()), None if grads is None
                                     else torch.from_numpy(grads[order[a:b]]))
        self.reset()
        return out


INIT_CHUNK = 1 << 22  # entries per call of a fixed mask's passes: 16 MiB of int32 digits
_DIGITS = 1 << 16
_BIN_CAP = 1 << 20  # the most entries kept from the threshold's histogram bin (else 2 more passes)


@partial(jax.jit, static_argnums=0)
def _high_digits(score_fn: Callable, x):
    """The top 16 bits of ``order_key(score)`` (0: non-finite), as int32."""
    TRACES[0] += 1
    return (selection.order_key(score_fn(x)) >> 16).astype(jnp.int32)


@partial(jax.jit, static_argnums=0)
def _low_digits(score_fn: Callable, x, high):
    """The low 16 bits of ``order_key(score)`` where its top 16 bits are ``high``, else
    ``2**16`` (a bin of its own), as int32."""
    TRACES[0] += 1
    key = selection.order_key(score_fn(x))
    return jnp.where((key >> 16) == high, (key & jnp.uint32(0xFFFF)).astype(jnp.int32), _DIGITS)


@partial(jax.jit, static_argnums=0)
def _against(score_fn: Callable, x, threshold):
    """Per entry: 2 where ``order_key(score) > threshold``, 1 where equal, else 0 (int8)."""
    TRACES[0] += 1
    key = selection.order_key(score_fn(x))
    return (key > threshold).astype(jnp.int8) * 2 + (key == threshold).astype(jnp.int8)


@partial(jax.jit, static_argnums=0)
def _against_high(score_fn: Callable, x, high):
    """Per entry (int32): ``2**16`` where the top 16 bits of ``order_key(score)`` exceed
    ``high``, the low 16 bits where they equal it, else -1."""
    TRACES[0] += 1
    key = selection.order_key(score_fn(x))
    top = key >> 16
    low = (key & jnp.uint32(0xFFFF)).astype(jnp.int32)
    return jnp.where(top > high, _DIGITS, jnp.where(top == high, low, -1))


def _digit_at_rank(hist: torch.Tensor, need: int) -> tuple[int, int]:
    """The largest digit ``d`` with ``count(digit >= d) >= need`` and ``count(digit > d)``."""
    at_or_above = torch.flip(torch.cumsum(torch.flip(hist, (0,)), 0), (0,))
    d = max(0, int((at_or_above >= need).sum()) - 1)
    above = int(at_or_above[d + 1]) if d + 1 < hist.numel() else 0
    return d, above


def choose_fixed_mask(method: Any, params: Sequence[torch.Tensor], selectable: Sequence[bool],
                      k: int, chunk: int | None = None) -> dict[int, torch.Tensor]:
    """A fixed mask chosen from the parameters (PaFI's init) one parameter (chunk) at a time:
    the ``k`` highest ``method.score(param)`` over the ``selectable`` leaves, ties to the lower
    global index, non-finite scores never, exactly as the whole-model ``method.init``. Returns
    ``{leaf: sorted int64 flat indices}`` (leaves with none left out).

    The selection is ``selection``'s radix path, one chunk at a time: a histogram
    (``torch.bincount``) of the top 16 bits of the order-preserving ``selection.order_key`` of
    the scores (computed by the method's JAX ``score``) finds the bin of the k-th highest; a
    second pass takes every entry above that bin and keeps those in it (few, at most
    :data:`_BIN_CAP`) with their low 16 bits, of which the best join (ties to the lower index).
    A crowded bin (many ties) takes a histogram of the low 16 bits and a third pass instead.
    Nothing is sorted but the bin: besides the indices returned, memory is one chunk's int32
    digits (``chunk`` entries, default :data:`INIT_CHUNK`).

    Example:
      >>> from optax_selective.methods import PaFI
      >>> ps = [torch.tensor([0.5, -0.1, 2.0]), torch.tensor([0.0, 0.1])]
      >>> {i: v.tolist() for i, v in choose_fixed_mask(PaFI(budget=3), ps, [True, True], 3).items()}
      {0: [1], 1: [0, 1]}
    """
    chunk = INIT_CHUNK if chunk is None else int(chunk)
    if not 0 < chunk < 2**31:
        raise ValueError(f"chunk must be in [1, 2**31), got {chunk}.")
    score_fn = _InitScore(method)
    leaves = [(i, p.detach().reshape(-1)) for i, (p, ok) in enumerate(zip(params, selectable))
              if ok and p.numel()]
    traces = TRACES[0]

    def pieces():  # (leaf, start, piece as a JAX array): a leaf's pieces are equal but the last
        for i, flat in leaves:
            n = flat.numel()
            size = -(-n // max(1, -(-n // chunk)))
            for start in range(0, n, size):
                yield i, start, _to_jax(flat[start:start + size])

    def count(digits):
        return torch.bincount(torch.from_dlpack(digits), minlength=_DIGITS + 1)[: _DIGITS + 1]

    hist = torch.zeros(_DIGITS + 1, dtype=torch.int64)
    for _, _, x in pieces():
        hist += count(_high_digits(score_fn, x))
    hist[0] = 0  # bin 0 holds only key 0: non-finite scores (finite keys start at 0x0080....)
    kk = min(int(k), int(hist.sum()))
    out: dict[int, torch.Tensor] = {}
    if kk <= 0:
        return out
    high, above_high = _digit_at_rank(hist[:_DIGITS], kk)
    found: dict[int, list[torch.Tensor]] = {}
    if int(hist[high]) <= _BIN_CAP:
        # One more pass: the entries above the threshold's bin are chosen; those in it (few:
        # at most _BIN_CAP) are kept with their low 16 bits, and the best kk - above_high of
        # them (ties to the lower global index) join.
        in_bin: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for i, start, x in pieces():
            v = torch.from_dlpack(_against_high(score_fn, x, np.uint32(high)))
            idx = torch.nonzero(v >= 0).view(-1)
            vals = v[idx]
            above = vals == _DIGITS
            if bool(above.any()):
                found.setdefault(i, []).append(idx[above] + start)
            if not bool(above.all()):
                inside = ~above
                in_bin.append((i, idx[inside] + start, vals[inside]))
        need = kk - above_high
        if need and in_bin:
            lows = torch.cat([v for _, _, v in in_bin])  # in global order
            best = torch.sort(torch.argsort(lows, descending=True, stable=True)[:need]).values
            pos = 0
            for i, idx, _ in in_bin:
                mine = best[(best >= pos) & (best < pos + idx.numel())] - pos
                if mine.numel():
                    found.setdefault(i, []).append(idx[mine])
                pos += idx.numel()
    else:  # a crowded bin (many ties): a second histogram finds the exact threshold
        hist.zero_()
        for _, _, x in pieces():
            hist += count(_low_digits(score_fn, x, np.uint32(high)))
        low, above_low = _digit_at_rank(hist[:_DIGITS], kk - above_high)
        threshold = np.uint32((high << 16) | low)
        ties = kk - above_high - above_low  # ties with the threshold still to take, in leaf order
        for i, start, x in pieces():
            code = torch.from_dlpack(_against(score_fn, x, threshold))
            if ties > 0:
                tied = torch.nonzero(code == 1).view(-1)
                if tied.numel() > ties:
                    code = code.clone()
                    code[tied[ties:]] = 0
                ties -= min(ties, int(tied.numel()))
                idx = torch.nonzero(code).view(-1)
            else:
                idx = torch.nonzero(code == 2).view(-1)
            if idx.numel():
                found.setdefault(i, []).append(idx + start)
    if TRACES[0] != traces:
        trim_heap()
    return {i: torch.sort(torch.cat(found[i])).values for i in sorted(found)}
